"""Sliding-window segmentation against the FCN on the same images: how often their labels
agree, and what the sliding window costs per image (the notes' "very inefficient" as a number).

    python benchmarks/bench_sliding_window.py FCN_RUN SW_RUN [--batch B] [--out FILE]

FCN_RUN and SW_RUN are run directories of `netdsl run specs/det/fcn.net ...` and
`netdsl run specs/det/sliding_window.net ...` trained on the same COCO data (their run.json
says how). The sliding window runs at stride 1 whatever it was trained at (one crop per
pixel: its weights do not depend on the stride). Both label every image of the data's
val split; the script reports the share of pixels on which the two labels agree, each
one's pixel accuracy and mIoU against the truth, the mult-adds per image from each graph
and the inference time per image (the labelling pass over all the images, batch B, timed
after one untimed batch), and their ratios. Prints the report; with --out also writes it.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def load(run: str, sets: dict | None = None, batch: int | None = None):
    """A Trainer holding the run's checkpoint, its data and normalisation (training=False)."""
    from netdsl.cli import data_flag
    from netdsl.lang.elaborate import elaborate
    from netdsl.runtime.sample import read_run_file
    from netdsl.runtime.train import Trainer
    info = read_run_file(run)
    g, loader = elaborate(info["spec"], info["network"], {**info["set"], **(sets or {})})
    cfg = dict(g.train)
    if info.get("data"):
        cfg["data"] = data_flag(info["data"], cfg["data"])
    if batch:
        cfg["batch"] = batch
    t = Trainer(g, cfg, run, "".join(loader.sources.values()), log=lambda s: None, training=False)
    t.resume(os.path.join(run, "checkpoint.npz"))
    return t


def labels(t) -> tuple:
    """(label maps of the test split [N, H, W], seconds per image of the pass that made them)."""
    import numpy as np
    from netdsl.runtime.vision import heads
    out = heads(t.g)["segment"]
    batches = list(t.test_loader)
    n = sum(len(b["image"]) for b in batches)
    t.model.infer(t._feeds(batches[0]), want=[out])      # kernels loaded, workspace planned
    start = time.perf_counter()
    maps = np.concatenate([t.model.infer(t._feeds(b), want=[out])[out].argmax(1) for b in batches])
    return maps, (time.perf_counter() - start) / n


def per_image_macs(g) -> int:
    from netdsl.report import per_example, total_macs
    return int(per_example(total_macs(g)))


def compare(fcn_run: str, sw_run: str, batch: int = 4) -> dict:
    import numpy as np
    from netdsl.datasets.evaluate import confusion, segmentation_scores
    fcn, sw = load(fcn_run, batch=batch), load(sw_run, {"stride": 1}, batch=batch)
    truth = fcn.data.test["label"]
    if sw.data.test["label"].shape != truth.shape or not np.array_equal(sw.data.test["label"], truth):
        raise SystemExit("the two runs were trained on different data: their test labels differ")
    a, ta = labels(fcn)
    b, tb = labels(sw)
    classes = fcn.data.num_classes
    score = {name: segmentation_scores(confusion(m, truth, classes)) for name, m in (("fcn", a), ("sw", b))}
    macs = {"fcn": per_image_macs(fcn.g), "sw": per_image_macs(sw.g)}
    return {"images": len(truth), "size": truth.shape[1:], "agreement": float((a == b).mean()),
            "scores": score, "macs": macs, "seconds": {"fcn": ta, "sw": tb}, "batch": batch,
            "sw_args": dict(sw.g.args), "fcn_args": dict(fcn.g.args)}


def report(r: dict) -> str:
    h, w = r["size"]
    lines = [f"sliding window vs FCN on {r['images']} val images of {w}x{h} (batch {r['batch']})",
             f"  fcn args: {_args(r['fcn_args'])}",
             f"  sliding_window args: {_args(r['sw_args'])}",
             f"  labels agree on {r['agreement']:.4f} of the pixels"]
    for name in ("fcn", "sw"):
        s = r["scores"][name]
        lines.append(f"  {name:<3} vs truth: pixel accuracy {s['pixel_accuracy']:.4f}  mIoU {s['miou']:.4f}")
    m, t = r["macs"], r["seconds"]
    lines.append(f"  mult-adds per image: fcn {m['fcn'] / 1e6:.1f}M  sliding window {m['sw'] / 1e6:.1f}M  "
                 f"ratio {m['sw'] / m['fcn']:.1f}x")
    lines.append(f"  inference per image: fcn {t['fcn'] * 1e3:.2f} ms  sliding window {t['sw'] * 1e3:.1f} ms  "
                 f"ratio {t['sw'] / t['fcn']:.1f}x")
    return "\n".join(lines)


def _args(a: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in a.items() if isinstance(v, (int, float, str, bool)))


def machine() -> str:
    load = os.getloadavg()
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
            f"{platform.python_version()}; load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("fcn_run")
    p.add_argument("sw_run")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--out", help="also write the report to this file")
    a = p.parse_args()
    text = f"# {time.strftime('%Y-%m-%d %H:%M')}  {machine()}\n" + report(compare(a.fcn_run, a.sw_run, a.batch)) + "\n"
    print(text, end="")
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
