"""Data sources: train and test splits as named arrays ("fields"), first axis = examples.

A source fills fields named after what they hold; `runtime/feeds.py` binds them to the
spec's inputs (by name, or an "image"/"label" field to the spec's one float/int input).
The classic image sources give "image" (float32 NCHW in [0, 1]; normalisation is the
loader's job) and "label" (int64 class ids). `npz(path)` gives whatever it holds.
"""
from __future__ import annotations

import gzip
import os
import pickle
import zipfile
from dataclasses import dataclass

import numpy as np

from ..datasets import load_coco      # COCO-format data (datasets/coco.py, imported on use)
from ..datasets import load_coco_captions   # COCO captions (datasets/captions.py, imported on use)
from ..errors import NetdslError
from . import construct, lookup
from .checkpoint import read_npz

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist


SPLITS = ("train", "test")


@dataclass
class Dataset:
    """Named arrays per split; every field of a split has the same length.

    A sequence source (text) also sets `streams`: per split, the one long id sequence
    its fields are windows of, to be read in order as parallel streams
    (loader.StreamLoader), each field at its `shifts` offset (chars 0, next 1) and
    `seq` ids long; and `vocab`, the characters in id order. `by_order`: fields a
    spec's inputs do not name fill its remaining inputs in declaration order."""
    name: str
    source: str                         # the file or directory it came from, for messages
    train: dict[str, np.ndarray]
    test: dict[str, np.ndarray]
    vocab: str | None = None
    streams: dict[str, np.ndarray] | None = None
    shifts: dict[str, int] | None = None
    seq: int | None = None
    by_order: bool = False

    def split(self, name: str) -> dict[str, np.ndarray]:
        return self.train if name == "train" else self.test

    def size(self, split: str) -> int:
        return len(next(iter(self.split(split).values())))

    def describe(self) -> str:
        """'image f32 (1, 8, 8), label i64 ()': what each example holds."""
        return ", ".join(f"{k} {_short(v.dtype)} {tuple(v.shape[1:])}" for k, v in self.train.items())

    # the classic image sources' fields
    x_train = property(lambda self: self.train["image"])
    y_train = property(lambda self: self.train["label"])
    x_test = property(lambda self: self.test["image"])
    y_test = property(lambda self: self.test["label"])

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max())) + 1


def _short(dtype) -> str:
    d = np.dtype(dtype)
    return {"f": "f", "i": "i", "u": "u", "b": "bool"}.get(d.kind, d.kind) + (str(8 * d.itemsize) if d.kind != "b" else "")


def _dataset(name: str, source: str, x_train, y_train, x_test, y_test) -> Dataset:
    """Check shapes and labels that came from a file, so the error names the file."""
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        if x.ndim != 4:
            raise NetdslError(f"{source}: {split} images have shape {x.shape}, expected (N, C, H, W) or (N, H, W)")
        if y.ndim != 1 or len(y) != len(x):
            raise NetdslError(f"{source}: {len(x)} {split} images but labels of shape {y.shape}, "
                              f"expected ({len(x)},)")
        if len(x) == 0:
            raise NetdslError(f"{source}: the {split} split is empty")
        if not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
            raise NetdslError(f"{source}: {split} labels must be non-negative integers")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise NetdslError(f"{source}: train images are {x_train.shape[1:]} but test images {x_test.shape[1:]}")
    return Dataset(name, source, {"image": x_train, "label": y_train.astype(np.int64)},
                   {"image": x_test, "label": y_test.astype(np.int64)})


def _images(x: np.ndarray, source: str) -> np.ndarray:
    """uint8 -> [0, 1]; other numbers as float32; (N, H, W) gains a channel axis."""
    if x.dtype == np.uint8:
        x = x.astype(np.float32)
        x /= np.float32(255)
    elif np.issubdtype(x.dtype, np.number) and not np.issubdtype(x.dtype, np.complexfloating):
        x = x.astype(np.float32)
    else:
        raise NetdslError(f"{source}: images have dtype {x.dtype}, expected uint8 or floating point")
    return x[:, None] if x.ndim == 3 else x


