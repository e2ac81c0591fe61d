"""Mask R-CNN trains and detects (issue 15): coco() gives each object's mask and keypoints
(gt_masks, gt_keypoints), the small variant's mask and keypoint losses are torchvision's
maskrcnn_loss and keypointrcnn_loss (pure Python, through tests/tvref.py) on the same
RoIs and head outputs, one training step runs from the CLI on a tiny generated set (masks
on the shapes, masks and 14 keypoints on the stick figures), `netdsl eval` prints COCOeval
segm (and keypoints) tables and `--predict` draws a PNG."""
import json
import math

import numpy as np
import pytest

import tvref
from helpers import SPECS, cli
from netdsl.errors import NetdslError

SPEC = SPECS / "det" / "mask_rcnn.net"
SIZE = 64
# the small variant (the spec's comment, docs/cli.md): masks only on the shapes...
SMALL = {"H": SIZE, "W": SIZE, "width": 8, "anchor": 16.0, "classes": 4, "K": 0, "post_nms": 64,
         "test_post_nms": 64, "rois_per_image": 32, "detections": 16, "head_roi": 7}
# ...and masks with the 14 keypoints of the stick figures (one class, person)
POSE = {**SMALL, "classes": 1, "K": 14}
LOSSES = ["rpn_cls", "rpn_box", "cls", "box", "mask"]

TV = tvref.load()
needs_tv = pytest.mark.skipif(TV is None, reason=tvref.SKIP_REASON)


