""".npy and .npz files read without trusting them: no pickle, no allocation the file
cannot back, every failure a NetdslError naming the file (and the member).

np.load believes a .npy header: a few bytes declaring a 9.5 GiB array make it
allocate 9.5 GiB before it finds the data missing. Here each header is parsed first
(numpy.lib.format, no data read) and its shape x itemsize must equal the bytes the
member really holds; the zip's own sizes must be ones its compressed bytes can
produce, and all of it must fit in the memory this machine has free.
"""
from __future__ import annotations

import math
import os
import struct
import zipfile
import zlib

import numpy as np
from numpy.lib import format as npy_format

from ..errors import NetdslError

NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGIC = b"PK\x03\x04"
EMPTY_ZIP_MAGIC = b"PK\x05\x06"
# Deflate emits at most 258 bytes per 2-bit code: no stream expands more than ~1032x.
_DEFLATE_MAX_RATIO = 1032
_CHUNK = 1 << 24
_NUMERIC_KINDS = "biufc"


def read_npz(path, what: str = "file", *, numeric: bool = False) -> dict[str, np.ndarray]:
    """All arrays of an .npz archive, by name (np.savez's keys, '.npy' stripped).

    `what` says what the file is for ("checkpoint", "data file") in messages. With
    `numeric`, text, date and raw-byte arrays are refused too. An archive with no
    arrays gives {}: the caller knows whether that is an error.
    """
    path = os.fspath(path)
    label = f"{what} {path}"
    with _open_regular(path, label) as f:
        head = f.read(6)
    if head.startswith(NPY_MAGIC):
        raise NetdslError(f"{label} is a .npy file (one array); expected an .npz archive of named arrays",
                          hint="save it with np.savez(path, name=array)")
    if not (head.startswith(ZIP_MAGIC) or head.startswith(EMPTY_ZIP_MAGIC)):
        raise NetdslError(f"{label} is not an .npz file (expected a zip archive of .npy arrays)")
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, NotImplementedError, ValueError, EOFError, struct.error) as e:
        why = "missing or broken; was it cut short?" if isinstance(e, zipfile.BadZipFile) else f"unreadable ({e})"
        raise NetdslError(f"{label} is damaged: its zip directory is {why}") from None
    except OSError as e:
        raise NetdslError(f"cannot read {label}: {e.strerror or e}") from None
    with zf:
        members = _check_members(zf, os.path.getsize(path), label)
        out = {}
        for name, info in members.items():
            where = f"{label}: member '{info.filename}'"
            try:
                with zf.open(info) as m:
                    out[name] = _read_npy(m, info.file_size, where, numeric)
            except NetdslError:
                raise
            except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, struct.error) as e:
                raise NetdslError(f"{where} is damaged ({e})") from None
            except NotImplementedError as e:   # compression zipfile cannot undo
                raise NetdslError(f"{where}: {e}") from None
            except OSError as e:
                raise NetdslError(f"cannot read {where}: {e.strerror or e}") from None
    return out


def read_arrays(path, what: str = "file", *, numeric: bool = True) -> dict[str, np.ndarray]:
    """The arrays of a .npy file ({file stem: array}) or an .npz archive ({name: array}),
    told apart by their content, not their extension. Numeric arrays only unless
    `numeric=False`; a file with no arrays is an error."""
    path = os.fspath(path)
    label = f"{what} {path}"
    with _open_regular(path, label) as f:
        if f.read(6).startswith(NPY_MAGIC):
            f.seek(0)
            try:
                arrays = {os.path.splitext(os.path.basename(path))[0]:
                          _read_npy(f, os.fstat(f.fileno()).st_size, label, numeric)}
            except ValueError as e:
                raise NetdslError(f"{label} is damaged ({e})") from None
            except OSError as e:
                raise NetdslError(f"cannot read {label}: {e.strerror or e}") from None
        else:
            arrays = None
    if arrays is None:
        try:
            arrays = read_npz(path, what, numeric=numeric)
        except NetdslError as e:
            if "is not an .npz file" in e.message:
                raise NetdslError(f"{label} is neither a .npy file nor an .npz archive") from None
            raise
    if not arrays:
        raise NetdslError(f"{label} holds no arrays")
    return arrays


# ---------------------------------------------------------------- the zip

def _open_regular(path: str, label: str):
    if not os.path.exists(path):
        raise NetdslError(f"{label} not found")
    if os.path.isdir(path):
        raise NetdslError(f"{label} is a directory, expected a file")
    if not os.path.isfile(path):   # a FIFO or device would block or never end
        raise NetdslError(f"{label} is not a regular file")
    try:
        return open(path, "rb")
    except OSError as e:
        raise NetdslError(f"cannot read {label}: {e.strerror or e}") from None


