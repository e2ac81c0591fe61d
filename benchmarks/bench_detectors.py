"""Issue 15's acceptance: the five detectors trained from the command line on generated COCO
data, each by its spec's own train { }, scored by `netdsl eval` (COCOeval bbox) on the
held-out val images; then the notes' "slow, faster, fastest" as measured times.

    python benchmarks/bench_detectors.py [--data DIR] [--images N] [--only yolo_v1,ssd300,...]
                                         [--runs DIR] [--timing-images K] [--skip-training] [--out FILE]

If DIR (default data/shapes) does not exist, `netdsl data shapes DIR --images N --seed 0`
makes it first, and `netdsl data proposals DIR` its selective search cache if that is
missing (Fast R-CNN and R-CNN read it). Each spec then trains, one after another, with the
command of TASKS below (the small variant's --set; everything else is the spec's train
section, seed included), timed: wall-clock seconds, the CPU seconds of the training
process (user + system, all threads) and each epoch's time from the progress bar, so a
figure taken while other work shares the machine can be read against the CPU time it
really used. `netdsl eval RUN_DIR` scores each checkpoint (box AP@0.5 is COCOeval's AP50).

The timing table: R-CNN, Fast R-CNN and Faster R-CNN share the small backbone (VGG-16's 13
convs at width 8 with batch norm, fc6/fc7 of 512). Inference per image is the detection
graph (training = false) at batch 1 over the first K val images after one untimed image:
for R-CNN it includes warping every proposal (crop_resize, in the graph) and the CNN on each;
Fast R-CNN's and R-CNN's totals add selective search on the same images (the default
`netdsl data proposals` strategy, timed here; the training runs read it from the cache);
Faster R-CNN's proposals come from its RPN, inside the graph. Training per image is the
training run's wall and CPU time over the images it saw (epochs x train images); for
Fast R-CNN and R-CNN add the selective search once per image (cached). The report goes to
stdout and, with --out, to a file.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_dense_tasks import Log, shapes_data, netdsl as _netdsl  # noqa: E402

SMALL_VGG = {"width": 8, "batch_norm": "true", "dropout": 0, "classes": 4}
# spec -> the small variant's --set (also in each spec's header comment)
TASKS = {
    "yolo_v1": {"size": 128, "pools": 3, "hidden": 512, "S": 4, "width": 8, "batch_norm": "true", "dropout": 0,
                "classes": 4},
    "ssd300": {"size": 64, "extras": 2, "width": 8, "batch_norm": "true", "classes": 4},
    # read at 128x128 (conv5 8x8), anchors 24-48 a factor sqrt(2) apart, RPN positives at IoU 0.5
    "faster_rcnn": {"H": 128, "W": 128, "anchor": 24.0, "anchor_step": 1.4142, "rpn_fg_iou": 0.5, **SMALL_VGG},
    "fast_rcnn": {"H": 128, "W": 128, **SMALL_VGG},
    "rcnn": {"size": 32, "rois_per_image": 32, **SMALL_VGG},
}
# the paper's pretraining (sec. 2.2): the first 20 convs trained as a classifier on the single-object
# set, then loaded by name into the detector (--weights-partial), which trains by its spec's train section
PRETRAIN = {"yolo_v1": ("specs/det/yolo_v1_pretrain.net", ("size", "width", "pools", "batch_norm", "classes"))}
TARGETS = {"faster_rcnn": 0.90, "fast_rcnn": 0.85, "rcnn": 0.70, "yolo_v1": 0.85, "ssd300": 0.85}
NAMES = {"faster_rcnn": "Faster R-CNN", "fast_rcnn": "Fast R-CNN", "rcnn": "R-CNN", "yolo_v1": "YOLO v1",
         "ssd300": "SSD"}
NEEDS_PROPOSALS = ("fast_rcnn", "rcnn")
TOOK = re.compile(r"took (\d+):(\d\d):(\d\d)")


def netdsl(*args, threads: int = 2) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds of the child, its stdout + stderr)."""
    wall, cpu, r = _netdsl(*args, threads=threads)
    return wall, cpu, r.stdout + r.stderr


def epoch_seconds(log: str) -> list[int]:
    """Each epoch's training time from the progress bar's 'took H:MM:SS' (test pass excluded)."""
    return [int(h) * 3600 + int(m) * 60 + int(s) for h, m, s in TOOK.findall(log)]


