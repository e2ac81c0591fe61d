"""Detectors are scored and drawn (issue 15): the detections of an `nms` (and Mask R-CNN's
masks) become a COCO results file in the original images' pixels, padding rows never
written, and datasets/evaluate.py's figures are COCOeval's own on that file; masks are
pasted as torchvision's paste_masks_in_image pastes them; `netdsl eval` and `--predict`
run Faster R-CNN's small variant (random weights, the checkpoint of its training graph
loaded into its training=false graph) and a tiny detector with a mask head end to end;
each of several losses reaches the progress bar and metrics.jsonl."""
import contextlib
import io
import json
import math
import re
import shutil
import sys
from types import SimpleNamespace

import numpy as np
import pytest

import tvref
from helpers import SPECS, cli, compile_spec
from netdsl.errors import NetdslError

SIZE = 64
FASTER = SPECS / "det" / "faster_rcnn.net"
SMALL = {"H": SIZE, "W": SIZE, "width": 8, "anchor": 16.0, "classes": 4}    # the shapes' 4 categories

# a detector small enough to run in a blink: an RPN on a stride-16 map, a box head, NMS, and
# (with_masks) Mask R-CNN's inference-time mask branch on the detections, logits [N, D, 14, 14]
TINY = """import "{lib}"

network tiny_det(classes = 4, D = 16, with_masks = false) {{
  input image: f32[N, 3, 64, 64]
  features = image -> conv(8, k=3, s=4, p=1) -> relu -> conv(8, k=3, s=4, p=1) -> relu
  anchors = anchors(features, sizes=[16.0, 32.0], ratios=[1.0], stride=16)
  scores, deltas = rpn(features, 2, mid=8, name="rpn")
  rois = proposals(scores, deltas, anchors, pre_nms=32, post_nms=16, iou=0.7, image=[image.H, image.W])
  logits, box_deltas = roi_align(features, rois, out=7, scale=1.0 / 16, sampling=2) -> flatten
                       -> linear(16, name="fc") -> relu -> box_predictor(classes, name="head")
  det_boxes, det_scores, det_labels = detect(logits, box_deltas, rois, 16, max_out=D)
  output det_boxes, det_scores, det_labels
  if with_masks {{
    masks = roi_align(features, to_rois(det_boxes), out=14, scale=1.0 / 16, sampling=2)
            -> conv(classes + 1, k=1, name="mask") -> select_class(det_labels -> reshape([-1]))
    output masks = masks -> reshape([-1, D, 14, 14])
  }}
}}
"""


