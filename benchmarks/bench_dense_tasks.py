"""Issue 14's acceptance: segmentation, classification + localization and pose trained from
the command line on generated COCO-format data, each by its spec's own train { }, then
scored by `netdsl eval` on the held-out val images; the sliding window against the FCN.

    python benchmarks/bench_dense_tasks.py [--data DIR] [--images N] [--only fcn,cls_loc,pose,sliding_window]
                                           [--runs DIR] [--out FILE]

If DIR (default data/shapes) does not exist, `netdsl data shapes DIR --images N --seed 0`
makes it first. Each spec then trains with the command of TASKS below (the small
variant's --set; everything else is the spec's train section, seed included), timed:
wall-clock seconds and the CPU seconds of the training process (user + system, all
threads), so a figure taken while other work shares the machine can be read against
the CPU time it really used. `netdsl eval RUN_DIR` scores each checkpoint; the sliding
window is scored at stride 1 (one crop per pixel) against the truth and against the
FCN's labels by bench_sliding_window.py (one pass over the val images, which also times
both). The report goes to stdout and, with --out, to a file.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# spec -> (subdirectory of the data, the small variant's --set)
TASKS = {
    "fcn": ("", {"size": 64, "classes": 5, "width": 16, "skips": "true"}),
    "cls_loc": ("single", {"size": 64, "classes": 4, "width": 8, "batch_norm": "true", "dropout": 0,
                           "box_weight": 30}),
    "pose": ("pose", {"size": 64, "width": 8, "batch_norm": "true", "dropout": 0}),
    "sliding_window": ("", {"size": 64, "classes": 5, "patch": 17, "stride": 4}),
}
# what each task's acceptance reads from eval.json
FIGURES = {
    "fcn": ("miou", "pixel_accuracy"),
    "cls_loc": ("accuracy", "box_iou", "AP", "AP50", "AP75"),
    "pose": ("PCK@0.2", "AP", "AP50", "AP75"),
}


def netdsl(*args, threads: int | None = None) -> tuple[float, float, subprocess.CompletedProcess]:
    """(wall seconds, CPU seconds of the child, the finished process); threads: the child's
    NUMBA_NUM_THREADS (default: inherited)."""
    env = None if threads is None else {**os.environ, "NUMBA_NUM_THREADS": str(threads)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "netdsl", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                       env=env)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if r.returncode != 0:
        raise SystemExit(f"netdsl {' '.join(map(str, args))} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return wall, cpu, r


class Log(list):
    """The report: each line printed as it comes and kept for --out."""

    def __call__(self, s=""):
        print(s, flush=True)
        self.append(s)


def shapes_data(rel: str, images: int, say) -> tuple[str, dict]:
    """(absolute path, manifest) of the shapes set at `rel`, generated first (seed 0) if missing."""
    data = rel if os.path.isabs(rel) else os.path.join(ROOT, rel)
    if not os.path.exists(data):
        wall, cpu, _ = netdsl("data", "shapes", data, "--images", images, "--seed", 0, "--no-progress")
        say(f"netdsl data shapes {rel} --images {images} --seed 0: {wall:.0f} s wall, {cpu:.0f} s CPU")
    with open(os.path.join(data, "dataset.json")) as f:
        return data, json.load(f)


def main():
    from bench_sliding_window import compare, machine, report
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/shapes")
    p.add_argument("--images", type=int, default=5000, help="images per set when the data is generated")
    p.add_argument("--only", default=",".join(TASKS))
    p.add_argument("--runs", default="runs/bench")
    p.add_argument("--out", help="also write the report to this file")
    a = p.parse_args()
    only = a.only.split(",")
    lines = say = Log([f"# {time.strftime('%Y-%m-%d %H:%M')}  {machine()}"])
    data, m = shapes_data(a.data, a.images, say)
    say(f"data: {a.data}, {m['images']} images of {m['size']}x{m['size']} per set, val fraction "
        f"{m['val_fraction']}, seed {m['seed']}")
    runs = {}
    for name in only:
        sub, sets = TASKS[name]
        run = os.path.join(a.runs, name)
        args = ["run", f"specs/det/{name}.net", *[x for k, v in sets.items() for x in ("--set", f"{k}={v}")],
                "--out", run, "--no-progress"]
        if a.data != "data/shapes":
            args[2:2] = ["--data", f"coco:{os.path.join(data, sub)}"]
        say(f"\n## {name}\nnetdsl {' '.join(args)}")
        wall, cpu, r = netdsl(*args)
        last = json.loads(open(os.path.join(ROOT, run, "metrics.jsonl")).read().splitlines()[-1])
        say(f"  trained in {wall:.0f} s wall ({wall / 60:.1f} min), {cpu:.0f} s CPU; last epoch: "
            + "  ".join(f"{k} {v:.4f}" for k, v in last.items() if k.startswith("test_")))
        runs[name] = os.path.join(ROOT, run)
        if name == "sliding_window":
            continue        # scored at stride 1 by the comparison below (one pass over the val images)
        ev = ["eval", run]
        wall_e, _, r = netdsl(*ev)
        figures = json.load(open(os.path.join(ROOT, run, "eval.json")))
        say(f"netdsl {' '.join(ev)} ({wall_e:.0f} s)")
        say("  " + "  ".join(f"{k} {figures[k]:.4f}" for k in FIGURES[name] if k in figures))
        say("\n".join("  | " + x for x in r.stdout.strip().splitlines()))
    if "fcn" in runs and "sliding_window" in runs:
        say("\n## sliding window vs FCN (benchmarks/bench_sliding_window.py)")
        say(report(compare(runs["fcn"], runs["sliding_window"])))
    if a.out:
        with open(a.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