def _check_members(zf: zipfile.ZipFile, archive_size: int, label: str) -> dict[str, zipfile.ZipInfo]:
    """Members by array name, after checking every size the central directory claims."""
    members: dict[str, zipfile.ZipInfo] = {}
    total = 0
    for info in zf.infolist():
        if info.is_dir():
            continue
        where = f"{label}: member '{info.filename}'"
        if not info.filename.endswith(".npy"):
            raise NetdslError(f"{where} is not a .npy array; an .npz holds only .npy members")
        name = info.filename[:-4]
        if name in members:
            raise NetdslError(f"{label} is damaged: member '{info.filename}' appears twice")
        if info.flag_bits & 0x1:
            raise NetdslError(f"{where} is encrypted; .npz members are not")
        if info.header_offset + 30 + info.compress_size > archive_size:
            raise NetdslError(f"{where} is damaged: it claims {info.compress_size} bytes past the end of the file "
                              f"(the file has {archive_size}); was it cut short?")
        if info.compress_type == zipfile.ZIP_STORED:
            if info.compress_size != info.file_size:
                raise NetdslError(f"{where} is damaged: stored uncompressed, yet its sizes differ "
                                  f"({info.compress_size} bytes in the file, {info.file_size} claimed)")
        elif info.compress_type == zipfile.ZIP_DEFLATED:
            if info.file_size > _DEFLATE_MAX_RATIO * info.compress_size + 1024:
                raise NetdslError(f"{where} is damaged: it claims {_size(info.file_size)} from "
                                  f"{info.compress_size} compressed bytes, more than deflate can produce")
        else:
            raise NetdslError(f"{where} uses zip compression method {info.compress_type}; .npz members are "
                              f"stored or deflated (np.savez, np.savez_compressed)")
        members[name] = info
        total += info.file_size
    free = available_memory()
    if free is not None and total > free:
        raise NetdslError(f"{label} holds {_size(total)} of arrays, more than the {_size(free)} of memory "
                          f"this machine has available")
    return members


# ---------------------------------------------------------------- one .npy

def _read_npy(f, size: int, where: str, numeric: bool) -> np.ndarray:
    """Parse a .npy header from `f` (positioned at its start, `size` bytes long) and
    read the data only once the header's claim matches `size`."""
    version = npy_format.read_magic(f)
    if version not in ((1, 0), (2, 0)):   # 3.0 is only for structured dtypes with non-Latin-1 names: refused
        raise NetdslError(f"{where}: .npy format version {version[0]}.{version[1]} is not read")
    read_header = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
    try:
        shape, fortran, dtype = read_header(f)
    except Exception as e:   # numpy's header parser lets tokenize/ast errors of hostile text out as they are
        raise NetdslError(f"{where} is damaged: unreadable .npy header ({type(e).__name__}: {str(e)[:80]})") from None
    _check_dtype(dtype, where, numeric)
    if any(d < 0 for d in shape):
        raise NetdslError(f"{where} is damaged: its header declares a negative dimension {shape}")
    count = math.prod(shape)
    nbytes = count * dtype.itemsize
    header = f.tell()
    if header + nbytes != size:
        raise NetdslError(f"{where} is damaged: its header declares {dtype} {list(shape)} ({_size(nbytes)}) "
                          f"but it holds {_size(max(size - header, 0))} of data")
    buf = bytearray(nbytes)
    view, pos = memoryview(buf), 0
    while pos < nbytes:
        chunk = f.read(min(nbytes - pos, _CHUNK))
        if not chunk:
            raise NetdslError(f"{where} is damaged: its data ends after {pos} of {nbytes} bytes")
        view[pos:pos + len(chunk)] = chunk
        pos += len(chunk)
    arr = np.frombuffer(buf, dtype=dtype, count=count) if count else np.empty(0, dtype)
    if fortran:   # kernels take C order: one copy now rather than surprises later
        arr = np.ascontiguousarray(arr.reshape(shape[::-1]).T)
    else:
        arr = arr.reshape(shape)
    if not dtype.isnative:
        arr = arr.byteswap().view(dtype.newbyteorder("="))
    return arr


def _check_dtype(dtype: np.dtype, where: str, numeric: bool) -> None:
    if dtype.hasobject:
        raise NetdslError(f"{where} holds Python objects; only plain numeric arrays are read "
                          f"(unpickling would let the file run code)")
    if dtype.names is not None or dtype.subdtype is not None:
        raise NetdslError(f"{where} has a structured dtype {dtype}; only plain arrays are read")
    if dtype.itemsize == 0:
        raise NetdslError(f"{where} has a dtype of zero-sized items ({dtype})")
    if numeric and dtype.kind not in _NUMERIC_KINDS:
        raise NetdslError(f"{where} holds {dtype} values (text, dates or raw bytes); numbers are expected")


# ---------------------------------------------------------------- memory

def available_memory() -> int | None:
    """Bytes this process could allocate now: MemAvailable, lowered by a cgroup
    (container) limit when there is one; None where neither can be read."""
    free = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if free is None:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, AttributeError):
            return None
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read().strip())
        if limit != "max":
            free = min(free, max(int(limit) - used, 0))
    except (OSError, ValueError):
        pass
    return free


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"