# ---------------------------------------------------------------- scikit-learn digits

def load_digits(test_size: int = 360, seed: int = 0) -> Dataset:
    """sklearn's bundled 8x8 digits (1797 images), split by a fixed-seed permutation."""
    from sklearn.datasets import load_digits as sk_digits
    d = sk_digits()
    if not 0 < test_size < len(d.target):
        raise NetdslError(f"digits: test_size must be between 1 and {len(d.target) - 1}, got {test_size}")
    order = np.random.default_rng(seed).permutation(len(d.target))
    x = (d.images / 16.0).astype(np.float32)[:, None]  # pixel values are 0..16
    y = d.target.astype(np.int64)
    test, train = order[:test_size], order[test_size:]
    return _dataset("digits", "sklearn digits", x[train], y[train], x[test], y[test])


# ---------------------------------------------------------------- MNIST-style IDX files

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str, ndim: int | None = None) -> np.ndarray:
    """Read an IDX file (gzipped or not): 0, 0, type code, ndim, big-endian uint32 dims."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
    except FileNotFoundError:
        raise NetdslError(f"IDX file {path} not found") from None
    except (OSError, EOFError, zipfile.BadZipFile) as e:  # gzip.BadGzipFile is an OSError
        raise NetdslError(f"cannot read {path}: corrupt gzip data ({e})") from None
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in _IDX_DTYPES:
        raise NetdslError(f"{path} is not an IDX file: bad magic number {data[:4].hex() or '(empty)'}",
                          hint="expected 00 00 <type> <ndim>, e.g. 00000803 for images, 00000801 for labels")
    dims_n = data[3]
    if ndim is not None and dims_n != ndim:
        raise NetdslError(f"{path}: IDX file has {dims_n} dimensions, expected {ndim}"
                          + (" (images)" if ndim == 3 else " (labels)" if ndim == 1 else ""))
    header = 4 + 4 * dims_n
    if len(data) < header:
        raise NetdslError(f"{path}: truncated IDX header")
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", dims_n, 4))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise NetdslError(f"{path}: IDX header promises shape {dims} ({expected} bytes) "
                          f"but the file has {len(data)} bytes ({'truncated' if len(data) < expected else 'trailing data'})")
    return np.frombuffer(data, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _find(directory: str, names: list[str], what: str) -> str:
    for n in names:
        for candidate in (n, n + ".gz"):
            p = os.path.join(directory, candidate)
            if os.path.isfile(p):
                return p
    hint = (None if os.path.isdir(directory) else f"{directory} is a file; give the directory holding it"
            if os.path.exists(directory) else f"directory {directory} does not exist")
    raise NetdslError(f"{what}: no {names[0]}[.gz] in {directory}", hint=hint)


def load_idx_dir(path: str, name: str = "mnist") -> Dataset:
    """MNIST or Fashion-MNIST: train-/t10k- images-idx3-ubyte and labels-idx1-ubyte."""
    splits = []
    for prefix in ("train", "t10k"):
        # The original MNIST site names them 'train-images-idx3-ubyte'; some mirrors use a dot.
        ip = _find(path, [f"{prefix}-images-idx3-ubyte", f"{prefix}-images.idx3-ubyte"], name)
        lp = _find(path, [f"{prefix}-labels-idx1-ubyte", f"{prefix}-labels.idx1-ubyte"], name)
        x, y = read_idx(ip, 3), read_idx(lp, 1)
        if x.dtype != np.uint8 or y.dtype != np.uint8:
            raise NetdslError(f"{ip if x.dtype != np.uint8 else lp}: expected unsigned-byte IDX data")
        if len(x) != len(y):
            raise NetdslError(f"{ip} holds {len(x)} images but {lp} holds {len(y)} labels")
        splits += [_images(x, ip), y]
    return _dataset(name, path, *splits)


def load_mnist(path: str) -> Dataset:
    return load_idx_dir(path, "mnist")


def load_fashion_mnist(path: str = FASHION_MNIST_DIR) -> Dataset:
    return load_idx_dir(path, "fashion_mnist")


# ---------------------------------------------------------------- CIFAR-10 python batches

class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only plain containers and numpy arrays, so a hostile file cannot run
    code. The CIFAR-10 batches are pickles; this is the only pickle netdsl reads."""
    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): np.zeros(1).__reduce__()[0],
        ("numpy._core.multiarray", "_reconstruct"): np.zeros(1).__reduce__()[0],
        ("numpy.core.multiarray", "scalar"): np.float64(0).__reduce__()[0],
        ("numpy._core.multiarray", "scalar"): np.float64(0).__reduce__()[0],
        ("numpy.core.numeric", "_frombuffer"): np.zeros(1).__reduce_ex__(5)[0],
        ("numpy._core.numeric", "_frombuffer"): np.zeros(1).__reduce_ex__(5)[0],
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): __import__("codecs").encode,  # bytes under protocol 2
    }

    def find_class(self, module, name):
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}") from None


