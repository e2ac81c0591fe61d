"""Shared test helpers: compile a spec file or a snippet, run the CLI."""
import json
import os
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


def script_results(script, modes: dict, timeout: int = 900) -> dict:
    """Run `python SCRIPT MODE` for every mode side by side and return {mode: the JSON of its
    last stdout line}. modes maps a mode to whether it runs under Numba's CUDA simulator
    (NUMBA_ENABLE_CUDASIM must be set before numba is imported: hence a process each)."""
    procs = {}
    for mode, sim in modes.items():
        env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
        if sim:
            env["NUMBA_ENABLE_CUDASIM"] = "1"
        procs[mode] = subprocess.Popen([sys.executable, str(script), mode], stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    out = {}
    for mode, p in procs.items():
        stdout, stderr = p.communicate(timeout=timeout)
        assert p.returncode == 0, stderr[-4000:]
        out[mode] = json.loads(stdout.strip().splitlines()[-1])
    return out
