"""Mask R-CNN's `mask_rois` (issue 15): in training the mask head can run on up to mask_rois
positive RoIs an image instead of on every sampled RoI (torchvision runs it on the positive
proposals only). When both see every positive, the mask loss is the same number; the
head's RoIs are never background."""
import numpy as np
import pytest

from helpers import SPECS

SPEC = SPECS / "det" / "mask_rcnn.net"
# test_mask_rcnn.py's small variant, few proposals so that 128 sampled RoIs (32 positive at
# most) and 24 head RoIs both take every positive: proposals (16) plus gt boxes (<= 8)
SMALL = {"H": 64, "W": 64, "width": 8, "anchor": 16.0, "classes": 4, "K": 0, "post_nms": 16,
         "test_post_nms": 16, "rois_per_image": 128, "detections": 16, "head_roi": 7}


@pytest.fixture(scope="module")
def feeds(tmp_path_factory):
    from netdsl.datasets import shapes
    from netdsl.datasets.coco import coco
    out = tmp_path_factory.mktemp("data") / "shapes"
    shapes.generate(str(out), images=8, size=64, seed=0)
    d = coco(out, masks=True).train
    idx = np.flatnonzero((d["labels"] >= 0).sum(1) > 0)[:2]
    return {"image": d["image"][idx], "gt_boxes": d["boxes"][idx], "gt_labels": d["labels"][idx],
            "gt_masks": d["masks"][idx]}


def _mask_loss(feeds, **overrides):
    from netdsl.lang.elaborate import elaborate
    from netdsl.runtime.model import Model
    g, _ = elaborate(str(SPEC), None, {**SMALL, **overrides})
    targets = next(n for n in g.nodes if n.op == "mask_targets")
    want = ["mask", targets.inputs[1], next(l for l in g.losses if l.name == "mask").value.producer.inputs[2]]
    out = Model(g, seed=3).infer(feeds, want)
    return [out[w] for w in want]


def test_positive_head_rois_give_the_same_mask_loss(feeds):
    every, rois0, w0 = _mask_loss(feeds)
    pos, rois, w = _mask_loss(feeds, mask_rois=24)
    assert rois0.shape[0] == 2 * 128 and rois.shape[0] == 2 * 24
    # the head's RoIs: positives (weight 1) then padding (image index -1), no background
    assert ((w == 1) == (rois[:, 0] >= 0)).all() and w.sum() == w0.sum() > 0
    assert float(pos) == pytest.approx(float(every), rel=1e-5)