def sets(overrides):
    return [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "shapes"
    r = cli("data", "shapes", out, "--images", 12, "--size", SIZE, "--no-progress")
    assert r.returncode == 0, r.stderr
    return out


def graph(**overrides):
    from netdsl.lang.elaborate import elaborate
    g, _ = elaborate(str(SPEC), None, {**SMALL, **overrides})
    return g


# ---- the data

def test_coco_gives_each_objects_mask_and_keypoints(shapes):
    from netdsl.datasets import cocofile
    from netdsl.datasets.coco import coco
    ds = coco(shapes, masks=True)
    c = cocofile.load(str(shapes / "annotations" / "instances_train.json"))
    masks, labels = ds.train["masks"], ds.train["labels"]
    assert masks.dtype == np.float32 and masks.shape == (*labels.shape, SIZE, SIZE)
    for k, image_id in enumerate(ds.meta["train"]["image_ids"].tolist()):
        anns = c.imgToAnns[image_id]
        for g, a in enumerate(anns):
            np.testing.assert_array_equal(masks[k, g], c.annToMask(a))
        assert not masks[k, len(anns):].any() and (labels[k, len(anns):] == -1).all()
    # the stick figures: person_keypoints_* found without ann=, read per object (not as pose)
    pose = coco(shapes / "pose", masks=True, keypoints=True, size=2 * SIZE)
    c = cocofile.load(str(shapes / "pose" / "annotations" / "person_keypoints_train.json"))
    kp = pose.train["keypoints"]
    assert pose.task == "segment" and kp.shape == (len(kp), pose.max_objects, 14, 3)
    assert pose.keypoint_names[-2:] == ["head", "neck"] and pose.skeleton
    for k, image_id in enumerate(pose.meta["train"]["image_ids"].tolist()):
        (a,) = c.imgToAnns[image_id]
        want = np.asarray(a["keypoints"], np.float32).reshape(14, 3) * np.float32([2, 2, 1])
        np.testing.assert_allclose(kp[k, 0], want, rtol=1e-6)
        assert not kp[k, 1:].any() and pose.train["masks"][k, 0].sum() > 0


def test_per_object_fields_need_per_object_data(shapes):
    from netdsl.datasets.coco import coco
    with pytest.raises(NetdslError, match="task 'localize'"):
        coco(shapes / "single", masks=True, task="localize")
    with pytest.raises(NetdslError, match="exactly one category with keypoints"):
        coco(shapes, keypoints=True)


def test_flip_moves_masks_and_keypoints(shapes):
    from netdsl.datasets.coco import coco
    ds = coco(shapes / "pose", masks=True, keypoints=True)
    fields = {f: ds.train[f][:3] for f in ("image", "boxes", "labels", "masks", "keypoints")}
    out = ds.flip(fields)
    np.testing.assert_array_equal(out["masks"], fields["masks"][..., ::-1])
    kp, got = fields["keypoints"][:, 0], out["keypoints"][:, 0]
    names = ds.keypoint_names
    left, right = names.index("left_wrist"), names.index("right_wrist")
    np.testing.assert_allclose(got[:, right, 0], SIZE - kp[:, left, 0])
    np.testing.assert_array_equal(got[:, right, 1:], kp[:, left, 1:])
    assert (out["keypoints"][:, 1:] == 0).all()          # padding rows stay zeros


def test_the_spec_asks_for_masks_and_keypoints(shapes):
    """train.load_data asks coco() for masks (and keypoints at K > 0) when the spec declares
    gt_masks (gt_keypoints); feeds.bind pairs them."""
    from netdsl.lang.training import TrainCall
    from netdsl.runtime.feeds import bind
    from netdsl.runtime.train import load_data
    ds = load_data(graph(), {"data": TrainCall("coco", {"path": str(shapes)})}, 0)
    assert bind(graph(), ds) == {"image": "image", "gt_boxes": "boxes", "gt_labels": "labels", "gt_masks": "masks"}
    ds = load_data(graph(**POSE), {"data": TrainCall("coco", {"path": str(shapes / "pose")})}, 0)
    assert bind(graph(**POSE), ds)["gt_keypoints"] == "keypoints"


def test_full_size_keeps_the_paper_and_k0_drops_the_keypoint_head():
    from netdsl.lang.elaborate import elaborate
    g, _ = elaborate(str(SPEC), None, {})
    assert g.inputs["gt_masks"].shape[2:] == (800, 800) and "gt_keypoints" in g.inputs
    assert [l.name for l in g.losses] == LOSSES + ["keypoint"]
    g0 = graph()
    assert "gt_keypoints" not in g0.inputs and [l.name for l in g0.losses] == LOSSES
    assert not any(k.startswith("keypoint_head") for k in g0.params)
    inf, _ = elaborate(str(SPEC), None, {**SMALL, "training": False})
    assert inf.outputs["masks"].shape[1:] == (16, 14, 14) and "keypoints" not in inf.outputs


# ---- the losses against torchvision's

def _run_heads(g, feeds):
    """The spec's mask (and keypoint) loss, with the RoIs, labels, matches and head
    outputs they were computed from."""
    from netdsl.runtime.model import Model
    sel = next(n for n in g.nodes if n.op == "select_class" and n.inputs[0].rank == 4)
    targets = next(n for n in g.nodes if n.op == "mask_targets")
    sample = next(n for n in g.nodes if n.op == "sample_rois")
    want = ["mask", sel.inputs[0], targets.outputs[0], *(sample.outputs[i] for i in (0, 1, 3))]
    if "keypoint" in [l.name for l in g.losses]:
        want += ["keypoint", next(l for l in g.losses if l.name == "keypoint").value.producer.inputs[0]]
    out = Model(g, seed=3).infer(feeds, want)
    return [out[w] for w in want]


def _per_image(rois, labels, matched, N):
    """Per image: (rows of its positive RoIs, their boxes, their gt indices)."""
    for n in range(N):
        rows = np.flatnonzero((labels > 0) & (rois[:, 0] == n))
        yield n, rows, rois[rows, 1:], matched[rows]


@needs_tv
def test_mask_loss_is_torchvisions_maskrcnn_loss(shapes):
    """The network's mask targets and mask loss on two images with different object counts
    against roi_heads.maskrcnn_loss on the same positive RoIs, per-class mask logits and
    gt (each image's real objects only)."""
    import torch
    from netdsl.datasets.coco import coco
    ds = coco(shapes, masks=True)
    g = graph()
    counts = (ds.train["labels"] >= 0).sum(1)
    i = int(np.argmax(counts > 0))
    j = int(np.argmax((counts > 0) & (counts != counts[i])))
    idx = [i, j]
    feeds = {"image": ds.train["image"][idx], "gt_boxes": ds.train["boxes"][idx],
             "gt_labels": ds.train["labels"][idx], "gt_masks": ds.train["masks"][idx]}
    loss, logits, targets, rois, labels, matched = _run_heads(g, feeds)
    assert logits.shape[1:] == (5, 14, 14) and (labels > 0).sum() >= 2
    pos_logits, boxes, gt_masks, gt_labels, idxs = [], [], [], [], []
    for n, rows, b, m in _per_image(rois, labels, matched, 2):
        G = counts[idx[n]]
        want = tvref.project_masks_on_boxes(torch.tensor(feeds["gt_masks"][n, :G]), torch.tensor(b),
                                            torch.tensor(m), 14).numpy()
        np.testing.assert_allclose(targets[rows], want, atol=2e-5)
        pos_logits.append(logits[rows])
        boxes.append(torch.tensor(b))
        gt_masks.append(torch.tensor(feeds["gt_masks"][n, :G]))
        gt_labels.append(torch.tensor(feeds["gt_labels"][n, :G]))
        idxs.append(torch.tensor(m))
    assert (targets[labels <= 0] == 0).all()
    m = TV.roi_heads
    original = m.roi_align          # the C++ op's wrapper: the pure-Python RoIAlign instead, as tvref does

    def pure(input, rois, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False):
        return tvref.roi_align(input, rois, spatial_scale, output_size, sampling_ratio, aligned)

    m.roi_align = pure
    try:
        want = m.maskrcnn_loss(torch.tensor(np.concatenate(pos_logits)), boxes, gt_masks, gt_labels, idxs)
    finally:
        m.roi_align = original
    assert float(loss) == pytest.approx(float(want), rel=1e-5)


@needs_tv
def test_keypoint_loss_is_torchvisions_keypointrcnn_loss(shapes):
    """The 14-keypoint variant's keypoint loss on two stick-figure images against
    roi_heads.keypointrcnn_loss (keypoints_to_heatmap, a softmax over the 28 x 28 cells)
    on the same positive RoIs and heatmaps."""
    import torch
    from netdsl.datasets.coco import coco
    ds = coco(shapes / "pose", masks=True, keypoints=True)
    g = graph(**POSE)
    idx = [0, 1]
    feeds = {"image": ds.train["image"][idx], "gt_boxes": ds.train["boxes"][idx],
             "gt_labels": ds.train["labels"][idx], "gt_masks": ds.train["masks"][idx],
             "gt_keypoints": ds.train["keypoints"][idx]}
    _, _, _, rois, labels, matched, loss, heat = _run_heads(g, feeds)
    heat = heat.reshape(len(rois), 14, 28, 28)
    rows, boxes, kps, idxs = [], [], [], []
    for n, r, b, m in _per_image(rois, labels, matched, 2):
        rows.append(r)
        boxes.append(torch.tensor(b))
        kps.append(torch.tensor(feeds["gt_keypoints"][n, :1]))
        idxs.append(torch.tensor(m))
    assert sum(map(len, rows)) >= 2
    want = TV.roi_heads.keypointrcnn_loss(torch.tensor(heat[np.concatenate(rows)]), boxes, kps, idxs)
    assert float(loss) == pytest.approx(float(want), rel=1e-5)


# ---- from the command line

def _one_step(shapes, data, overrides, run):
    r = cli("run", SPEC, *sets(overrides), "--data", f"coco:{data}", "--epochs", 1, "--batch", 4,
            "--threads", 1, "--out", run, "--no-progress")
    assert r.returncode == 0, r.stderr
    rec = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    return r, rec


def test_trains_evaluates_and_draws_from_the_cli(shapes, tmp_path):
    run = tmp_path / "run"
    r, rec = _one_step(shapes, shapes, SMALL, run)
    for split in ("train", "test"):
        for loss in LOSSES:
            assert math.isfinite(rec[f"{split}_{loss}_loss"]), (split, loss, rec)
    assert "keypoint" not in r.stdout
    r = cli("eval", run)
    assert r.returncode == 0, r.stderr
    assert "COCOeval bbox" in r.stdout and "COCOeval segm" in r.stdout, r.stdout
    figures = json.loads((run / "eval.json").read_text())
    figures = figures.get("figures", figures)
    assert "mask_AP50" in json.dumps(figures)
    image = sorted((shapes / "images" / "val").glob("*.png"))[0]
    r = cli("run", SPEC, *sets(SMALL), "--data", f"coco:{shapes}", "--out", run, "--predict", image,
            "--score-threshold", 0)
    assert r.returncode == 0, r.stderr
    assert (run / "predict" / image.name).stat().st_size > 0
    rec = json.loads((run / "predict" / "predictions.json").read_text())
    assert "detections" in json.dumps(rec)


def test_keypoint_head_trains_and_is_scored_from_the_cli(shapes, tmp_path):
    run = tmp_path / "pose"
    _, rec = _one_step(shapes, shapes / "pose", POSE, run)
    assert math.isfinite(rec["train_keypoint_loss"]) and math.isfinite(rec["train_mask_loss"])
    r = cli("eval", run)
    assert r.returncode == 0, r.stderr
    assert "COCOeval keypoints" in r.stdout or "no keypoints results file" in r.stdout, r.stdout
    image = sorted((shapes / "pose" / "images" / "val").glob("*.png"))[0]
    r = cli("run", SPEC, *sets(POSE), "--data", f"coco:{shapes / 'pose'}", "--out", run, "--predict", image,
            "--score-threshold", 0)
    assert r.returncode == 0, r.stderr
    assert (run / "predict" / image.name).exists()


# ---- keypoints from heatmaps, scored by COCOeval

def test_heatmap_peaks_become_keypoints_that_cocoeval_scores(shapes, tmp_path):
    """Heatmaps peaking at each true keypoint's cell of its person's box give keypoints
    within half a cell of the truth; as COCO results (instance_keypoint_results, mapped
    back to the file's pixels) they score keypoint AP 1 with COCOeval."""
    from netdsl.datasets import results
    from netdsl.datasets.coco import coco
    from netdsl.datasets.evaluate import evaluate
    ds = coco(shapes / "pose", masks=True, keypoints=True, size=2 * SIZE)
    S, split = 56, ds.test
    boxes, kp = split["boxes"][:, :1], split["keypoints"][:, :1]
    n = len(boxes)
    heat = np.zeros((n, 1, 14, S, S), np.float32)
    x1, y1, x2, y2 = (boxes[..., i, None] for i in range(4))
    ix = np.clip(((kp[..., 0] - x1) / (x2 - x1) * S).astype(int), 0, S - 1)
    iy = np.clip(((kp[..., 1] - y1) / (y2 - y1) * S).astype(int), 0, S - 1)
    for k in range(n):
        heat[k, 0, np.arange(14), iy[k, 0], ix[k, 0]] = 5.0
    got = results.heatmap_keypoints(heat, boxes)
    assert got.shape == (n, 1, 14, 3) and (got[..., 2] == 5).all()
    cell = np.stack([(x2 - x1) / S, (y2 - y1) / S], -1)
    assert (np.abs(got[..., :2] - kp[..., :2]) <= cell / 2 + 1e-4).all()
    labels, scores = np.ones((n, 1), np.int64), np.ones((n, 1))
    res = results.instance_keypoint_results(ds, "test", got, labels, scores)
    assert len(res) == n and len(res[0]["keypoints"]) == 42
    path = tmp_path / "kp.json"
    results.write(str(path), res)
    figures, table = evaluate(ds.meta["test"]["file"], str(path), "keypoints")
    assert figures["AP"] == pytest.approx(1.0) and "COCOeval keypoints" in table
