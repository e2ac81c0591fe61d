"""A cache of elaborated graphs: a warm start need not import the parser or elaborate.

An entry is keyed by everything elaboration depends on: the spec path as given and
the working directory (positions name files relative to it), the network and the
argument overrides, the Python version, and the front end (a hash of the sources of
netdsl/lang, netdsl/ir, netdsl/ops and errors.py, and Lark's install stamp). It lists each file elaboration
read, with its real path and a hash of its text; a hit re-reads every one and must
find it unchanged, so editing an imported file invalidates the entry. Only successful
elaborations are stored: a spec with an error is elaborated, and reported, each time.
Entries live in `$NETDSL_CACHE_DIR/graphs` (default `~/.cache/netdsl/graphs`).
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import pickle
import sys
from pathlib import Path

from ..ir.graph import Graph, Node

FORMAT = 1
MAX_ENTRIES = 256      # past this, the least recently used half is removed

_NETDSL = Path(__file__).resolve().parent.parent
_FRONT_END = ("lang", "ir", "ops", "errors.py")
_front_end_digest: str | None = None


class Sources:
    """What elaborate() returns beside the graph: each file it read, shown name -> text."""

    def __init__(self, sources: dict[str, str]):
        self.sources = sources


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _front_end() -> str:
    """Hash of the code that turns spec text into a graph (once per process, ~1 ms):
    netdsl's, and which Lark is installed (its path and stamp; importing it to ask
    its version would cost what a hit saves)."""
    global _front_end_digest
    if _front_end_digest is None:
        h = hashlib.sha256()
        lark = importlib.util.find_spec("lark")
        if lark is not None and lark.origin:
            h.update(f"{lark.origin}:{os.stat(lark.origin).st_mtime_ns}\0".encode())
        for part in _FRONT_END:
            p = _NETDSL / part
            for f in sorted(p.iterdir()) if p.is_dir() else [p]:
                if f.suffix in (".py", ".lark"):
                    h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
        _front_end_digest = h.hexdigest()
    return _front_end_digest


def _directory() -> Path:
    from netdsl.kernels.cache import cache_root
    return cache_root() / "graphs"


def _in_order(g: Graph) -> list[Node]:
    """Every node in schedule order, a scan's body before the scan. Pickled first, they
    keep pickle's recursion shallow (each input's producer is already written), where
    the graph's outputs first would recurse through the whole network."""
    out = []
    for n in g.nodes:
        if n.body is not None:
            out += _in_order(n.body)
        out.append(n)
    return out


class Entry:
    """The cache entry for one elaboration request."""

    def __init__(self, path: str, network: str | None, overrides: dict | None):
        self.key = repr((FORMAT, sys.version, _front_end(), os.getcwd(), os.path.abspath(path), path, network,
                         sorted((overrides or {}).items())))
        self.file = _directory() / (hashlib.sha256(self.key.encode()).hexdigest()[:32] + ".pickle")

    def load(self) -> tuple[Graph, Sources] | None:
        """(graph, sources) if the entry exists and every file it read is unchanged."""
        try:
            with open(self.file, "rb") as f:
                key, files = pickle.load(f)
                if key != self.key:
                    return None
                sources = {}
                for shown, real, digest in files:
                    with open(shown, encoding="utf-8") as src:    # as the parser reads it
                        text = src.read()
                    if _digest(text) != digest or os.path.realpath(shown) != real:
                        return None
                    sources[shown] = text
                _, g = pickle.load(f)
            os.utime(self.file)         # recently used: kept when the directory is pruned
        except Exception:   # absent, unreadable, truncated, written by other code: elaborate afresh
            return None
        return g, Sources(sources)

    def store(self, g: Graph, sources: dict[str, str]):
        """Write the entry (atomically); a graph that cannot be pickled is just not cached."""
        try:
            files = [(shown, os.path.realpath(shown), _digest(text)) for shown, text in sources.items()]
            data = (pickle.dumps((self.key, files), pickle.HIGHEST_PROTOCOL)
                    + pickle.dumps((_in_order(g), g), pickle.HIGHEST_PROTOCOL))
        except Exception:   # e.g. a graph too deep for pickle's recursion
            return
        from ..kernels.cache import write_atomic
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.file, data)
            _prune(self.file.parent)
        except OSError:     # a read-only or full cache directory only costs the next start
            pass


def _prune(d: Path):
    files = list(d.glob("*.pickle"))
    if len(files) <= MAX_ENTRIES:
        return
    ages = []
    for f in files:
        try:
            ages.append((f.stat().st_mtime, f))
        except OSError:     # removed meanwhile by another process
            pass
    for _, f in sorted(ages)[:len(ages) // 2]:
        try:
            f.unlink()
        except OSError:
            pass
