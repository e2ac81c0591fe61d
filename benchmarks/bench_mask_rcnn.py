"""Issue 15's Mask R-CNN acceptance: the small variant trained from the command line on the
generated shapes (masks; mask AP@0.5 >= 0.85 wanted) and on the generated stick figures
(masks and 14 keypoints; keypoint AP reported), each scored by `netdsl eval` on the
held-out val images.

    python benchmarks/bench_mask_rcnn.py [--data DIR] [--images N] [--only shapes,pose]
                                         [--epochs E] [--runs DIR] [--out FILE]

If DIR (default data/shapes) does not exist, `netdsl data shapes DIR --images N --seed 0`
makes it first. Each run is the spec's train section (adam, cosine, flip, seed 0; the
images read at 128 x 128) with the small variant's --set below, timed: wall-clock seconds
and the CPU seconds of the training process (user + system, all threads), so a figure
taken while other work shares the machine can be read against the CPU time it used.
The report goes to stdout and, with --out, to a file.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_dense_tasks import ROOT, Log, netdsl, shapes_data  # noqa: E402

SMALL = {"H": 128, "W": 128, "width": 8, "anchor": 24.0, "anchor_step": 1.4142, "rpn_fg_iou": 0.5,
         "post_nms": 64, "test_post_nms": 64, "rois_per_image": 64, "mask_rois": 8, "detections": 16,
         "head_roi": 7}
# run -> (subdirectory of the data, the --set beside SMALL, what its acceptance reads from eval.json)
RUNS = {
    "shapes": ("", {"classes": 4, "K": 0}, ("mask_AP50", "mask_AP", "AP50", "AP")),
    "pose": ("pose", {"classes": 1, "K": 14}, ("keypoint_AP", "keypoint_AP50", "mask_AP50", "AP50")),
}


def main():
    from bench_sliding_window import machine
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/shapes")
    p.add_argument("--images", type=int, default=5000, help="images per set when the data is generated")
    p.add_argument("--only", default=",".join(RUNS))
    p.add_argument("--epochs", type=int, help="instead of the train section's")
    p.add_argument("--runs", default="runs/bench")
    p.add_argument("--out", help="also write the report to this file")
    a = p.parse_args()
    import time
    lines = say = Log([f"# {time.strftime('%Y-%m-%d %H:%M')}  {machine()}"])
    data, m = shapes_data(a.data, a.images, say)
    say(f"data: {a.data}, {m['images']} images of {m['size']}x{m['size']} per set, val fraction "
        f"{m['val_fraction']}, seed {m['seed']}")
    for name in a.only.split(","):
        sub, sets, figures = RUNS[name]
        run = os.path.join(a.runs, f"mask_rcnn_{name}")
        args = ["run", "specs/det/mask_rcnn.net", *[x for k, v in {**SMALL, **sets}.items()
                                                    for x in ("--set", f"{k}={v}")],
                "--data", f"coco:{os.path.join(a.data, sub) if sub else a.data}", "--out", run, "--no-progress"]
        if a.epochs:
            args += ["--epochs", a.epochs]
        say(f"\n## {name}\nnetdsl {' '.join(map(str, args))}")
        wall, cpu, _ = netdsl(*args)
        last = json.loads(open(os.path.join(ROOT, run, "metrics.jsonl")).read().splitlines()[-1])
        say(f"  trained in {wall:.0f} s wall ({wall / 60:.1f} min), {cpu:.0f} s CPU; last epoch: "
            + "  ".join(f"{k} {v:.4f}" for k, v in last.items() if k.startswith("test_")))
        ev = ["eval", run]
        wall_e, _, r = netdsl(*ev)
        got = json.load(open(os.path.join(ROOT, run, "eval.json")))
        say(f"netdsl {' '.join(ev)} ({wall_e:.0f} s)")
        say("  " + "  ".join(f"{k} {got[k]:.4f}" for k in figures if k in got))
        say("\n".join("  | " + x for x in r.stdout.strip().splitlines()))
    if a.out:
        with open(a.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
