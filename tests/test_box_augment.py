"""`augment = [affine(scale, translate, min_visible)]` (runtime/affine.py, kernels/cpu/warp.py):
YOLO's random scaling and translation with the objects moved with the image. The moved
boxes are where the image's content went (a filled rectangle's pixels), and match
torchvision's v2 affine of images and boxes; boxes are clipped, dropped below
min_visible and the padding rows kept last; masks, keypoints and per-object rows follow;
a run's draws repeat for its seed; fields it cannot move are a clear error."""
import importlib
import json

import numpy as np
import pytest

import tvref
from helpers import SPECS, cli
from netdsl.errors import NetdslError
from netdsl.runtime.affine import Affine, check, move_boxes, params

H = W = 48


def _canvas(rng, n, g=3):
    """n images with g filled rectangles each (value 1 on 0) and their boxes, labels 1.."""
    x = np.zeros((n, 3, H, W), np.float32)
    boxes = np.zeros((n, g + 2, 4), np.float32)      # two padding rows
    labels = np.full((n, g + 2), -1, np.int64)
    for i in range(n):
        for k in range(g):
            x0, y0 = rng.integers(4, W - 16, 2)
            w, h = rng.integers(6, 12, 2)
            boxes[i, k] = x0, y0, x0 + w, y0 + h
            labels[i, k] = k + 1
    return x, boxes, labels


def _one(x, box):
    """x with only that box's rectangle painted."""
    out = np.zeros_like(x)
    x0, y0, x1, y1 = box.astype(int)
    out[:, y0:y1, x0:x1] = 1
    return out


def test_moved_boxes_are_where_the_image_content_went():
    rng = np.random.default_rng(0)
    x, boxes, labels = _canvas(rng, 16, g=1)
    x = np.stack([_one(x[i], boxes[i, 0]) for i in range(len(x))])
    u = rng.random((16, 3))
    b = Affine(0.2, 0.2, 0.0, {"image": 0.0}, boxes="boxes", labels="labels")(
        {"image": x.copy(), "boxes": boxes.copy(), "labels": labels.copy()}, u)
    p = params(u, 0.2, 0.2)
    assert np.ptp(p[:, 0]) > 0.15 and np.abs(p[:, 1:]).max() > 0.1      # the draws do scale and shift
    checked = 0
    for i in range(len(x)):
        ys, xs = np.nonzero(b["image"][i, 0] > 0.5)
        if b["labels"][i, 0] < 0:
            continue
        got = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        np.testing.assert_allclose(got, b["boxes"][i, 0], atol=1.0)
        checked += 1
    assert checked >= 12


def test_images_and_boxes_match_torchvision_affine():
    ns = tvref.load()
    if ns is None:
        pytest.skip(tvref.SKIP_REASON)
    import torch
    F = importlib.import_module("torchvision.transforms.v2.functional")
    tvt = importlib.import_module("torchvision.tv_tensors")
    rng = np.random.default_rng(1)
    x = rng.random((6, 3, H, W)).astype(np.float32)
    _, boxes, labels = _canvas(rng, 6)
    u = rng.random((6, 3))
    b = Affine(0.2, 0.2, 0.0, {"image": 0.0}, boxes="boxes", labels="labels")(
        {"image": x.copy(), "boxes": boxes.copy(), "labels": labels.copy()}, u)
    for i, (s, tx, ty) in enumerate(params(u, 0.2, 0.2)):
        kw = dict(angle=0.0, translate=[tx * W, ty * H], scale=float(s), shear=[0.0, 0.0])
        img = F.affine(torch.from_numpy(x[i]), interpolation=F.InterpolationMode.BILINEAR, **kw)
        np.testing.assert_allclose(b["image"][i], img.numpy(), atol=2e-5)
        real = labels[i] >= 0
        bb = tvt.BoundingBoxes(torch.from_numpy(boxes[i][real]), format="XYXY", canvas_size=(H, W))
        want = F.clamp_bounding_boxes(F.affine(bb, **kw)).numpy()
        order = list(labels[i][real])       # each image's labels are distinct: they name the boxes
        for k, label in enumerate(b["labels"][i]):
            if label >= 0:
                np.testing.assert_allclose(b["boxes"][i, k], want[order.index(label)], atol=1e-4)
        for label in set(order) - set(b["labels"][i]):      # dropped: nothing of it is left in the image
            w = want[order.index(label)]
            assert w[2] <= w[0] or w[3] <= w[1]


