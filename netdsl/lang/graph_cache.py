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
import json
import os
import sys
from pathlib import Path

from ..cachedir import cache_root, write_atomic
from ..ir import serial
from ..ir.graph import Graph, Node

FORMAT = 2             # 1 was pickle
MAX_ENTRIES = 256      # past this, the least recently used half is removed
MAX_BYTES = 256 << 20  # an entry larger than this is not read (no real graph comes near)

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
    return cache_root() / "graphs"


def _in_order(g: Graph) -> list[Node]:
    """Every node in schedule order, a scan's body before the scan."""
    out = []
    for n in g.nodes:
        if n.body is not None:
            out += _in_order(n.body)
        out.append(n)
    return out


class Entry:
    """The cache entry for one elaboration request: a JSON header line (key, files read,
    the body's hash), then the graph as JSON (netdsl/ir/serial.py). Never pickle: an
    entry anyone could write is read as data, and one that does not check out is a miss."""

    def __init__(self, path: str, network: str | None, overrides: dict | None):
        self.key = repr((FORMAT, sys.version, _front_end(), os.getcwd(), os.path.abspath(path), path, network,
                         sorted((overrides or {}).items())))
        self.file = _directory() / (hashlib.sha256(self.key.encode()).hexdigest()[:32] + ".json")

    def load(self) -> tuple[Graph, Sources] | None:
        """(graph, sources) if the entry exists, checks out, and every file it read is unchanged."""
        try:
            with open(self.file, "rb") as f:
                if os.fstat(f.fileno()).st_size > MAX_BYTES:
                    return None
                head, _, body = f.read().partition(b"\n")
            key, files, digest = json.loads(head)
            if key != self.key or type(files) is not list:
                return None
            sources = {}
            for shown, real, text_digest in files:
                with open(shown, encoding="utf-8") as src:    # as the parser reads it
                    text = src.read()
                if _digest(text) != text_digest or os.path.realpath(shown) != real:
                    return None
                sources[shown] = text
            if hashlib.sha256(body).hexdigest() != digest:
                return None
            g = serial.decode(json.loads(body))
            os.utime(self.file)         # recently used: kept when the directory is pruned
        except Exception:   # absent, unreadable, truncated, garbled, hostile: elaborate afresh
            return None
        return g, Sources(sources)

    def store(self, g: Graph, sources: dict[str, str]):
        """Write the entry (atomically); a graph the format cannot hold is just not cached."""
        try:
            files = [(shown, os.path.realpath(shown), _digest(text)) for shown, text in sources.items()]
            body = json.dumps(serial.encode(g), separators=(",", ":")).encode()
        except (serial.Unencodable, RecursionError, ValueError):
            return
        head = json.dumps([self.key, files, hashlib.sha256(body).hexdigest()]).encode()
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.file, head + b"\n" + body)
            _prune(self.file.parent)
        except OSError:     # a read-only or full cache directory only costs the next start
            pass


def _prune(d: Path):
    for old in d.glob("*.pickle"):    # entries of format 1, which is never read again
        try:
            old.unlink()
        except OSError:
            pass
    files = list(d.glob("*.json"))
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
