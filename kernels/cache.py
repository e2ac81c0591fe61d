"""On-disk home for generated kernel modules, so Numba's own cache applies to them.

Numba cannot cache functions built with `exec` (there is no file to key the cache
on), so each generated module is written to `<cache_dir>/<prefix>_<hash>.py`, named
by the hash of its source, and imported from there. Numba then keeps its compiled
code in `<cache_dir>/__pycache__` keyed on that file, and a later process that
generates the same source imports the same file and loads the machine code instead
of recompiling. Files are never rewritten in place (that would change the mtime
Numba's index checks): a new source gets a new name.
"""
from __future__ import annotations

import hashlib
import importlib.util
import marshal
import sys
from pathlib import Path
from types import ModuleType

from netdsl.cachedir import cache_root, write_atomic  # noqa: F401  (re-exported: kernels use them from here)

_loaded: dict[str, ModuleType] = {}


def cache_dir() -> Path:
    """The generated kernels' folder, `<cache root>/kernels`; created on first use."""
    d = cache_root() / "kernels"
    d.mkdir(parents=True, exist_ok=True)
    return d


def source_hash(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()[:24]


def _code(source: str, path: Path):
    """The module's code object, compiled once and kept beside it (marshal, keyed by the
    interpreter's cache tag). Kept even under PYTHONDONTWRITEBYTECODE: this folder is
    netdsl's own cache, and compiling a process's ~50 generated modules cost 0.05 s."""
    code_path = path.with_suffix(f".{sys.implementation.cache_tag}.code")
    try:
        return marshal.loads(code_path.read_bytes())
    except (OSError, EOFError, ValueError, TypeError):
        code = compile(source, str(path), "exec")
        write_atomic(code_path, marshal.dumps(code))
        return code


def load_source(source: str, prefix: str = "netdsl_k") -> ModuleType:
    """Import `source` as a real module file from the cache directory (memoised)."""
    name = f"{prefix}_{source_hash(source)}"
    if name in _loaded:
        return _loaded[name]
    path = cache_dir() / f"{name}.py"
    if not path.exists() or path.read_text() != source:
        write_atomic(path, source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    # Registered before executing, as a normal import would, so that Numba's
    # cache and pickling can find the module by name.
    sys.modules[name] = module
    try:
        exec(_code(source, path), vars(module))
    except BaseException:
        del sys.modules[name]
        raise
    _loaded[name] = module
    return module