def read_cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    """One batch file: a dict with 'data' (N x 3072 uint8, RGB planes) and 'labels'."""
    try:
        with open(path, "rb") as f:
            d = _ArrayUnpickler(f, encoding="bytes").load()
    except FileNotFoundError:
        raise NetdslError(f"CIFAR-10 batch {path} not found") from None
    except Exception as e:  # a malformed pickle can fail in many ways; all are the file's fault
        raise NetdslError(f"{path} is not a CIFAR-10 python batch: {type(e).__name__}: {e}") from None
    if not isinstance(d, dict):
        raise NetdslError(f"{path} is not a CIFAR-10 python batch (expected a dict)")
    d = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in d.items()}
    if "data" not in d or "labels" not in d:
        raise NetdslError(f"{path}: CIFAR-10 batch lacks 'data' or 'labels' (found {sorted(map(str, d))})")
    x, y = d["data"], np.asarray(d["labels"])
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
        raise NetdslError(f"{path}: 'data' should be a uint8 array of shape (N, 3072), "
                          f"got {getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}")
    if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
        raise NetdslError(f"{path}: expected {len(x)} integer labels, got shape {y.shape}")
    return x.reshape(-1, 3, 32, 32), y.astype(np.int64)


def load_cifar10(path: str) -> Dataset:
    """The directory holding data_batch_1..5 and test_batch (cifar-10-batches-py)."""
    if os.path.isdir(os.path.join(path, "cifar-10-batches-py")):
        path = os.path.join(path, "cifar-10-batches-py")
    if not os.path.isdir(path):
        raise NetdslError(f"cifar10: directory {path} not found",
                          hint="point it at the extracted cifar-10-batches-py directory")
    train = [read_cifar_batch(os.path.join(path, f"data_batch_{i}")) for i in range(1, 6)]
    xt, yt = read_cifar_batch(os.path.join(path, "test_batch"))
    return _dataset("cifar10", path, _images(np.concatenate([b[0] for b in train]), path),
                    np.concatenate([b[1] for b in train]), _images(xt, path), yt)


# ---------------------------------------------------------------- .npz arrays

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
_NPZ_ROLES = {"x": "image", "y": "label"}     # the classic form's field names