def train_and_eval(name: str, data: str, runs: str, say, threads: int = 2) -> dict:
    run = os.path.join(runs, name)
    args = ["run", f"specs/det/{name}.net", *[x for k, v in TASKS[name].items() for x in ("--set", f"{k}={v}")],
            "--data", f"coco:{data}", "--out", run]
    say(f"\n## {NAMES[name]}")
    wall = cpu = 0.0
    if name in PRETRAIN:
        spec, keys = PRETRAIN[name]
        pre = run + "_pretrain"
        pargs = ["run", spec, *[x for k in keys for x in ("--set", f"{k}={TASKS[name][k]}")],
                 "--data", f"coco:{os.path.join(data, 'single')}", "--out", pre]
        say(f"netdsl {' '.join(pargs)}")
        wall, cpu, plog = netdsl(*pargs, threads=threads)
        say(f"  pretrained in {wall:.0f} s wall, {cpu:.0f} s CPU: "
            + " ".join(x for x in plog.splitlines() if "test_acc" in x)[-80:])
        args += ["--weights", os.path.join(pre, "checkpoint.npz"), "--weights-partial"]
    say(f"netdsl {' '.join(args)}")
    load = os.getloadavg()
    w, c, log = netdsl(*args, threads=threads)
    wall, cpu = wall + w, cpu + c
    rows = [json.loads(x) for x in open(os.path.join(ROOT, run, "metrics.jsonl")).read().splitlines()]
    epochs = epoch_seconds(log)
    say(f"  trained {len(rows)} epochs in {wall:.0f} s wall ({wall / 60:.1f} min), {cpu:.0f} s CPU"
        f"{' with the pretraining' if name in PRETRAIN else ''}; load average "
        f"{load[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
    say(f"  epoch times (training pass, s): {' '.join(map(str, epochs))}")
    last = rows[-1]
    say("  last epoch: " + "  ".join(f"{k} {v:.4f}" for k, v in last.items() if k.startswith("test_")))
    wall_e, _, out = netdsl("eval", run, threads=threads)
    figures = json.load(open(os.path.join(ROOT, run, "eval.json")))
    say(f"netdsl eval {run} ({wall_e:.0f} s)")
    say("\n".join("  | " + x for x in out.strip().splitlines() if "Average" in x or "detections" in x))
    return {"run": os.path.join(ROOT, run), "wall": wall, "cpu": cpu, "epochs": len(rows), "epoch_s": epochs,
            "AP50": figures.get("AP50", 0.0), "AP": figures.get("AP", 0.0)}


# ---------------------------------------------------------------- timing


def load(run: str):
    """A Trainer holding the run's checkpoint in its detection graph (training = false), batch 1."""
    from netdsl.cli import data_flag, load_run_weights
    from netdsl.lang.elaborate import elaborate
    from netdsl.runtime.sample import read_run_file
    from netdsl.runtime.train import Trainer
    info = read_run_file(run)
    g, loader = elaborate(info["spec"], info["network"], {**info["set"], "training": False})
    cfg = {**g.train, "batch": 1}
    if info.get("data"):
        cfg["data"] = data_flag(info["data"], cfg["data"])
    t = Trainer(g, cfg, run, "".join(loader.sources.values()), log=lambda s: None, training=False)
    load_run_weights(t, None, resume=False, fresh=False)     # as netdsl eval: by name after a spec edit
    return t


def infer_seconds(run: str, k: int) -> float:
    """Seconds per image of the detection graph at batch 1 on the first k val images."""
    from netdsl.runtime.detection import detection_outputs
    t = load(run)
    want = list(detection_outputs(t.g).values())
    batches = []
    for b in t.test_loader:
        batches.append(b)
        if len(batches) == k + 1:
            break
    t.model.infer(t._feeds(batches[0]), want=want)      # kernels loaded, workspace planned
    start = time.perf_counter()
    for b in batches[1:]:
        t.model.infer(t._feeds(b), want=want)
    return (time.perf_counter() - start) / (len(batches) - 1)


def search_seconds(data: str, k: int) -> tuple[float, float]:
    """(seconds per image, boxes per image) of selective search as `netdsl data proposals`
    runs it (its default request), on k val images after one untimed."""
    from netdsl.datasets.proposal_cache import open_split, read_image, request
    from netdsl.datasets.proposals import selective_search
    split = open_split(data, "val")
    params = request()
    images = [read_image(split, info)[0] for info in split.images[:k + 1]]

    def search(im):
        return selective_search(im, strategies=params["strategies"], max_boxes=params["max_boxes"],
                                seed=params["seed"], sigma=params["sigma"])
    search(images[0])                                   # untimed: the first call's imports and compiles
    start = time.perf_counter()
    n = sum(len(search(im)) for im in images[1:])
    return (time.perf_counter() - start) / (len(images) - 1), n / (len(images) - 1)


def timing_table(results: dict, data: str, k: int, train_images: int, say):
    os.environ["NUMBA_NUM_THREADS"] = "2"
    ss, boxes = search_seconds(data, k)
    say(f"\n## slow, faster, fastest (same small backbone; {k} val images at batch 1, load average "
        f"{os.getloadavg()[0]:.1f})")
    say(f"selective search (netdsl data proposals' default): {ss * 1e3:.1f} ms per image, {boxes:.0f} boxes per image")
    say(f"{'':<14}{'network ms/img':>16}{'proposals ms/img':>18}{'total ms/img':>14}"
        f"{'train ms/img wall':>19}{'train ms/img CPU':>18}")
    for name in ("rcnn", "fast_rcnn", "faster_rcnn"):
        if name not in results:
            continue
        r = results[name]
        net = infer_seconds(r["run"], k)
        prop = ss if name in NEEDS_PROPOSALS else 0.0
        seen = r["epochs"] * train_images
        say(f"{NAMES[name]:<14}{net * 1e3:>16.1f}{prop * 1e3:>18.1f}{(net + prop) * 1e3:>14.1f}"
            f"{r['wall'] / seen * 1e3 + prop * 1e3:>19.1f}{r['cpu'] / seen * 1e3 + prop * 1e3:>18.1f}")


def main():
    from bench_sliding_window import machine
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/shapes")
    p.add_argument("--images", type=int, default=5000, help="images per set when the data is generated")
    p.add_argument("--only", default=",".join(TASKS))
    p.add_argument("--runs", default="runs/bench")
    p.add_argument("--timing-images", type=int, default=100)
    p.add_argument("--skip-training", action="store_true",
                   help="time (and score) the runs already in --runs instead of training them")
    p.add_argument("--out", help="also write the report to this file")
    p.add_argument("--threads", type=int, default=2,
                   help="NUMBA_NUM_THREADS of the trainings and evals (1 while others share the machine)")
    a = p.parse_args()
    lines = say = Log([f"# {time.strftime('%Y-%m-%d %H:%M')}  {machine()}; {a.threads} threads"])
    data, m = shapes_data(a.data, a.images, say)
    if not all(os.path.exists(os.path.join(data, "proposals", f"selective_search_{s}.npz")) for s in ("train", "val")):
        wall, cpu, _ = netdsl("data", "proposals", data, "--no-progress", threads=1)
        say(f"netdsl data proposals {a.data}: {wall:.0f} s wall, {cpu:.0f} s CPU")
    train_images = len(json.load(open(os.path.join(data, "annotations", "instances_train.json")))["images"])
    say(f"data: {a.data}, {m['images']} images of {m['size']}x{m['size']} ({train_images} train), val fraction "
        f"{m['val_fraction']}, seed {m['seed']}")
    results = {}
    for name in a.only.split(","):
        if a.skip_training:
            run = os.path.join(ROOT, a.runs, name)
            rows = open(os.path.join(run, "metrics.jsonl")).read().splitlines()
            ev = json.load(open(os.path.join(run, "eval.json")))
            results[name] = {"run": run, "wall": float("nan"), "cpu": float("nan"), "epochs": len(rows),
                             "epoch_s": [], "AP50": ev.get("AP50", 0.0), "AP": ev.get("AP", 0.0)}
        else:
            results[name] = train_and_eval(name, a.data, a.runs, say, a.threads)
    say("\n## box AP@0.5 (COCOeval AP50 on the val split) against the targets")
    for name, r in results.items():
        met = "met" if r["AP50"] >= TARGETS[name] else "MISSED"
        say(f"  {NAMES[name]:<13} AP50 {r['AP50']:.3f} (>= {TARGETS[name]:.2f}: {met})  AP {r['AP']:.3f}  "
            f"{r['epochs']} epochs, {r['wall'] / 60:.1f} min wall, {r['cpu'] / 60:.1f} min CPU")
    timing_table(results, data, a.timing_images, train_images, say)
    if a.out:
        with open(a.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
