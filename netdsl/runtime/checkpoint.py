"""Checkpoints as plain .npz files (never pickle), written atomically.

Layout: `param/<name>` parameters, `opt/<key>` optimiser state, and `__meta__`, a
UTF-8 JSON document stored as a uint8 array holding step, epoch, the spec hash and
the numpy Generator's bit-generator state.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import zipfile
from dataclasses import dataclass, field

import numpy as np

from ..errors import NetdslError, Note

FORMAT = "netdsl-checkpoint"
VERSION = 1
_BIT_GENERATORS = ("PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64")


@dataclass
class Checkpoint:
    path: str
    params: dict[str, np.ndarray]
    opt_state: dict[str, np.ndarray]
    step: int
    epoch: int
    spec_hash: str | None
    rng_state: dict | None = None
    extra: dict = field(default_factory=dict)

    def make_rng(self) -> np.random.Generator:
        """A Generator continuing exactly where the saved one stopped."""
        if self.rng_state is None:
            raise NetdslError(f"checkpoint {self.path} holds no random-generator state")
        name = self.rng_state.get("bit_generator")
        if name not in _BIT_GENERATORS:
            raise NetdslError(f"checkpoint {self.path}: unknown bit generator {name!r}")
        bg = getattr(np.random, name)()
        bg.state = _from_json(self.rng_state)
        return np.random.Generator(bg)


def spec_hash(spec_text: str) -> str:
    return hashlib.sha256(spec_text.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------- writing

def atomic_write(path: str, write) -> None:
    """Call write(binary file) on a temp file beside `path`, then rename it over `path`.

    Readers see the old file or the complete new one, never a part. The temp name
    starts with '.' and ends with '.tmp', so a crash leaves nothing that looks like
    a checkpoint; an exception removes it.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    # os.open rather than mkstemp so the file gets the usual umask-based mode, not 0600.
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    except OSError as e:
        raise NetdslError(f"cannot write {path}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise NetdslError(f"cannot write {path}: {e.strerror or e}") from None
        raise
    _fsync_dir(directory)


def _fsync_dir(directory: str) -> None:
    # Makes the rename itself durable; not possible on every platform (Windows).
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(path: str, params: dict[str, np.ndarray], opt_state: dict[str, np.ndarray] | None = None,
                    *, step: int = 0, epoch: int = 0, rng: np.random.Generator | None = None,
                    spec_text: str | None = None, extra: dict | None = None) -> None:
    """Write a checkpoint atomically. `extra` is any JSON-serialisable metadata."""
    meta = {"format": FORMAT, "version": VERSION, "step": int(step), "epoch": int(epoch),
            "spec_hash": spec_hash(spec_text) if spec_text is not None else None,
            "rng": _to_json(rng.bit_generator.state) if rng is not None else None,
            "extra": extra or {}}
    arrays = {f"param/{k}": np.asarray(v) for k, v in params.items()}
    arrays.update({f"opt/{k}": np.asarray(v) for k, v in (opt_state or {}).items()})
    arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    atomic_write(path, lambda f: np.savez(f, **arrays))


# ---------------------------------------------------------------- reading

def load_checkpoint(path: str, *, spec_text: str | None = None, allow_spec_mismatch: bool = False) -> Checkpoint:
    """Read a checkpoint. With `spec_text`, a checkpoint saved from a different spec is
    an error unless `allow_spec_mismatch` is set."""
    path = os.fspath(path)
    arrays = read_npz(path, "checkpoint")
    try:
        meta = json.loads(arrays.pop("__meta__").tobytes().decode("utf-8"))
        if meta.get("format") != FORMAT:
            raise ValueError
    except (KeyError, ValueError, UnicodeDecodeError, AttributeError):
        raise NetdslError(f"{path} is an .npz file but not a netdsl checkpoint (no valid '__meta__' entry)") from None
    if meta.get("version") != VERSION:
        raise NetdslError(f"checkpoint {path} has format version {meta.get('version')}, "
                          f"this netdsl reads version {VERSION}")
    ckpt = Checkpoint(path=path, step=int(meta["step"]), epoch=int(meta["epoch"]),
                      spec_hash=meta.get("spec_hash"), rng_state=meta.get("rng"), extra=meta.get("extra", {}),
                      params={k[6:]: v for k, v in arrays.items() if k.startswith("param/")},
                      opt_state={k[4:]: v for k, v in arrays.items() if k.startswith("opt/")})
    if spec_text is not None and not allow_spec_mismatch and ckpt.spec_hash != spec_hash(spec_text):
        why = "records no spec hash" if ckpt.spec_hash is None else "was saved from a different spec"
        raise NetdslError(f"checkpoint {path} {why}",
                          hint="edit the spec back, or allow the mismatch to load the weights anyway")
    return ckpt


def read_npz(path: str, what: str) -> dict[str, np.ndarray]:
    """All arrays of an .npz file, read without pickle; any failure is a NetdslError."""
    if not os.path.exists(path):
        raise NetdslError(f"{what} {path} not found")
    if os.path.isdir(path):
        raise NetdslError(f"{what} {path} is a directory, expected an .npz file")
    if not zipfile.is_zipfile(path):  # np.load would otherwise suggest unpickling it
        raise NetdslError(f"{what} {path} is not an .npz file (expected a zip archive of .npy arrays)")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except ValueError as e:
        if "pickle" in str(e):
            raise NetdslError(f"{what} {path} holds Python objects; only plain numeric arrays are read") from None
        raise NetdslError(f"cannot read {what} {path}: {e}") from None
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise NetdslError(f"cannot read {what} {path}: damaged .npz file ({e})") from None


def load_weights(params: dict[str, np.ndarray], source: Checkpoint | dict[str, np.ndarray]) -> None:
    """Copy saved weights into `params` in place (dtypes kept), after checking that
    names and shapes match exactly; every difference is listed in one error."""
    saved = source.params if isinstance(source, Checkpoint) else source
    what = f"checkpoint {source.path}" if isinstance(source, Checkpoint) else "weights"
    check_arrays({k: v.shape for k, v in params.items()}, saved, what)
    for k, p in params.items():
        p[...] = saved[k]


def check_arrays(expected: dict[str, tuple], got: dict[str, np.ndarray], what: str,
                 allow_missing: bool = False) -> None:
    """Compare names and shapes; raise one NetdslError with a note per problem."""
    missing = [] if allow_missing else sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(expected) & set(got) if tuple(got[k].shape) != tuple(expected[k]))
    if not (missing or extra or wrong):
        return
    notes = ([Note(f"missing: {k} (expected shape {tuple(expected[k])})") for k in missing]
             + [Note(f"unexpected: {k} (shape {tuple(got[k].shape)})") for k in extra]
             + [Note(f"wrong shape: {k} is {tuple(got[k].shape)}, expected {tuple(expected[k])}") for k in wrong])
    counts = ", ".join(f"{n} {label}" for n, label in
                       ((len(missing), "missing"), (len(extra), "unexpected"), (len(wrong), "wrong-shaped")) if n)
    raise NetdslError(f"{what} does not match the network: {counts}", notes=notes,
                      hint="was it saved from a different spec?")


# ---------------------------------------------------------------- JSON for RNG state
# Bit-generator states are dicts of ints (PCG64) or hold numpy arrays (MT19937's key).

def _to_json(obj):
    if isinstance(obj, dict):
        return {k: _to_json(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": obj.dtype.str}
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _from_json(obj):
    if isinstance(obj, dict):
        if "__ndarray__" in obj:
            return np.array(obj["__ndarray__"], dtype=np.dtype(obj["dtype"]))
        return {k: _from_json(v) for k, v in obj.items()}
    return obj