def load_npz(path: str) -> Dataset:
    """Arrays named FIELD_train and FIELD_test, one pair per field: FIELD is a spec
    input's name (image_train, label_train, mask_test ...), or x / y for the classic
    x_train, y_train, x_test, y_test form (images and labels; (N, H, W) images gain a
    channel axis). Arrays are converted to their input's dtype when bound (feeds.py):
    uint8 for a float input is read as pixels, x / 255."""
    arrays = read_npz(path, "data file")
    fields: dict[str, dict[str, np.ndarray]] = {}
    stray = []
    for k, a in arrays.items():
        base, _, split = k.rpartition("_")
        if split not in SPLITS or not base:
            stray.append(k)
            continue
        fields.setdefault(base, {})[split] = a
    if stray or not fields:
        raise NetdslError(f"{path}: arrays must be named FIELD_train and FIELD_test; found "
                          + (", ".join(arrays) or "no arrays"),
                          hint="e.g. image_train, label_train, image_test, label_test (the spec's input names), "
                               "or x_train, y_train, x_test, y_test")
    for base, splits in fields.items():
        for split in SPLITS:
            if split not in splits:
                raise NetdslError(f"{path}: '{base}_{next(iter(splits))}' has no '{base}_{split}' beside it",
                                  hint="every field needs both a _train and a _test array")
    classic = set(fields) == {"x", "y"}
    out = {split: {} for split in SPLITS}
    for base, splits in fields.items():
        for split, a in splits.items():
            if a.dtype.kind not in "biuf":
                raise NetdslError(f"{path}: '{base}_{split}' has dtype {a.dtype}; only numbers are read")
            if a.ndim == 0:
                raise NetdslError(f"{path}: '{base}_{split}' is a single number, expected one entry per example")
            if classic and base == "x":
                a = _images(a, path)
            out[split][_NPZ_ROLES[base] if classic else base] = a   # converted for its input by feeds.bind
    if classic:
        return _dataset("npz", path, out["train"]["image"], out["train"]["label"],
                        out["test"]["image"], out["test"]["label"])
    for split in SPLITS:
        lengths = {k: len(a) for k, a in out[split].items()}
        if len(set(lengths.values())) > 1:
            raise NetdslError(f"{path}: the {split} arrays hold different numbers of examples: "
                              + ", ".join(f"{k}_{split} {n}" for k, n in lengths.items()))
        if not max(lengths.values()):
            raise NetdslError(f"{path}: the {split} split is empty")
    for k, a in out["train"].items():
        if a.shape[1:] != out["test"][k].shape[1:]:
            raise NetdslError(f"{path}: '{k}_train' holds examples of shape {a.shape[1:]} but "
                              f"'{k}_test' of shape {out['test'][k].shape[1:]}")
    return Dataset("npz", path, out["train"], out["test"])


# ---------------------------------------------------------------- factory

def load_text(path: str = "pydoc_topics", seq: int = 64) -> Dataset:
    from .text import load_text
    return load_text(path, seq)


_SOURCES = {"digits": load_digits, "mnist": load_mnist, "fashion_mnist": load_fashion_mnist,
            "cifar10": load_cifar10, "npz": load_npz, "text": load_text, "coco": load_coco}
_SOURCES["coco_captions"] = load_coco_captions     # image captioning (datasets/captions.py)


def load_vg(path: str, size=0, max_len: int = 0, min_count: int = 1, max_regions: int = 0,
            train: str = "train", test: str = "val") -> Dataset:
    """Region descriptions in Visual Genome's format (datasets/vg.py), imported on use."""
    from ..datasets.vg import vg
    return vg(path, size=size, max_len=max_len, min_count=min_count, max_regions=max_regions, train=train, test=test)


_SOURCES["vg"] = load_vg        # dense captioning


def make_source(name: str, **kwargs) -> Dataset:
    """Load a data source by name: digits(test_size, seed), mnist(path),
    fashion_mnist(path), cifar10(path), npz(path), text(path, seq) (text.py), and the
    sequence tasks of tasks.py (digit_rows, polarity, copy, echo, count_up,
    translated_digits, recall)."""
    if "path" in kwargs:
        if not isinstance(kwargs["path"], (str, os.PathLike)):
            raise NetdslError(f"data source '{name}': path must be a string, got {kwargs['path']!r}")
        kwargs["path"] = os.path.expanduser(os.fspath(kwargs["path"]))
    from .tasks import SOURCES as tasks     # sequence tasks (tasks.py), made from digits or at random
    return construct(f"data source '{name}'", lookup("data source", name, {**_SOURCES, **tasks}), kwargs)
