"""How long `netdsl compile` takes to check each spec.

    python benchmarks/bench_check.py

Per spec: the in-process check (parse, imports, elaboration, shape/parameter/FLOP
inference) after start-up, best of 5, and the whole CLI command in a fresh process
(start-up included). Checking is meant to be interactive.
"""
import glob
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main():
    from netdsl.lang.elaborate import elaborate
    specs = sorted(p for p in glob.glob(os.path.join(ROOT, "specs", "**", "*.net"), recursive=True)
                   if os.sep + "lib" + os.sep not in p)
    print(f"# {time.strftime('%Y-%m-%d')} {os.cpu_count()} cores; check time per spec")
    print(f"{'spec':40s} {'nodes':>6s} {'check ms':>9s} {'cli s':>7s}")
    for p in specs:
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            g, _ = elaborate(p)
            best = min(best, time.perf_counter() - t)
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "netdsl", "compile", p], capture_output=True, check=True, cwd=ROOT)
        cli = time.perf_counter() - t
        print(f"{os.path.relpath(p, os.path.join(ROOT, 'specs')):40s} {len(g.nodes):6d} {best * 1e3:9.1f} {cli:7.2f}")


if __name__ == "__main__":
    main()
