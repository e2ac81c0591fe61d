"""Checkpoints as plain .npz files (never pickle), written atomically.

Layout: `param/<name>` parameters, `opt/<key>` optimiser state, and `__meta__`, a
UTF-8 JSON document stored as a uint8 array holding step, epoch, the spec hash and
the numpy Generator's bit-generator state. A file handed to `load_checkpoint` is
untrusted: the arrays are read by `npyfile` and the metadata must match `META`, so a
damaged checkpoint is "checkpoint PATH is damaged: ..." and never a crash later on.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..errors import NetdslError, Note
from .npyfile import read_arrays, read_npz  # noqa: F401  (read_npz: data.py imports it from here)

FORMAT = "netdsl-checkpoint"
VERSION = 1
_BIT_GENERATORS = ("PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64")
_INT64_MAX = 2 ** 63 - 1     # steps are saved again as int64 (optimiser state)


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
        return _generator(self.rng_state)

    def restore_rng(self, rng: np.random.Generator) -> None:
        """Put the saved state into `rng` in place (a Loader holds a reference to it);
        the saved bit generator must be of the same kind."""
        saved = self.make_rng().bit_generator
        if type(saved) is not type(rng.bit_generator):
            raise NetdslError(f"checkpoint {self.path} holds a {type(saved).__name__} random-generator state; "
                              f"this run draws from {type(rng.bit_generator).__name__}")
        rng.bit_generator.state = saved.state


def spec_hash(spec_text: str) -> str:
    if not isinstance(spec_text, str):
        raise TypeError(f"spec_text must be str, got {type(spec_text).__name__}")
    return hashlib.sha256(spec_text.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------- the metadata schema

@dataclass(frozen=True)
class Field:
    """One `__meta__` entry: the JSON types it may take and a check of its value that
    returns what is wrong with it, or None."""
    types: tuple[type, ...]
    check: Callable[[object], str | None] = lambda v: None
    required: bool = True


def _count(v) -> str | None:
    return None if 0 <= v <= _INT64_MAX else f"is {v}, expected 0 to 2**63-1"


def _digest(v) -> str | None:
    return None if v is None or re.fullmatch(r"[0-9a-f]{64}", v) else "is not a SHA-256 hex digest"


def _rng_state(v) -> str | None:
    if v is None:
        return None
    try:
        _generator(v)
    except NetdslError as e:
        return e.message
    return None


META = {
    "format": Field((str,)),
    "version": Field((int,)),
    "step": Field((int,), _count),
    "epoch": Field((int,), _count),
    "spec_hash": Field((str, type(None)), _digest),
    "rng": Field((dict, type(None)), _rng_state),
    "extra": Field((dict,), required=False),
}
_JSON_TYPES = {int: "an integer", str: "a string", dict: "an object", type(None): "null"}


def meta_problems(meta: dict) -> list[str]:
    """Everything in `meta` that does not match META, one phrase each."""
    out = [f"'{k}' is missing" for k, f in META.items() if f.required and k not in meta]
    out += [f"unexpected field '{k}'" for k in meta if k not in META]
    for k, f in META.items():
        if k not in meta:
            continue
        v = meta[k]
        if type(v) not in f.types:   # exact types: JSON true is a bool, not the integer 1
            want = " or ".join(_JSON_TYPES[t] for t in f.types)
            out.append(f"'{k}' is {json.dumps(v)[:40]}, expected {want}")
        elif (why := f.check(v)) is not None:
            out.append(f"'{k}' {why}")
    return out


# ---------------------------------------------------------------- RNG state as JSON
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
            dtype = np.dtype(obj["dtype"])
            if dtype.kind not in "iu":   # keys and counters are integers; nothing else is built
                raise ValueError(f"array of {dtype}")
            return np.array(obj["__ndarray__"], dtype=dtype)
        return {k: _from_json(v) for k, v in obj.items()}
    return obj


def _generator(state: dict) -> np.random.Generator:
    """A Generator from a saved state; a NetdslError phrase (no path) when unusable."""
    name = state.get("bit_generator") if isinstance(state, dict) else None
    if name not in _BIT_GENERATORS:
        raise NetdslError(f"'rng' names no known bit generator ({json.dumps(name)[:40]})")
    bg = getattr(np.random, name)()
    try:
        bg.state = _from_json(state)
    except (TypeError, ValueError, KeyError, IndexError, OverflowError, AttributeError, RecursionError) as e:
        raise NetdslError(f"'rng' is not a usable {name} state ({type(e).__name__}: {str(e)[:80]})") from None
    return np.random.Generator(bg)


# ---------------------------------------------------------------- writing

def atomic_write(path, write) -> None:
    """Call write(binary file) on a temp file beside `path`, then rename it over `path`.

    Readers see the old file or the complete new one, never a part. The temp name
    starts with '.' and ends with '.tmp', so a crash leaves nothing that looks like
    a checkpoint; an exception (KeyboardInterrupt included) removes it.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    # The base name is cut so that the temp name stays within NAME_MAX when `path` does.
    tmp = os.path.join(directory, f".{os.path.basename(path)[:200]}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        # os.open rather than mkstemp so the file gets the usual umask-based mode, not 0600.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    except OSError as e:
        raise NetdslError(f"cannot write {path}: {e.strerror or e}") from None
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


def save_checkpoint(path, params: dict[str, np.ndarray], opt_state: dict[str, np.ndarray] | None = None,
                    *, step: int = 0, epoch: int = 0, rng: np.random.Generator | None = None,
                    spec_text: str | None = None, extra: dict | None = None) -> None:
    """Write a checkpoint atomically. `extra` is any JSON-serialisable metadata.
    What would not read back (a negative step, say) is refused before anything is written."""
    meta = {"format": FORMAT, "version": VERSION, "step": int(step), "epoch": int(epoch),
            "spec_hash": spec_hash(spec_text) if spec_text is not None else None,
            "rng": _to_json(rng.bit_generator.state) if rng is not None else None,
            "extra": dict(extra or {})}
    problems = meta_problems(meta)
    if problems:   # the caller's bug, not the user's
        raise ValueError(f"checkpoint metadata would not read back: {'; '.join(problems)}")
    arrays = {f"param/{k}": np.asarray(v) for k, v in params.items()}
    arrays.update({f"opt/{k}": np.asarray(v) for k, v in (opt_state or {}).items()})
    arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    atomic_write(path, lambda f: np.savez(f, **arrays))


# ---------------------------------------------------------------- reading

def load_checkpoint(path, *, spec_text: str | None = None, allow_spec_mismatch: bool = False) -> Checkpoint:
    """Read a checkpoint. With `spec_text`, a checkpoint saved from a different spec is
    an error unless `allow_spec_mismatch` is set."""
    path = os.fspath(path)
    arrays = read_npz(path, "checkpoint")
    meta = _read_meta(arrays.pop("__meta__", None), path)
    stray = [k for k in arrays if not (k.startswith(("param/", "opt/")) and k.partition("/")[2])]
    if stray:
        raise NetdslError(f"checkpoint {path} is damaged: unexpected array(s) {', '.join(map(repr, stray[:5]))}"
                          f"{' ...' if len(stray) > 5 else ''}; a checkpoint holds param/*, opt/* and __meta__")
    ckpt = Checkpoint(path=path, step=meta["step"], epoch=meta["epoch"], spec_hash=meta["spec_hash"],
                      rng_state=meta["rng"], extra=meta.get("extra", {}),
                      params={k[6:]: v for k, v in arrays.items() if k.startswith("param/")},
                      opt_state={k[4:]: v for k, v in arrays.items() if k.startswith("opt/")})
    if spec_text is not None and not allow_spec_mismatch and ckpt.spec_hash != spec_hash(spec_text):
        why = "records no spec hash" if ckpt.spec_hash is None else "was saved from a different spec"
        raise NetdslError(f"checkpoint {path} {why}",
                          hint="edit the spec back, or start a new training from these weights: --weights PATH "
                               "without --resume (netdsl eval and --predict load them by name)")
    return ckpt


def _read_meta(raw: np.ndarray | None, path: str) -> dict:
    if raw is None:
        raise NetdslError(f"{path} is an .npz file but not a netdsl checkpoint (no '__meta__' entry)")
    damaged = f"checkpoint {path} is damaged"
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise NetdslError(f"{damaged}: '__meta__' is {raw.dtype} {list(raw.shape)}, expected UTF-8 bytes (uint8)")
    try:
        meta = json.loads(raw.tobytes().decode("utf-8"))
    except (ValueError, RecursionError) as e:   # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise NetdslError(f"{damaged}: its metadata is not UTF-8 JSON ({str(e)[:80]})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise NetdslError(f"{path} is an .npz file but not a netdsl checkpoint ('__meta__' is not {FORMAT}'s)")
    version = meta.get("version")
    if type(version) is int and version != VERSION:   # another version may have another schema
        raise NetdslError(f"checkpoint {path} has format version {version}, this netdsl reads version {VERSION}")
    problems = meta_problems(meta)
    if problems:
        raise NetdslError(f"{damaged}: {'; '.join(problems)}")
    return meta


def load_weights(params: dict[str, np.ndarray], source: Checkpoint | dict[str, np.ndarray], *,
                 allow_nonfinite: bool = False) -> None:
    """Copy saved weights into `params` in place (dtypes kept), after checking that
    names, shapes and kinds of dtype match exactly; every difference is listed in one
    error and nothing is copied. NaN or infinite weights (a run that diverged before
    it was saved) are refused unless `allow_nonfinite`: nothing can be learnt from them."""
    saved = source.params if isinstance(source, Checkpoint) else source
    what = f"checkpoint {source.path}" if isinstance(source, Checkpoint) else "weights"
    check_arrays(params, saved, what)
    if not allow_nonfinite:
        bad = [(k, int(np.count_nonzero(~np.isfinite(saved[k])))) for k in sorted(params)
               if not np.isfinite(saved[k]).all()]
        if bad:
            raise NetdslError(f"{what} holds non-finite weights: "
                              + ", ".join(f"{k} ({n} NaN/inf)" for k, n in bad[:5]) + (" ..." if len(bad) > 5 else ""),
                              hint="the run diverged before this was saved: resume from an earlier checkpoint, "
                                   "or lower the learning rate and train again")
    for k, p in params.items():
        p[...] = saved[k]


def check_arrays(expected: dict[str, np.ndarray], got: dict[str, np.ndarray], what: str) -> None:
    """Compare names, shapes and dtype kinds; raise one NetdslError with a note per problem."""
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    both = sorted(set(expected) & set(got))
    wrong = [k for k in both if tuple(got[k].shape) != tuple(expected[k].shape)]
    kinds = [k for k in both if got[k].dtype.kind != expected[k].dtype.kind]   # float32 <- float64 is fine
    if not (missing or extra or wrong or kinds):
        return
    notes = ([Note(f"missing: {k} (expected shape {tuple(expected[k].shape)})") for k in missing]
             + [Note(f"unexpected: {k} (shape {tuple(got[k].shape)})") for k in extra]
             + [Note(f"wrong shape: {k} is {tuple(got[k].shape)}, expected {tuple(expected[k].shape)}")
                for k in wrong]
             + [Note(f"wrong dtype: {k} is {got[k].dtype}, expected {expected[k].dtype}") for k in kinds])
    counts = ", ".join(f"{n} {label}" for n, label in
                       ((len(missing), "missing"), (len(extra), "unexpected"), (len(wrong), "wrong-shaped"),
                        (len(kinds), "wrong-typed")) if n)
    raise NetdslError(f"{what} does not match the network: {counts}", notes=notes,
                      hint="was it saved from a different spec?")
