"""Issue 15's dense captioning figure: densecap.net's small variant trained from the
command line on `netdsl data shapes-regions` (Visual Genome's format) within a wall-clock
budget, then `netdsl eval`: the share of held-out ground-truth regions matched by a
detection (IoU >= 0.5) whose greedy caption is the region's phrase, BLEU-4 of the matched
captions and COCOeval's box AP.

    python benchmarks/bench_densecap.py [--images 2000] [--epochs 30] [--minutes 20]
                                        [--threads 2] [--data DIR] [--run DIR] [--out FILE]

Training runs `--epochs` epochs or until `--minutes` of wall clock have passed, whichever
comes first: then it is interrupted and the last finished epoch's checkpoint (written
after every epoch) is evaluated. Wall-clock and CPU seconds and the load average are
reported beside the figures: other work sharing the machine stretches the first.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the small variant (specs/det/densecap.net's header, docs/cli.md)
SMALL = {"size": 64, "width": 8, "stride": 8, "anchor": 8.0, "hidden": 256, "vocab": 20, "embed": 32, "H": 64,
         "rois_per_image": 32, "pre_nms": 600, "post_nms": 64, "test_nms": 32, "coordconv": "true",
         "batch_norm": "true", "dropout": 0.0, "feed_code": "true"}


def sets() -> list[str]:
    return [a for k, v in SMALL.items() for a in ("--set", f"{k}={v}")]


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data", default=os.path.join(ROOT, "data", "shapes_regions"))
    ap.add_argument("--run", default=os.path.join(ROOT, "runs", "densecap"))
    ap.add_argument("--out")
    a = ap.parse_args()
    env = {**os.environ, "NUMBA_NUM_THREADS": str(a.threads)}
    lines = [f"# bench_densecap.py, {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores, "
             f"NUMBA_NUM_THREADS={a.threads}, load average at start {load()}"]
    print(lines[0], flush=True)
    py = [sys.executable, "-m", "netdsl"]
    gen = [*py, "data", "shapes-regions", a.data, "--images", str(a.images), "--seed", "0", "--no-progress"]
    subprocess.run(gen, cwd=ROOT, check=True, env=env)
    train = [*py, "run", "specs/det/densecap.net", *sets(), "--data", f"vg:{a.data}", "--epochs", str(a.epochs),
             "--batch", str(a.batch), "--lr", str(a.lr), "--seed", "0", "--out", a.run, "--no-progress"]
    lines.append("$ " + " ".join(train[2:]).replace(sys.executable, "python"))
    print(lines[-1], flush=True)
    c0, t0 = cpu_seconds(), time.perf_counter()
    p = subprocess.Popen(train, cwd=ROOT, env=env)
    try:
        p.wait(timeout=a.minutes * 60)
        stopped = False
    except subprocess.TimeoutExpired:       # the budget is spent: stop, keep the last epoch's checkpoint
        p.send_signal(signal.SIGTERM)       # (a background job ignores SIGINT; checkpoints are written atomically)
        p.wait()
        stopped = True
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    with open(os.path.join(a.run, "metrics.jsonl")) as f:
        last = [json.loads(l) for l in f if l.strip().endswith("}")][-1]     # a line cut by the stop is left out
    lines.append(f"training: {last['epoch']} epochs of {a.images - round(a.images * 0.2)} images "
                 f"({'stopped at the budget' if stopped else 'finished'}), {wall / 60:.1f} min wall, {cpu:.0f} s CPU, "
                 f"load average after {load()}")
    lines.append("last epoch: " + "  ".join(f"{k} {v:.4f}" for k, v in last.items() if k.endswith("_loss")))
    t1 = time.perf_counter()
    r = subprocess.run([*py, "eval", a.run], cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"netdsl eval failed:\n{r.stderr[-3000:]}")
    with open(os.path.join(a.run, "eval.json")) as f:
        fig = json.load(f)
    lines.append(f"netdsl eval ({time.perf_counter() - t1:.0f} s): caption_match {fig['caption_match']:.4f}  "
                 f"localized {fig['localized']:.4f}  bleu4 {fig['bleu4']:.4f}  box AP50 {fig.get('AP50', float('nan')):.4f}"
                 f"  AP {fig.get('AP', float('nan')):.4f}")
    lines += ["", r.stdout.rstrip()]
    print("\n".join(lines[-3:]), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