def sets(overrides):
    return [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "shapes"
    r = cli("data", "shapes", out, "--images", 20, "--size", SIZE, "--no-progress")
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def detect_set(shapes, tmp_path_factory):
    """The shapes set with boxes only: coco() reads it as task 'detect'."""
    out = tmp_path_factory.mktemp("data") / "boxes"
    shutil.copytree(shapes / "images", out / "images")
    (out / "annotations").mkdir()
    for split in ("train", "val"):
        d = json.loads((shapes / "annotations" / f"instances_{split}.json").read_text())
        for a in d["annotations"]:
            del a["segmentation"]
        (out / "annotations" / f"instances_{split}.json").write_text(json.dumps(d))
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("spec") / "tiny_det.net"
    path.write_text(TINY.format(lib=SPECS / "lib" / "det.net"))
    return path


def cocoeval(gt_json, results_json, kind):
    """pycocotools called directly: COCOeval's stats on the file."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_json))
        E = COCOeval(gt, gt.loadRes(str(results_json)), kind)
        E.evaluate()
        E.accumulate()
        E.summarize()
    return E.stats.tolist()


def make_run(run, spec, data, overrides=(), seed=0, edit=None):
    """A run directory as `netdsl run` leaves it, with the network's initial weights
    (from the graph it trains: the training = true one where the spec has that switch)."""
    from netdsl.lang.elaborate import elaborate
    from netdsl.runtime.checkpoint import save_checkpoint
    from netdsl.runtime.model import Model
    from netdsl.runtime.sample import write_run_file
    g, sources = elaborate(str(spec), None, dict(overrides))
    params = Model(g, seed=seed).host_params()
    if edit:
        edit(params)
    run.mkdir(parents=True, exist_ok=True)
    save_checkpoint(run / "checkpoint.npz", params, {"step": np.array(0)}, spec_text="".join(sources.sources.values()),
                    rng=np.random.default_rng(0))
    write_run_file(str(run), str(spec), None, dict(overrides), f"coco:{data}")
    return run


def hand_made(ds, D=16, seed=0, masks=False):
    """Detections of the val images in the padded layout of `nms`: each object's box
    jittered (its class, or now and then a wrong one), a false positive, then padding
    rows, label -1; some padding rows carry a score and a box, which must not matter."""
    rng = np.random.default_rng(seed)
    gb, gl = ds.test["boxes"], ds.test["labels"]
    n = len(gb)
    boxes, scores = np.zeros((n, D, 4), np.float32), np.zeros((n, D), np.float32)
    labels = np.full((n, D), -1, np.int64)
    for k in range(n):
        real = np.flatnonzero(gl[k] >= 1)
        m = len(real)
        boxes[k, :m] = gb[k, real] + rng.normal(0, 1.0, (m, 4))
        labels[k, :m] = np.where(rng.random(m) < 0.2, rng.integers(1, 5, m), gl[k, real])
        boxes[k, m] = [5, 5, 25, 30]                                  # a false positive
        labels[k, m] = rng.integers(1, 5)
        scores[k, :m + 1] = rng.uniform(0.3, 1.0, m + 1)
        boxes[k, m + 1:] = [1, 1, 60, 60]                              # padding with a box and a score
        scores[k, m + 1:] = 0.9
    out = {"det_boxes": boxes, "det_scores": scores, "det_labels": labels}
    if masks:
        out["masks"] = rng.normal(0, 1, (n, D, 14, 14)).astype(np.float32)
    return out


def fake_trainer(tiny, ds, **overrides):
    return SimpleNamespace(g=compile_spec(tiny, **overrides), data=ds)


def served(arrays):
    return lambda t, names: {n: arrays[n] for n in names}


# ---------------------------------------------------------------- results and figures

def test_detections_score_as_cocoeval_on_the_results_file(tmp_path, detect_set, tiny):
    from netdsl.datasets.coco import coco
    from netdsl.datasets.evaluate import STATS
    from netdsl.runtime.detection import evaluate_detections
    ds = coco(str(detect_set))
    assert ds.task == "detect"
    dets = hand_made(ds)
    figures, report = evaluate_detections(fake_trainer(tiny, ds), str(tmp_path), served(dets))
    path = tmp_path / "results.json"
    results = json.loads(path.read_text())
    real = dets["det_labels"] >= 1
    assert len(results) == real.sum() == figures["detections"]          # padding rows never written
    per_image = {}
    for r in results:
        per_image[r["image_id"]] = per_image.get(r["image_id"], 0) + 1
    assert [per_image.get(i, 0) for i in ds.meta["test"]["image_ids"].tolist()] == real.sum(1).tolist()
    # category ids are the file's (mapped back from classes 1..4), scores as given
    cats = ds.category_ids
    want = sorted((cats[c - 1], round(float(s), 5)) for c, s in zip(dets["det_labels"][real], dets["det_scores"][real]))
    assert sorted((r["category_id"], r["score"]) for r in results) == want
    direct = cocoeval(ds.meta["test"]["file"], path, "bbox")
    assert [figures[k] for k in STATS["bbox"]] == direct
    assert 0 < figures["AP50"] < 1
    assert any("COCOeval bbox" in line for line in report)


def test_nothing_detected_writes_no_results_file(tmp_path, detect_set, tiny):
    from netdsl.datasets.coco import coco
    from netdsl.runtime.detection import evaluate_detections
    ds = coco(str(detect_set))
    dets = hand_made(ds)
    dets["det_labels"][:] = -1                                      # every row padding
    (tmp_path / "results.json").write_text("[]")                    # an earlier evaluation's
    figures, report = evaluate_detections(fake_trainer(tiny, ds), str(tmp_path), served(dets))
    assert not (tmp_path / "results.json").exists()
    assert figures["detections"] == 0
    assert figures["AP"] == figures["AP50"] == figures["AR100"] == 0.0   # every object missed
    assert any("no detections" in line for line in report)


def test_a_class_outside_the_data_is_an_error(detect_set, tiny, tmp_path):
    from netdsl.datasets.coco import coco
    from netdsl.runtime.detection import evaluate_detections
    ds = coco(str(detect_set))
    dets = hand_made(ds)
    dets["det_labels"][0, 0] = 7
    with pytest.raises(NetdslError, match="detects class 7, but the data has 4 categories"):
        evaluate_detections(fake_trainer(tiny, ds), str(tmp_path), served(dets))


def test_boxes_map_back_to_the_original_pixels(tmp_path, shapes):
    """Read at another size (non-square), the truth's boxes mapped back are the file's;
    written as results they are perfect detections: AP 1."""
    from pycocotools.coco import COCO
    from netdsl.datasets import results as coco_results
    from netdsl.datasets.coco import coco
    from netdsl.datasets.evaluate import evaluate
    ds = coco(str(shapes), task="detect", size=[40, 56])
    assert ds.test["image"].shape[2:] == (40, 56)
    back = coco_results.to_original(ds, "test", ds.test["boxes"])
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(ds.meta["test"]["file"])
    for k, image_id in enumerate(ds.meta["test"]["image_ids"].tolist()):
        anns = [a["bbox"] for a in gt.imgToAnns[image_id] if not a.get("iscrowd", 0)]
        want = np.array([[x, y, x + w, y + h] for x, y, w, h in anns]).reshape(-1, 4)
        np.testing.assert_allclose(back[k, :len(want)], want, atol=1e-4)
    res = coco_results.box_results(ds, "test", ds.test["boxes"], ds.test["labels"], np.ones(ds.test["labels"].shape))
    assert len(res) == (ds.test["labels"] >= 1).sum()
    coco_results.write(str(tmp_path / "r.json"), res)
    figures, _ = evaluate(ds.meta["test"]["file"], str(tmp_path / "r.json"), "bbox")
    assert figures["AP"] == 1.0


def test_paste_masks_is_torchvisions():
    ns = tvref.load()
    if ns is None:
        pytest.skip(tvref.SKIP_REASON)
    import torch
    from netdsl.datasets.results import paste_masks
    tv = sys.modules["torchvision"]
    if not hasattr(tv, "_is_tracing"):      # the bare package tvref registers lacks it (torchvision/__init__.py)
        tv._is_tracing = lambda: False
    rng = np.random.default_rng(0)
    D, M, H, W = 60, 28, 50, 70
    masks = rng.random((D, M, M), dtype=np.float32)
    # boxes overlapping the image (torchvision's slicing assumes it: its detections are clipped),
    # some across its edges, one under a pixel wide
    x1, y1 = rng.uniform(-4, W - 8, D), rng.uniform(-4, H - 8, D)
    boxes = np.stack([x1, y1, x1 + rng.uniform(6, 40, D), y1 + rng.uniform(6, 30, D)], 1).astype(np.float32)
    boxes[0] = [3, 4, 3.2, 4.1]
    want = roi_paste(ns, torch, masks, boxes, H, W)
    got = paste_masks(masks, boxes, H, W)
    np.testing.assert_allclose(got, want, atol=2e-6)
    assert ((got > 0.5) == (want > 0.5)).all()
    assert paste_masks(masks[:0], boxes[:0], H, W).shape == (0, H, W)


def roi_paste(ns, torch, masks, boxes, H, W):
    """torchvision.models.detection.roi_heads.paste_masks_in_image (pure PyTorch; its
    package registered bare by tvref.load)."""
    import importlib
    roi_heads = importlib.import_module("torchvision.models.detection.roi_heads")
    return roi_heads.paste_masks_in_image(torch.from_numpy(masks)[:, None], torch.from_numpy(boxes),
                                          (H, W)).numpy()[:, 0]


def test_masks_score_as_cocoeval_segm(tmp_path, shapes, tiny):
    """Each object's own mask, cropped to its box at 14 x 14 and given as logits, pasted
    back: COCOeval segm on results_segm.json, the same figures as pycocotools directly."""
    from PIL import Image
    from pycocotools.coco import COCO
    from netdsl.datasets.coco import coco
    from netdsl.datasets.evaluate import STATS
    from netdsl.runtime.detection import evaluate_detections
    ds = coco(str(shapes))
    assert ds.task == "segment"
    dets = hand_made(ds, masks=True)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(ds.meta["test"]["file"])
    for k, image_id in enumerate(ds.meta["test"]["image_ids"].tolist()):
        anns = [a for a in gt.imgToAnns[image_id] if not a.get("iscrowd", 0)]
        for g, a in enumerate(anns):
            x, y, w, h = a["bbox"]
            dets["det_boxes"][k, g] = [x, y, x + w, y + h]
            dets["det_labels"][k, g] = ds.category_ids.index(a["category_id"]) + 1
            crop = gt.annToMask(a)[int(y):int(math.ceil(y + h)), int(x):int(math.ceil(x + w))]
            m = np.asarray(Image.fromarray(crop * 255).resize((14, 14), Image.BILINEAR)) / 255
            dets["masks"][k, g] = (m - 0.5) * 20                       # logits
    figures, _ = evaluate_detections(fake_trainer(tiny, ds, with_masks=True), str(tmp_path), served(dets))
    direct = cocoeval(ds.meta["test"]["file"], tmp_path / "results_segm.json", "segm")
    assert [figures["mask_" + k] for k in STATS["segm"]] == direct
    assert [figures[k] for k in STATS["bbox"]] == cocoeval(ds.meta["test"]["file"], tmp_path / "results.json", "bbox")
    assert figures["mask_AP50"] > 0.5                                 # the masks land on their objects
    results = json.loads((tmp_path / "results_segm.json").read_text())
    assert len(results) == (dets["det_labels"] >= 1).sum()
    assert all(r["segmentation"]["size"] == [SIZE, SIZE] for r in results)


def test_inference_graph_is_the_training_false_one():
    from netdsl.lang.elaborate import elaborate
    from netdsl.runtime.detection import detection_outputs, inference_graph
    g, src = elaborate(str(FASTER), None, dict(SMALL))
    gi, _ = inference_graph(str(FASTER), None, dict(SMALL), {}, g, src.sources)
    assert gi.args["training"] is False and not gi.losses and list(gi.inputs) == ["image"]
    assert {k: p.shape for k, p in gi.params.items()} == {k: p.shape for k, p in g.params.items()}
    assert detection_outputs(gi) == {"boxes": "boxes", "scores": "det_scores", "labels": "det_labels"}
    same, _ = inference_graph(str(FASTER), None, dict(SMALL), {"training": True}, g, src.sources)
    assert same is g                                      # the command's own --set training wins
    fcn = compile_spec("det/fcn.net")
    assert inference_graph("", None, {}, {}, fcn, {})[0] is fcn


def test_faster_rcnn_reference_shapes_kept():
    """The small-variant parameters leave the paper's network as it was at their defaults."""
    g = compile_spec(FASTER)
    assert g.inputs["image"].shape[2:] == (600, 1000)
    assert [n.params["weight"].shape[0] for n in g.nodes if n.op == "conv"][:13] == [
        64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    assert g.params["classifier.0.weight"].shape == (4096, 512 * 7 * 7)
    small = compile_spec(FASTER, **SMALL)
    assert sorted(small.params) == sorted(g.params)
    (a,) = [n for n in small.nodes if n.op == "anchors"]
    assert tuple(a.attrs["sizes"]) == (16.0, 32.0, 64.0)


# ---------------------------------------------------------------- from the command line

@pytest.fixture(scope="module")
def faster_run(detect_set, tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("runs") / "faster", FASTER, detect_set, SMALL)


def test_faster_rcnn_random_weights_eval_from_the_cli(faster_run, detect_set, shapes):
    from netdsl.datasets.evaluate import evaluate
    r = cli("eval", faster_run)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    figures = json.loads((faster_run / "eval.json").read_text())
    gt = detect_set / "annotations" / "instances_val.json"
    direct, table = evaluate(str(gt), str(faster_run / "results.json"), "bbox")
    assert {k: figures[k] for k in direct} == direct
    assert all(math.isfinite(v) and -1 <= v <= 1 for v in direct.values())
    assert table.strip().splitlines()[1] in r.stdout                  # COCOeval's table is printed
    results = json.loads((faster_run / "results.json").read_text())
    assert len(results) == figures["detections"] <= 4 * 100
    assert {x["category_id"] for x in results} <= {1, 2, 3, 4}
    # the segmentation set's boxes serve as well (--data overrides the run's)
    r = cli("eval", faster_run, "--data", f"coco:{shapes}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "COCOeval bbox" in r.stdout


def test_faster_rcnn_predict_draws_detections(faster_run, detect_set, tmp_path):
    from PIL import Image
    images = detect_set / "images" / "val"
    one = sorted(images.iterdir())[0]
    base = ["run", FASTER, *sets(SMALL), "--data", f"coco:{detect_set}", "--weights", faster_run / "checkpoint.npz",
            "--out", tmp_path]
    r = cli(*base, "--predict", one, "--score-threshold", "0")
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    pic = Image.open(tmp_path / "predict" / (one.stem + ".png"))
    assert pic.size == (320, 320)                                     # 64 pixels enlarged 5 times
    (rec,) = json.loads((tmp_path / "predict" / "predictions.json").read_text())
    assert rec["file"] == str(one) and 0 < len(rec["detections"]) <= 100
    scores = [d["score"] for d in rec["detections"]]
    assert scores == sorted(scores, reverse=True)
    for d in rec["detections"]:
        assert d["label"] in ("circle", "square", "triangle", "star") and len(d["box"]) == 4
    r = cli(*base, "--predict", images, "--score-threshold", "1")    # random weights are never that sure
    assert r.returncode == 0, r.stderr[-3000:]
    recs = json.loads((tmp_path / "predict" / "predictions.json").read_text())
    assert len(recs) == len(list(images.iterdir())) and all(x["detections"] == [] for x in recs)
    r = cli(*base, "--predict", one, "--score-threshold", "1.5")
    assert r.returncode == 2 and "--score-threshold must be between 0 and 1" in r.stderr


def test_mask_detector_from_the_cli(tiny, shapes, tmp_path):
    from netdsl.datasets.evaluate import evaluate
    run = make_run(tmp_path / "run", tiny, shapes, {"with_masks": True})
    r = cli("eval", run)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    figures = json.loads((run / "eval.json").read_text())
    gt = str(shapes / "annotations" / "instances_val.json")
    direct, _ = evaluate(gt, str(run / "results_segm.json"), "segm")
    assert {"mask_" + k: v for k, v in direct.items()} == {"mask_" + k: figures["mask_" + k] for k in direct}
    assert "COCOeval segm" in r.stdout and "COCOeval bbox" in r.stdout
    out = tmp_path / "p"
    one = sorted((shapes / "images" / "val").iterdir())[0]
    r = cli("run", tiny, "--set", "with_masks=true", "--data", f"coco:{shapes}", "--weights", run / "checkpoint.npz",
            "--out", out, "--predict", one, "--score-threshold", "0")
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert (out / "predict" / (one.stem + ".png")).is_file()
    # a background score far above the rest: nothing is detected, and the earlier files go
    def background(params):
        params["head.cls_score.bias"][0] = 50.0
    make_run(run, tiny, shapes, {"with_masks": True}, edit=background)
    r = cli("eval", run)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert "no detections" in r.stdout
    assert not (run / "results.json").exists() and not (run / "results_segm.json").exists()
    figures = json.loads((run / "eval.json").read_text())
    assert figures["detections"] == 0 and figures["AP"] == 0.0 and figures["mask_AP"] == 0.0


# ---------------------------------------------------------------- several losses, each shown

def test_each_loss_in_the_progress_bar_and_metrics(tmp_path):
    out = tmp_path / "run"
    r = cli("run", SPECS / "det" / "cls_loc.net", *sets({"size": 32, "width": 8, "classes": 4, "box_weight": 2.0}),
            "--data", "synthetic:4", "--epochs", 1, "--batch", 2, "--out", out)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert re.search(r"loss \S+  cls \S+  box \S+", r.stderr)             # the bar: total, then each loss
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    for split in ("train", "test"):
        parts = rec[f"{split}_cls_loss"], rec[f"{split}_box_loss"]
        assert all(math.isfinite(v) for v in parts)
        assert rec[f"{split}_loss"] == pytest.approx(parts[0] + 2.0 * parts[1], rel=1e-6)


def test_faster_rcnn_shows_its_four_losses(tmp_path):
    out = tmp_path / "run"
    r = cli("run", FASTER, *sets({**SMALL, "G": 4}), "--data", "synthetic:4", "--epochs", 1, "--batch", 2,
            "--out", out)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert re.search(r"loss \S+  rpn_cls \S+  rpn_box \S+  cls \S+  box \S+", r.stderr)
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert all(math.isfinite(rec[f"train_{k}_loss"]) for k in ("rpn_cls", "rpn_box", "cls", "box"))
