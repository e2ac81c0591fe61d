"""Every broken spec under tests/broken/ must fail with the diagnostic its header promises.

Header lines (before the spec text):
  # expect: [FILE:]LINE:COL: error: <substring of the message>   (FILE relative to the spec)
  # hint: <substring>     # note: <substring>     (any number of each)
  # args: <extra CLI arguments>
The CLI must exit 2, print FILE:LINE:COL: error: first, show the source line and a caret,
and never a Python traceback.
"""
import functools
import os
import re
import shlex
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from helpers import ROOT, cli

BROKEN = ROOT / "tests" / "broken"
SPECS = sorted(p for p in BROKEN.rglob("*.net") if p.read_text().startswith("# expect:"))
_EXPECT = re.compile(r"# expect: (?:(?P<file>[^:\s]+):)?(?P<line>\d+):(?P<col>\d+): error: (?P<msg>.+)")


def _header(path: Path) -> dict:
    h = {"hint": [], "note": [], "args": []}
    for line in path.read_text().splitlines():
        if not line.startswith("# "):
            break
        key, _, val = line[2:].partition(": ")
        if key == "expect":
            m = _EXPECT.match(line)
            assert m, f"{path}: malformed expect line {line!r}"
            h["expect"] = m
        elif key in ("hint", "note"):
            h[key].append(val)
        elif key == "args":
            h["args"] = shlex.split(val)
    return h


def _rel(p: Path) -> str:
    return os.path.relpath(p, ROOT)


@functools.cache
def _results() -> dict:
    """Each spec's CLI run; they are independent processes, so run them side by side."""
    with ThreadPoolExecutor(max(2, os.cpu_count() or 2)) as pool:
        runs = {p: pool.submit(cli, "compile", _rel(p), *_header(p)["args"]) for p in SPECS}
    return {p: f.result() for p, f in runs.items()}


def test_corpus_is_large_enough():
    assert len(SPECS) >= 40


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: _rel(p)[len("tests/broken/"):])
def test_broken_spec(spec):
    h = _header(spec)
    m = h["expect"]
    where = _rel(spec.parent / m["file"]) if m["file"] else _rel(spec)
    r = _results()[spec]
    err = r.stderr
    assert "Traceback" not in err + r.stdout, err
    assert r.returncode == 2, f"exit {r.returncode}\n{err}"
    first = err.splitlines()[0]
    assert first.startswith(f"{where}:{m['line']}:{m['col']}: error: "), err
    assert m["msg"] in first, err
    # the offending source line, then a caret under the reported column
    src = (ROOT / where).read_text().splitlines()[int(m["line"]) - 1]
    lines = err.splitlines()
    assert lines[1].endswith(f"| {src}"), err
    caret = lines[2].split("| ", 1)[1]
    assert caret.index("^") == int(m["col"]) - 1, err
    for hint in h["hint"]:
        assert any(l.startswith("hint: ") and hint in l for l in lines), f"hint {hint!r} missing:\n{err}"
    for note in h["note"]:
        assert any(": note: " in l and note in l for l in lines), f"note {note!r} missing:\n{err}"


# ---- files that are not specs at all


@pytest.mark.parametrize("kind", ["missing", "directory", "binary", "empty"])
def test_unreadable_spec_files(tmp_path, kind):
    target = tmp_path / "x.net"
    expect = {"missing": "cannot find", "directory": "is a directory", "binary": "not a text file",
              "empty": "is empty"}[kind]
    if kind == "directory":
        target.mkdir()
    elif kind == "binary":
        target.write_bytes(bytes(range(256)) * 4)
    elif kind == "empty":
        target.write_text("")
    r = cli("compile", target)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith(f"{target}:") and "error: " in r.stderr.splitlines()[0], r.stderr
    assert expect in r.stderr, r.stderr


def test_compile_leaves_no_files(tmp_path):
    """Compiling (successfully or not) writes nothing beside the spec or in the working directory."""
    import shutil
    for name in ("resnet18.net", "lib"):
        src = ROOT / "specs" / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / name)
    shutil.copy(BROKEN / "shape_residual_add.net", tmp_path / "broken.net")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert cli("compile", "resnet18.net", cwd=tmp_path).returncode == 0
    assert cli("compile", "broken.net", cwd=tmp_path).returncode == 2
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
