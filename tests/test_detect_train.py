"""The detectors train from the command line on COCO detection data (issue 15): feeds.bind
gives the COCO reader's boxes and labels to the specs' gt_boxes and gt_labels, and an input
`proposals` the data directory's selective search cache, both scaled with the images; each
detector's small variant trains one epoch on a generated shapes set with finite losses
(Faster R-CNN's four in metrics.jsonl) and `netdsl eval` scores it with COCOeval; a batch of
two images with different object counts gives the losses of the two images run one by one."""
import json
import math
import shutil

import numpy as np
import pytest

from helpers import SPECS, cli
from netdsl.errors import NetdslError

SIZE = 64
DET = SPECS / "det"
# each detector's small variant on the shapes' 64x64 images and 4 categories
SMALL = {
    "faster_rcnn": {"H": SIZE, "W": SIZE, "width": 8, "anchor": 16.0, "classes": 4},
    "fast_rcnn": {"H": SIZE, "W": SIZE, "width": 8, "classes": 4},
    "rcnn": {"size": 32, "width": 8, "classes": 4},
    "yolo_v1": {"size": SIZE, "width": 8, "pools": 2, "hidden": 64, "S": 4, "classes": 4},
    "ssd300": {"size": SIZE, "width": 8, "extras": 2, "classes": 4},
}
LOSSES = {"faster_rcnn": ["rpn_cls", "rpn_box", "cls", "box"], "fast_rcnn": ["cls", "box"], "rcnn": ["cls", "box"],
          "yolo_v1": ["coord", "conf_obj", "conf_noobj", "cls"], "ssd300": ["confidence", "localization"]}


