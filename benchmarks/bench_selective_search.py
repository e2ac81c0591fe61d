"""Selective search's recall on the shapes set: the issue's "recall at IoU 0.5 for 2,000 proposals".

    python benchmarks/bench_selective_search.py [DIR] [--split val] [--out FILE]

DIR is a COCO-format set (default: `netdsl data shapes` with 200 images, seed 0, made in a
temporary directory). For each configuration, selective search (netdsl/datasets/proposals.py)
runs on every image of the split; the script prints the share of the split's ground-truth
boxes that one of each image's best K proposals overlaps by IoU >= 0.5 (and >= 0.7), for
K = 100, 500, 1000, 2000, the boxes per image, and the seconds per image (wall, and CPU of
this process). Configurations: the default (the paper's "fast": HSV and Lab, similarities
C+T+S+F and T+S+F, k = 50, 100), the same at finer scales (k = 10, 20) and the paper's
"quality" (80 strategies). With --out the report is also written to FILE.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

KS = (100, 500, 1000, 2000)
CONFIGS = (("fast, k 50,100 (default)", dict(strategies="fast")),
           ("fast, k 10,20", dict(strategies="fast", k=(10, 20))),
           ("quality, k 50..300", dict(strategies="quality")))


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    load = " ".join(f"{v:.1f}" for v in os.getloadavg())
    return (f"{time.strftime('%Y-%m-%d %H:%M')}  {cpu}, {os.cpu_count()} cores, Python {platform.python_version()}; "
            f"load average {load}")


def measure(split, kwargs) -> dict:
    import numpy as np
    from netdsl.datasets.proposal_cache import box_iou, read_image
    from netdsl.datasets.proposals import selective_search
    hits = {(t, k): 0 for t in (0.5, 0.7) for k in KS}
    total = boxes = 0
    wall = cpu = 0.0
    for info in split.images:
        rgb, _ = read_image(split, info)
        w0, c0 = time.perf_counter(), time.process_time()
        b = selective_search(rgb, max_boxes=max(KS), **kwargs)
        wall += time.perf_counter() - w0
        cpu += time.process_time() - c0
        boxes += len(b)
        g = split.gt[info["id"]]
        total += len(g)
        for k in KS:
            best = box_iou(g, b[:k].astype(np.float64)).max(1) if len(g) else np.zeros(0)
            for t in (0.5, 0.7):
                hits[t, k] += int((best >= t).sum())
    n = len(split.images)
    return {"recall": {key: v / total for key, v in hits.items()}, "boxes": boxes / n, "wall": wall / n,
            "cpu": cpu / n, "images": n, "gt": total}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", nargs="?", help="COCO-format data set (default: a generated shapes set)")
    ap.add_argument("--split", default="val")
    ap.add_argument("--out", help="also write the report here")
    args = ap.parse_args()
    lines = [f"# {machine()}"]
    with tempfile.TemporaryDirectory() as tmp:
        root = args.dir
        if root is None:
            root = os.path.join(tmp, "shapes")
            cmd = [sys.executable, "-m", "netdsl", "data", "shapes", root, "--images", "200", "--seed", "0",
                   "--no-progress"]
            subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
            lines.append("data: netdsl data shapes DIR --images 200 --seed 0 (64x64; val split)")
        from netdsl.datasets.proposal_cache import open_split
        split = open_split(root, args.split)
        lines.append(f"split {args.split}: {len(split.images)} images, {sum(len(g) for g in split.gt.values())} "
                     f"ground-truth boxes")
        head = "".join(f"{'R@' + str(k):>8}" for k in KS)
        lines.append(f"{'configuration':<28}{'IoU':>5}{head}{'boxes/img':>11}{'s/img wall':>12}{'s/img CPU':>11}")
        print("\n".join(lines), flush=True)
        for name, kwargs in CONFIGS:
            r = measure(split, kwargs)
            for t in (0.5, 0.7):
                row = f"{name if t == 0.5 else '':<28}{t:>5}" + "".join(f"{r['recall'][t, k]:>8.3f}" for k in KS)
                if t == 0.5:
                    row += f"{r['boxes']:>11.0f}{r['wall']:>12.3f}{r['cpu']:>11.3f}"
                lines.append(row)
                print(row, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
