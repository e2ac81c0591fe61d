"""Shared test helpers: compile a spec file or a snippet, run the CLI."""
import subprocess
import sys
from pathlib import Path

from netdsl.lang.elaborate import elaborate

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"


def compile_spec(name_or_path, network=None, **overrides):
    p = Path(name_or_path)
    if not p.exists():
        p = SPECS / name_or_path
    g, _ = elaborate(str(p), network, overrides)
    return g


def compile_text(tmp_path, text, name="t.net", network=None, **overrides):
    p = Path(tmp_path) / name
    p.write_text(text)
    g, _ = elaborate(str(p), network, overrides)
    return g


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "netdsl", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd or ROOT)
