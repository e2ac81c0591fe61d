"""`netdsl render`: Graphviz diagrams of a compiled network.

scene.py decides what to draw (clusters, folded repeats, collapsed blocks, stacked
layers, edges), dot.py how it looks; this module picks the format from the file's
extension, runs Graphviz and writes the file atomically.
"""
from __future__ import annotations

import os
import tempfile

from ..errors import NetdslError
from ..ir.graph import Graph
from .dot import to_dot
from .scene import Scene

FORMATS = {".svg": "svg", ".png": "png", ".pdf": "pdf", ".dot": "dot", ".gv": "dot"}
RANKDIRS = ("TB", "LR", "BT", "RL")
INSTALL_HINT = ("install Graphviz (Debian/Ubuntu: apt-get install graphviz; macOS: brew install graphviz; "
                "conda: conda install -c conda-forge graphviz), or write a .dot file and render it elsewhere")


def render(graph: Graph, output_path, depth: int | None = None, expand: bool = False,
           rankdir: str = "TB", stack: bool = True, legend: bool = True) -> Scene:
    """Draw `graph` to `output_path` (.svg .png .pdf .dot); returns the scene drawn."""
    path = os.fspath(output_path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise NetdslError(f"cannot draw to '{path}': unknown extension '{ext or '(none)'}'",
                          hint="the extension picks the format: " + ", ".join(FORMATS))
    if depth is not None and depth < 0:
        raise NetdslError(f"--depth must be 0 or more, got {depth}")
    if rankdir not in RANKDIRS:
        raise NetdslError(f"--rankdir must be one of {', '.join(RANKDIRS)}, got '{rankdir}'")
    scene = Scene(graph, depth=depth, expand=expand, stack=stack)
    source = to_dot(scene, rankdir=rankdir, legend=legend)
    fmt = FORMATS[ext]
    _write_atomic(path, source.encode("utf-8") if fmt == "dot" else _run_dot(source, fmt))
    return scene


def _run_dot(source: str, fmt: str) -> bytes:
    import graphviz
    try:
        return graphviz.Source(source).pipe(format=fmt)
    except graphviz.ExecutableNotFound:
        raise NetdslError("Graphviz's `dot` program was not found on PATH; it draws the .{} file".format(fmt),
                          hint=INSTALL_HINT) from None
    except graphviz.CalledProcessError as e:
        err = (e.stderr or b"").decode("utf-8", "replace").strip().splitlines()
        raise NetdslError(f"Graphviz failed to draw the {fmt}: " + (err[-1] if err else f"exit status {e.returncode}"),
                          hint="write a .dot file to inspect what was sent to Graphviz") from None


def _write_atomic(path: str, data: bytes):
    """Write next to the target and rename over it, so a reader never sees half a file."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)     # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise NetdslError(f"cannot write '{path}': {e.strerror or e}",
                          hint="check that the folder exists and is writable") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