def test_boxes_are_clipped_and_dropped_below_min_visible_padding_last():
    # no scaling, shifted right by a quarter of the width (12 px): x' = x + 12
    u = np.array([[0.5, 0.5 + 0.25 / 0.8, 0.5]])     # tx = 0.4 * (2 u - 1) = 0.25
    boxes = np.array([[[0, 0, 10, 10],          # inside: moved, kept
                       [30, 0, 40, 10],         # 42..52: 6 of 10 inside (0.6): kept, clipped to 48
                       [34, 0, 44, 10],         # 46..56: 2 of 10 (0.2): dropped
                       [0, 0, 0, 0],            # padding
                       [10, 20, 20, 30],        # after the padding row: kept, moved up to row 2
                       [40, 20, 48, 30]]], np.float32)    # 52..: outside: dropped
    labels = np.array([[1, 2, 3, -1, 4, 2]])
    masks = np.zeros((1, 6, H, W), np.float32)
    keypoints = np.zeros((1, 6, 2, 3), np.float32)
    for k, (x0, y0, x1, y1) in enumerate(boxes[0].astype(int)):
        masks[0, k, y0:y1, x0:x1] = 1
        keypoints[0, k] = [[x0 + 1, y0 + 1, 2], [x1 - 1, y1 - 1, 1]]
    keypoints[0, 3] = 0
    captions = np.arange(6 * 3).reshape(1, 6, 3) + 1
    a = Affine(0.2, 0.4, 0.5, {"image": 0.0}, boxes="boxes", labels="labels", masks=["masks"],
               keypoints=["keypoints"], rows=["captions"])
    b = a({"image": np.zeros((1, 3, H, W), np.float32), "boxes": boxes.copy(), "labels": labels.copy(),
           "masks": masks, "keypoints": keypoints, "captions": captions}, u)
    np.testing.assert_allclose(params(u, 0.2, 0.4)[0], [1, 0.25, 0], atol=1e-12)
    np.testing.assert_array_equal(b["labels"][0], [1, 2, 4, -1, -1, -1])
    np.testing.assert_allclose(b["boxes"][0], [[12, 0, 22, 10], [42, 0, 48, 10], [22, 20, 32, 30],
                                               [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], atol=1e-5)
    np.testing.assert_array_equal(b["captions"][0], captions[0][[0, 1, 4, 3, 3, 3]] * [[1], [1], [1], [0], [0], [0]])
    for k in range(3):      # each kept object's mask is its moved box's pixels
        ys, xs = np.nonzero(b["masks"][0, k])
        np.testing.assert_array_equal([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], b["boxes"][0, k])
    assert not b["masks"][0, 3:].any() and not b["keypoints"][0, 3:].any()
    np.testing.assert_allclose(b["keypoints"][0, 0], [[13, 1, 2], [21, 9, 1]])
    # the clipped object's second keypoint (x 39 + 12 = 51) left the image: unlabelled
    np.testing.assert_allclose(b["keypoints"][0, 1], [[43, 1, 2], [0, 0, 0]])
    # min_visible 0: anything with some area inside stays
    kept = move_boxes(boxes, labels, params(u, 0.2, 0.4), (H, W), 0.0)[1]
    np.testing.assert_array_equal(kept[0], [True, True, True, False, True, False])


def test_label_maps_move_nearest_with_their_fill():
    rng = np.random.default_rng(2)
    x, boxes, labels = _canvas(rng, 4, g=1)
    label = np.zeros((4, H, W), np.int64)
    for i in range(4):
        x0, y0, x1, y1 = boxes[i, 0].astype(int)
        label[i, y0:y1, x0:x1] = 3
    u = np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.3, 0.9, 0.1], [0.7, 0.2, 0.6]])   # the extremes too
    b = Affine(0.2, 0.2, 0.0, {"image": 0.5}, dense={"label": 255}, boxes="boxes", labels="labels")(
        {"image": x, "label": label, "boxes": boxes, "labels": labels}, u)
    assert set(np.unique(b["label"])) <= {0, 3, 255} and (b["label"] == 255).any()
    for i in range(4):
        ys, xs = np.nonzero(b["label"][i] == 3)
        np.testing.assert_allclose([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], b["boxes"][i, 0], atol=1.0)
        # from outside the image (a pixel beyond the bilinear's reach): the image reads the fill
        out = np.pad(b["label"][i] == 255, 1, constant_values=True)
        far = np.logical_and.reduce([out[dy:dy + H, dx:dx + W] for dy in range(3) for dx in range(3)])
        assert far.any() and np.allclose(b["image"][i][:, far], 0.5)


def _loader(seed):
    from netdsl.runtime.loader import Loader
    rng = np.random.default_rng(7)
    _, boxes, labels = _canvas(rng, 10)
    x = rng.random((10, 3, H, W)).astype(np.float32)
    a = Affine(0.2, 0.2, 0.5, {"image": x.mean((0, 2, 3))}, boxes="boxes", labels="labels")
    return Loader({"image": x, "boxes": boxes, "labels": labels}, 4, rng=np.random.default_rng(seed), shuffle=True,
                  flip=False, affine=a, mean=x.mean((0, 2, 3)), std=x.std((0, 2, 3)))


