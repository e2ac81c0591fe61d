"""Weights by name: .safetensors and .npz files in and out, in PyTorch's names.

A spec's parameter paths are already torchvision's for the CNN specs (conv1.weight,
layer1.0.bn1.running_mean, features.0.weight...), so a torchvision state dict loads as
it is. What differs is mapped here, in both directions, by rule:

- `*.num_batches_tracked` (BatchNorm's step counter; netdsl's batch norm uses a fixed
  momentum and never reads it) is dropped on the way in, with a note.
- A recurrent stack (specs/lib/rnn.net's `stacked`: cells at `PRE layerK.SCAN.cell`) is
  nn.LSTM / nn.GRU / nn.RNN's layout, `PRE SCAN.weight_ih_l{K-1}` and so on; a lone cell
  keeps its names, which are nn.LSTMCell's (weight_ih, weight_hh, bias_ih, bias_hh).
- lstm_cell with order="ifog" (the notes' gate order, the default) stacks its rows
  i, f, o, g; torch stacks i, f, g, o. Files hold torch's order: the last two blocks of
  rows are swapped on the way in and out.

Nothing is unpickled: .pt / .pth files are refused with the one-liner that converts them.
A netdsl checkpoint (.npz with __meta__) is read too, its parameters by their own names.
"""
from __future__ import annotations

import json
import os
import re
import struct

import numpy as np

from ..errors import NetdslError, Note

PICKLED = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle", ".tar")
CELLS = ("lstm_cell", "gru_cell", "rnn_cell")
_STACKED = re.compile(r"^(?P<pre>.*?)layer(?P<k>\d+)\.(?P<scan>[^.]+)\.cell\.(?P<w>(?:weight|bias)_(?:ih|hh))$")
_IGNORED = re.compile(r"(^|\.)num_batches_tracked$")


def convert_hint(path) -> str:
    """How to turn a PyTorch pickle into a safetensors file, for this file."""
    path = os.fspath(path)
    out = os.path.splitext(path)[0] + ".safetensors"
    return ("netdsl never unpickles (a pickle can run any code); convert it once in PyTorch: "
            f"python -c \"import torch, safetensors.torch as s; "
            f"s.save_file(torch.load({path!r}, weights_only=True), {out!r})\" "
            "(a whole pickled model: save its .state_dict())")


# ---------------------------------------------------------------- names and layouts

def file_names(g) -> dict[str, str]:
    """netdsl parameter path -> its name in a file (torch's)."""
    out = {}
    for name, p in g.params.items():
        m = _STACKED.match(name)
        if m and p.node is not None and p.node.op in CELLS and int(m["k"]) >= 1:
            out[name] = f"{m['pre']}{m['scan']}.{m['w']}_l{int(m['k']) - 1}"
        else:
            out[name] = name
    return out


def _swap_og(a: np.ndarray) -> np.ndarray:
    """Rows [i, f, o, g] <-> [i, f, g, o] (the same swap both ways)."""
    h = a.shape[0] // 4
    return np.concatenate([a[:2 * h], a[3 * h:], a[2 * h:3 * h]])


def _reordered(g, name: str) -> bool:
    p = g.params[name]
    return p.node is not None and p.node.op == "lstm_cell" and p.node.attrs.get("order", "ifog") == "ifog"


