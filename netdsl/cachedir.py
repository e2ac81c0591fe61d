"""Where netdsl keeps what it caches, and how it writes there.

Shared by the front end (parser tables, elaborated graphs) and the kernels (generated
modules, the native store) without either importing the other's package.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def cache_root() -> Path:
    """Where netdsl caches anything: `$NETDSL_CACHE_DIR`, else `~/.cache/netdsl`. Kernels
    go in `kernels/`, elaborated graphs in `graphs/`, parser tables at the top."""
    return Path(os.environ.get("NETDSL_CACHE_DIR") or Path.home() / ".cache" / "netdsl")


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write beside the target and rename: concurrent writers of the same content
    race harmlessly, and a reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