def test_the_draws_repeat_for_a_seed():
    one, two, other = ([b for _ in range(2) for b in loader] for loader in map(_loader, (0, 0, 1)))
    for a, b in zip(one, two):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    assert any(not np.array_equal(a["boxes"], b["boxes"]) for a, b in zip(one, other))
    # a second epoch draws anew
    assert any(not np.array_equal(a["image"], b["image"]) for a, b in zip(one[:3], one[3:]))


def test_argument_ranges_are_checked():
    for kw, msg in (({"scale": 1.0}, "scale must be below 1"), ({"translate": 1.5}, "at most 1"),
                    ({"min_visible": 2.0}, "at most 1")):
        with pytest.raises(NetdslError, match=msg):
            check(**{"scale": 0.2, "translate": 0.2, "min_visible": 0.5, **kw})


def _write_coco(root, n=4):
    """A tiny COCO detection set: one filled square per 32x32 image."""
    from PIL import Image
    rng = np.random.default_rng(3)
    (root / "annotations").mkdir(parents=True)
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        images, anns = [], []
        for i in range(1, n + 1):
            im = np.zeros((32, 32, 3), np.uint8)
            x0, y0 = (int(v) for v in rng.integers(4, 18, 2))
            im[y0:y0 + 10, x0:x0 + 10] = 255
            Image.fromarray(im).save(root / "images" / split / f"{i}.png")
            images.append({"id": i, "file_name": f"{i}.png", "width": 32, "height": 32})
            anns.append({"id": i, "image_id": i, "category_id": 1, "bbox": [x0, y0, 10, 10], "area": 100,
                         "iscrowd": 0})
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(
            {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "square"}]}))


def test_a_detector_trainer_moves_coco_boxes_with_its_images(tmp_path):
    """The trainer's loader applies `augment = [affine(...), flip]` to coco() data: the
    square's pixels (before normalisation) are where its ground-truth box says."""
    from netdsl.lang.elaborate import elaborate
    from netdsl.lang.training import TrainCall, check_setting
    from netdsl.runtime.train import Trainer
    _write_coco(tmp_path / "set")
    g, _ = elaborate(str(SPECS / "det" / "yolo_v1.net"), None,
                     {"size": 32, "width": 8, "pools": 2, "hidden": 16, "S": 2, "classes": 1})
    cfg = dict(g.train, batch=4, normalize=False, data=check_setting(
        "data", TrainCall("coco", {"path": str(tmp_path / "set"), "task": "detect"}), None, None),
        augment=check_setting("augment", [TrainCall("affine", {"scale": 0.2, "translate": 0.2}), "flip"], None, None))
    t = Trainer(g, cfg, str(tmp_path / "run"), "", log=lambda s: None, training=False)
    moved = 0
    for batch in t.train_loader:
        for img, box, label in zip(batch["image"], batch["boxes"], batch["labels"]):
            if label[0] < 0:
                continue
            ys, xs = np.nonzero(img[0] > 0.5)
            np.testing.assert_allclose([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], box[0], atol=1.0)
            moved += 1
    assert moved >= 3


def test_fields_affine_cannot_move_are_a_clear_error(tmp_path):
    spec = tmp_path / "boxes.net"
    spec.write_text("""
network boxes() {
  input image: f32[N, 1, 8, 8]
  input box: f32[N, 4]
  y = image -> flatten -> linear(4)
  output y
  loss l = l2(y, box)
  train { augment = [affine(scale = 0.1)] epochs = 1 }
}""")
    r = np.random.default_rng(0)
    data = tmp_path / "boxes.npz"
    np.savez(data, image_train=r.random((8, 1, 8, 8), np.float32), box_train=r.random((8, 4), np.float32),
             image_test=r.random((2, 1, 8, 8), np.float32), box_test=r.random((2, 4), np.float32))
    p = cli("run", spec, "--data", f"npz:{data}", "--out", tmp_path / "run")
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert "augment = [affine] cannot transform input 'box'" in p.stderr and "boxes.net:" in p.stderr, p.stderr
    spec.write_text("""
network digits() {
  input image: f32[N, 1, 8, 8]
  input label: i64[N]
  y = image -> flatten -> linear(4)
  output y
  loss l = cross_entropy(y, label)
  train { augment = [affine(scale = 1.5)] epochs = 1 }
}""")
    np.savez(data, image_train=r.random((8, 1, 8, 8), np.float32), label_train=r.integers(0, 4, 8),
             image_test=r.random((2, 1, 8, 8), np.float32), label_test=r.integers(0, 4, 2))
    p = cli("run", spec, "--data", f"npz:{data}", "--out", tmp_path / "run")
    assert p.returncode == 2 and "scale must be below 1" in p.stderr and "Traceback" not in p.stderr, p.stderr