def to_file(g, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A network's parameters and buffers in the file layout (names and gate order)."""
    names = file_names(g)
    return {names[k]: np.ascontiguousarray(_swap_og(v) if _reordered(g, k) else v) for k, v in params.items()}


def from_file(g, arrays: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """A file's arrays under the network's parameter paths, and the names dropped.
    Names that map to nothing stay as they are, so the check lists them as unexpected."""
    back = {f: n for n, f in file_names(g).items()}
    dropped = sorted(k for k in arrays if _IGNORED.search(k) and k not in back)
    out = {}
    for k, v in arrays.items():
        if k in dropped:
            continue
        name = back.get(k, k)
        expected = g.params.get(name)
        if name in g.params and _reordered(g, name) and v.shape == tuple(expected.shape):
            v = _swap_og(v)
        out[name] = v
    return out, dropped


# ---------------------------------------------------------------- reading files

def refuse_pickle(path) -> None:
    """A PyTorch pickle is refused by its extension, before anything is opened."""
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext in PICKLED:
        raise NetdslError(f"{path} is a PyTorch pickle ({ext}); netdsl reads .safetensors and .npz", hint=convert_hint(path))


def by_name(path) -> bool:
    """Whether `path` is a weights file by name rather than a netdsl checkpoint: a
    .safetensors, or an .npz whose members are neither __meta__ nor param/* or opt/*
    (a damaged checkpoint is read as one, to be reported as one)."""
    import zipfile
    if os.path.splitext(os.fspath(path))[1].lower() == ".safetensors":
        return True
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return False
    return bool(names) and not any(n == "__meta__.npy" or n.startswith(("param/", "opt/")) for n in names)


def read_file(path) -> tuple[dict[str, np.ndarray], str]:
    """The named arrays of a weights file and its kind: 'safetensors', 'npz' or
    'checkpoint' (a netdsl checkpoint: its parameters)."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    refuse_pickle(path)
    if not os.path.isfile(path):
        raise NetdslError(f"no weights file at '{path}'")
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(b"PK"):
        return _read_npz(path)
    if ext == ".safetensors":   # (its first byte is the header length's: it may look like a pickle's)
        return _read_safetensors(path), "safetensors"
    if head[:1] == b"\x80":     # pickle protocol 2+: torch.save's legacy format
        raise NetdslError(f"{path} is a pickle", hint=convert_hint(path))
    raise NetdslError(f"{path} is not " + ("an .npz (zip) file" if ext == ".npz" else
                                           f"a weights file: they are .safetensors or .npz, not '{ext or 'no extension'}'"))


def _read_npz(path: str):
    from .checkpoint import load_checkpoint
    from .npyfile import read_npz
    import zipfile
    try:
        with zipfile.ZipFile(path) as zf:
            members = zf.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise NetdslError(f"{path} is damaged: {e}") from None
    if any(m.endswith(".pkl") for m in members):   # torch.save's zip format: data.pkl inside
        raise NetdslError(f"{path} is a PyTorch checkpoint (torch.save: a pickle inside a zip)", hint=convert_hint(path))
    arrays = read_npz(path, "weights file", numeric=True)
    if "__meta__" in arrays or any(k.startswith(("param/", "opt/")) for k in arrays):
        return load_checkpoint(path).params, "checkpoint"
    return arrays, "npz"


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    if "BF16" in _dtypes(path):     # numpy has no bfloat16: read by hand below
        return _read_bf16(path)
    try:
        return load_file(path)
    except (SafetensorError, TypeError, ValueError) as e:
        raise NetdslError(f"{path} is not a readable safetensors file ({str(e)[:120]})") from None
    except OSError as e:
        raise NetdslError(f"cannot read {path}: {e.strerror or e}") from None


def _header(path: str) -> tuple[dict, int]:
    """A safetensors file's JSON header and where its data starts; {} when unreadable
    (the library then says what is wrong)."""
    try:
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            if n > 100 << 20:
                return {}, 0
            h = json.loads(f.read(n))
        return (h, 8 + n) if isinstance(h, dict) else ({}, 0)
    except (OSError, ValueError, struct.error):
        return {}, 0


def _dtypes(path: str) -> set:
    h, _ = _header(path)
    return {v.get("dtype") for k, v in h.items() if k != "__metadata__" and isinstance(v, dict)}


_ST_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4",
              "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?"}


def _read_bf16(path: str) -> dict[str, np.ndarray]:
    """A safetensors file holding bfloat16 tensors, those widened to float32 (exactly:
    bfloat16 is float32's upper half); every tensor's extent checked against the file."""
    header, base = _header(path)
    size = os.path.getsize(path)
    out = {}
    with open(path, "rb") as f:
        for k, info in header.items():
            if k == "__metadata__":
                continue
            try:
                lo, hi = (int(x) for x in info["data_offsets"])
                shape, dt = tuple(int(x) for x in info["shape"]), np.dtype(_ST_DTYPES[info["dtype"]])
            except (KeyError, TypeError, ValueError):
                raise NetdslError(f"{path} is not a readable safetensors file (tensor '{k}': "
                                  f"{json.dumps(info)[:80]})") from None
            if not 0 <= lo <= hi <= size - base or hi - lo != dt.itemsize * int(np.prod(shape, dtype=np.int64)):
                raise NetdslError(f"{path} is damaged: tensor '{k}' does not fit its bytes")
            f.seek(base + lo)
            a = np.frombuffer(f.read(hi - lo), dtype=dt).reshape(shape)
            out[k] = (a.astype(np.uint32) << 16).view(np.float32) if info["dtype"] == "BF16" else a.copy()
    return out


# ---------------------------------------------------------------- loading and saving

def load_named(g, path, log=print) -> dict[str, np.ndarray]:
    """A weights file's arrays under the network's parameter paths, checked: every
    missing, unexpected, wrong-shaped and wrong-typed name listed in one NetdslError."""
    arrays, kind = read_file(path)
    mapped, dropped = (arrays, []) if kind == "checkpoint" else from_file(g, arrays)
    if dropped:
        log(f"note: {path}: ignored {len(dropped)} BatchNorm step counter(s) (num_batches_tracked); "
            "netdsl's batch norm does not use them")
    check_params(g, mapped, f"weights file {path}")
    return mapped


def check_params(g, arrays: dict[str, np.ndarray], what: str) -> None:
    """check_arrays against the network's parameters, without allocating them."""
    from .checkpoint import check_arrays
    check_arrays({k: _Spec(tuple(p.shape), _np_dtype(p.dtype)) for k, p in g.params.items()}, arrays, what)


class _Spec:
    """A parameter's shape and dtype: what check_arrays reads, without allocating it."""
    def __init__(self, shape, dtype):
        self.shape, self.dtype = shape, dtype


def _np_dtype(d: str) -> np.dtype:
    kinds = {"f": "float", "i": "int", "u": "uint"}
    return np.dtype(d if d == "bool" else kinds[d[0]] + d[1:])


def load_into(model, path, log=print) -> None:
    """Load a weights file by name into a Model's parameters and buffers, in place (the
    optimiser holds the same arrays)."""
    from .checkpoint import load_weights
    named = load_named(model.g, path, log)
    host = model.host_params()
    load_weights(host, named)
    for k, v in host.items():
        cur = model.params[k]
        if hasattr(cur, "copy_to_device"):
            cur.copy_to_device(np.ascontiguousarray(v))
        elif cur is not v:
            cur[...] = v


def load_partial(model, path, log=print) -> tuple[list[str], list[str], list[str]]:
    """Load the parameters and buffers of a weights file whose names the network shares,
    in place (--weights FILE --weights-partial: a pretrained trunk under a new head).
    Returns (loaded, kept at their initialiser, the file's names the network lacks).
    Refused, nothing loaded, when no name is shared or a shared name differs in shape,
    kind of dtype or holds NaN/inf: a name that matches but not in shape is a mistake
    (another width, another class count), not something to skip silently."""
    arrays, kind = read_file(path)
    mapped, dropped = (arrays, []) if kind == "checkpoint" else from_file(model.g, arrays)
    if dropped:
        log(f"note: {path}: ignored {len(dropped)} BatchNorm step counter(s) (num_batches_tracked); "
            "netdsl's batch norm does not use them")
    params = model.g.params
    shared = [k for k in params if k in mapped]
    unused = sorted(k for k in mapped if k not in params)
    if not shared:
        raise NetdslError(f"weights file {path} shares no parameter name with the network {model.g.name}",
                          notes=[Note("the network's: " + grouped_names(list(params), 12)),
                                 Note("the file's: " + grouped_names(sorted(mapped), 12))],
                          hint="the names are parameter paths (netdsl compile SPEC --json lists them under "
                               "param_tensors and buffers): give the trunk the same block path in both specs")
    expected = {k: _Spec(tuple(params[k].shape), _np_dtype(params[k].dtype)) for k in shared}
    from .checkpoint import check_arrays
    check_arrays(expected, {k: mapped[k] for k in shared},
                 f"weights file {path} (--weights-partial: the {len(shared)} shared names)")
    bad = [k for k in shared if not np.isfinite(mapped[k]).all()]
    if bad:
        raise NetdslError(f"weights file {path} holds non-finite weights: " + grouped_names(bad, 12),
                          hint="the run that wrote them diverged: take an earlier checkpoint")
    for k in shared:
        cur, v = model.params[k], np.ascontiguousarray(mapped[k], dtype=_np_dtype(params[k].dtype))
        if hasattr(cur, "copy_to_device"):
            cur.copy_to_device(v)
        else:
            cur[...] = v
    return shared, [k for k in params if k not in mapped], unused


def grouped_names(names: list[str], limit: int = 0) -> str:
    """Parameter names grouped by their module, `features.20.bn1.{weight,bias}`; with a
    limit, the first `limit` modules and how many more."""
    groups: dict[str, list[str]] = {}
    for n in names:
        mod, _, leaf = n.rpartition(".")
        groups.setdefault(mod, []).append(leaf)
    out = [(f"{m}.{{{','.join(ls)}}}" if len(ls) > 1 else f"{m}.{ls[0]}") if m else ",".join(ls)
           for m, ls in groups.items()]
    more = len(out) - limit if limit else 0
    return ", ".join(out[:limit] if more > 0 else out) + (f" ... ({more} more modules)" if more > 0 else "")


def save_named(g, params: dict[str, np.ndarray], path, *, metadata: dict | None = None) -> list[str]:
    """Write parameters and buffers by their file names, atomically: .safetensors or .npz
    (the extension picks). Returns the names written."""
    from .checkpoint import atomic_write
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    arrays = to_file(g, params)
    if ext == ".safetensors":
        from safetensors.numpy import save
        blob = save(arrays, metadata={k: str(v) for k, v in (metadata or {}).items()})
        atomic_write(path, lambda f: f.write(blob))
    elif ext == ".npz":
        atomic_write(path, lambda f: np.savez(f, **arrays))
    else:
        raise NetdslError(f"cannot export to '{path}': the extension picks the format, .safetensors or .npz",
                          hint=convert_hint(path) if ext in PICKLED else None)
    return list(arrays)