def sets(overrides):
    return [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """`netdsl data shapes` (24 images of 64x64) with its selective search proposals."""
    out = tmp_path_factory.mktemp("data") / "shapes"
    r = cli("data", "shapes", out, "--images", 24, "--size", SIZE, "--no-progress")
    assert r.returncode == 0, r.stderr
    r = cli("data", "proposals", out, "--no-progress")
    assert r.returncode == 0, r.stderr
    return out


def graph(name, **overrides):
    from netdsl.lang.elaborate import elaborate
    g, _ = elaborate(str(DET / f"{name}.net"), None, {**SMALL[name], **overrides})
    return g


# ---- binding

def test_coco_boxes_and_labels_fill_the_ground_truth(shapes):
    from netdsl.datasets.coco import coco
    from netdsl.runtime.feeds import bind
    ds = coco(shapes)
    pairs = bind(graph("faster_rcnn"), ds)
    assert pairs == {"image": "image", "gt_boxes": "boxes", "gt_labels": "labels"}
    assert ds.train["labels"].dtype == np.int64 and ds.train["boxes"].dtype == np.float32


def test_ground_truth_and_proposals_scale_with_the_image(shapes):
    """coco(size=2x) doubles the boxes; the proposals fed to fast_rcnn double alike, and at
    the file's size they are the cache's boxes, padded with empty ones."""
    from netdsl.datasets.coco import coco
    from netdsl.datasets.proposal_cache import load_proposals
    from netdsl.runtime.feeds import bind
    one, two = coco(shapes), coco(shapes, size=2 * SIZE)
    bind(graph("fast_rcnn"), one)
    pairs = bind(graph("fast_rcnn", H=2 * SIZE, W=2 * SIZE), two)
    assert pairs["proposals"] == "proposals"
    for split, name in (("train", "train"), ("test", "val")):
        np.testing.assert_allclose(two.split(split)["boxes"], 2 * one.split(split)["boxes"], rtol=1e-6)
        np.testing.assert_allclose(two.split(split)["proposals"], 2 * one.split(split)["proposals"], rtol=1e-6)
        cached = load_proposals(shapes, name)
        ids = one.meta[split]["image_ids"]
        want, counts = cached.padded(ids, one.train["proposals"].shape[1])
        np.testing.assert_array_equal(one.split(split)["proposals"], want)
        assert counts.min() > 0 and (one.split(split)["proposals"][:, counts.max():] == 0).all()


def test_spec_fixing_p_gets_that_many_proposals(shapes):
    from netdsl.datasets.coco import coco
    from netdsl.runtime.feeds import bind
    ds = coco(shapes)
    bind(graph("fast_rcnn", P=7), ds)
    assert ds.train["proposals"].shape[1:] == (7, 4) and ds.test["proposals"].shape[1:] == (7, 4)


def test_missing_proposals_name_the_command(shapes, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(shapes, bare, ignore=shutil.ignore_patterns("proposals"))
    r = cli("run", DET / "fast_rcnn.net", *sets(SMALL["fast_rcnn"]), "--data", f"coco:{bare}", "--epochs", 1,
            "--out", tmp_path / "run", "--no-progress")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "input 'proposals' of 'fast_rcnn'" in r.stderr and "netdsl data proposals" in r.stderr, r.stderr


def test_mask_rcnn_says_what_coco_lacks(shapes):
    """coco() read without masks=True gives no per-instance masks with the boxes: Mask
    R-CNN's inputs are named in the error, not guessed (`run` asks for the masks:
    tests/test_mask_rcnn.py)."""
    from netdsl.datasets.coco import coco
    from netdsl.lang.elaborate import elaborate
    from netdsl.runtime.feeds import bind
    g, _ = elaborate(str(DET / "mask_rcnn.net"), None, {})
    with pytest.raises(NetdslError, match="gt_masks"):
        bind(g, coco(shapes))


# ---- one epoch from the command line, then COCOeval

@pytest.mark.parametrize("name", list(SMALL))
def test_one_epoch_from_the_cli_then_eval(shapes, tmp_path, name):
    run = tmp_path / "run"
    r = cli("run", DET / f"{name}.net", *sets(SMALL[name]), "--data", f"coco:{shapes}", "--epochs", 1,
            "--batch", 2, "--threads", 1, "--out", run, "--no-progress")
    assert r.returncode == 0, r.stderr
    rec = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    for split in ("train", "test"):
        for loss in LOSSES[name]:
            assert math.isfinite(rec[f"{split}_{loss}_loss"]), (split, loss, rec)
        assert math.isfinite(rec[f"{split}_loss"])
    r = cli("eval", run)
    assert r.returncode == 0, r.stderr
    assert "COCOeval bbox" in r.stdout and "Average Precision  (AP) @[ IoU=0.50 " in r.stdout, r.stdout
    assert (run / "eval.json").exists()


# ---- the batch does not mix images

def test_two_image_batch_gives_the_losses_of_each_image(shapes):
    """Faster R-CNN's small variant (dropout off: inference mode, which still computes the
    losses) on two images holding different numbers of objects, together and one by one
    (each with only its own ground truth rows, no padding). Every anchor and proposal is
    kept (144 anchors < 256; rois_per_image above the candidates), so no sampling can
    differ; the RoI box loss is divided by a fixed count per image (mean of the two), the
    cross-entropies by the labelled rows (their count-weighted mean), and the RPN box loss,
    as torchvision's, by the sampled anchors (the rows rpn_cls counts)."""
    from netdsl.datasets.coco import coco
    from netdsl.runtime.model import Model
    ds = coco(shapes)
    g = graph("faster_rcnn", rois_per_image=512)
    model = Model(g, seed=0)
    image, boxes, labels = (ds.train[k] for k in ("image", "boxes", "labels"))
    counts = (labels >= 0).sum(1)
    i = int(np.argmax(counts > 0))
    j = int(np.argmax((counts > 0) & (counts != counts[i])))
    assert counts[i] != counts[j] and counts[j] > 0
    ce = {l.name: l.value.producer.inputs[1] for l in g.losses if l.value.producer.op == "cross_entropy"}
    assert set(ce) == {"rpn_cls", "cls"}
    want = ["rpn_cls", "rpn_box", "cls", "box", *ce.values()]

    def losses(idx, G):
        out = model.infer({"image": image[idx], "gt_boxes": boxes[idx, :G], "gt_labels": labels[idx, :G]}, want)
        rows = {n: int((out[v] >= 0).sum()) for n, v in ce.items()}
        return {n: float(out[n]) for n in want if isinstance(n, str)}, rows

    both, rows = losses([i, j], boxes.shape[1])
    (a, ra), (b, rb) = losses([i], counts[i]), losses([j], counts[j])
    assert both["box"] == pytest.approx((a["box"] + b["box"]) / 2, rel=1e-5, abs=1e-7)
    for name, counted in (*((n, n) for n in ce), ("rpn_box", "rpn_cls")):
        n, na, nb = rows[counted], ra[counted], rb[counted]
        assert n == na + nb and na > 0 and nb > 0
        assert both[name] == pytest.approx((a[name] * na + b[name] * nb) / n, rel=1e-5, abs=1e-7), name
