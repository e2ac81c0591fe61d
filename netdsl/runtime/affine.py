"""`augment = [affine(scale, translate, min_visible)]`: YOLO's "random scaling and
translations of up to 20% of the original image size" (Redmon et al. 2016, sec. 2.2),
with the objects moved with the image.

Per example, from three uniform draws u: a scale factor s = 1 + scale * (2 u0 - 1) about
the image centre, then a shift of translate * (2 u - 1) of the width and of the height.
A point (continuous pixels, pixel (i, j) covering [j, j+1) x [i, i+1), as the COCO reader)
moves to

    x' = s * (x - W/2) + W/2 + tx,    y' = s * (y - H/2) + H/2 + ty

which is torchvision's `transforms.v2.functional.affine(angle=0, shear=0, scale=s,
translate=[tx, ty])` for images and boxes alike. Images are resampled bilinearly, the
area that comes from outside the image filled with `fill` per channel (the loader gives
the training mean, so a normalised input reads 0 there: nothing); label maps and
per-object masks are resampled nearest-neighbour, filled with their ignore index / 0.

Objects (the padded detection ground truth of docs/language.md: boxes [N, G, 4] x1, y1,
x2, y2 and labels [N, G], -1 on padding rows): each box is moved and clipped to the image.
One that keeps less than `min_visible` of its moved area inside the image (or nothing) is
dropped: its row becomes padding (label -1, zero box), and each image's remaining objects
are moved to its first rows, in their order, so the rows past them are padding as the
data sets give them. Fields with a row per object (masks [N, G, H, W], keypoints
[N, G, K, 3], dense captioning's captions [N, G, L]) follow the same rows and are zeroed
where the object was dropped; a keypoint that leaves the image becomes unlabelled
(0, 0, 0, COCO's convention). Single-object fields (box, joints, visible) have no padding
row to drop an object into: the trainer refuses them (runtime/train.py).
"""
from __future__ import annotations

import numpy as np

from ..errors import NetdslError

DRAWS = 3       # uniform numbers an example takes: scale, x shift, y shift


def check(scale: float, translate: float, min_visible: float, pos=None):
    """The arguments' ranges (each is already a non-negative number)."""
    if scale >= 1:
        raise NetdslError(f"affine(scale = {scale:g}): the scale factor is drawn from [1 - scale, 1 + scale], "
                          "so scale must be below 1", pos, hint="the paper's is 0.2")
    if translate > 1:
        raise NetdslError(f"affine(translate = {translate:g}): the shift is a fraction of the image's size, "
                          "at most 1", pos, hint="the paper's is 0.2")
    if min_visible > 1:
        raise NetdslError(f"affine(min_visible = {min_visible:g}) is the fraction of a box that must stay "
                          "in the image, at most 1", pos)


def params(u: np.ndarray, scale: float, translate: float) -> np.ndarray:
    """[n, 3] draws in [0, 1) -> [n, 3] float64 (s, tx, ty), the shifts as fractions of W, H."""
    u = np.asarray(u, np.float64)
    return np.stack([1 + scale * (2 * u[:, 0] - 1), translate * (2 * u[:, 1] - 1),
                     translate * (2 * u[:, 2] - 1)], 1)


def _source(p: np.ndarray, size: int, axis: int) -> np.ndarray:
    """[n, size] float64: for each output pixel along an axis (1: x, 2: y), the source
    coordinate of its centre (continuous pixels)."""
    s, t = p[:, :1], p[:, axis:axis + 1] * size
    return (np.arange(size) + 0.5 - size / 2 - t) / s + size / 2


def warp_images(x: np.ndarray, p: np.ndarray, fill) -> np.ndarray:
    """Bilinear: float [n, C, H, W] -> the same, fill [C] (or a number) outside."""
    from netdsl.kernels.cpu.warp import warp_bilinear
    tabs = []
    for axis, size in ((2, x.shape[2]), (1, x.shape[3])):
        c = _source(p, size, axis) - 0.5       # in pixel-centre units: neighbours floor(c), floor(c) + 1
        first = np.floor(c)
        tabs += [first.astype(np.int64), c - first]
    fill = np.broadcast_to(np.asarray(fill, x.dtype).reshape(-1), (x.shape[1],))
    return warp_bilinear(x, *tabs, fill)


def warp_nearest(x: np.ndarray, p: np.ndarray, fill) -> np.ndarray:
    """Nearest neighbour: [n, H, W] or [n, K, H, W] of any dtype -> the same, fill outside."""
    from netdsl.kernels.cpu.warp import warp_nearest as kernel
    H, W = x.shape[-2:]
    idx = []
    for axis, size in ((2, H), (1, W)):
        i = np.floor(_source(p, size, axis)).astype(np.int64)
        i[(i < 0) | (i >= size)] = -1
        idx.append(i)
    four = x.reshape(len(x), -1, H, W)
    return kernel(four, *idx, fill).reshape(x.shape)


def move_points(xy: np.ndarray, p: np.ndarray, hw) -> np.ndarray:
    """x, y in the last axis of [n, ..., 2] (or of x1, y1, x2, y2 for [n, ..., 4]) moved."""
    H, W = hw
    shape = (len(xy),) + (1,) * (xy.ndim - 1)
    s = p[:, 0].reshape(shape)
    out = np.empty(xy.shape, np.float64)
    for k, size in ((0, W), (1, H)):
        t = p[:, 1 + k].reshape(shape[:-1]) * size
        out[..., k::2] = (s * (xy[..., k::2] - size / 2) + size / 2 + t[..., None])
    return out.astype(xy.dtype)


def move_boxes(boxes: np.ndarray, labels: np.ndarray, p: np.ndarray, hw, min_visible: float):
    """(boxes moved and clipped to the image, the rows kept): [n, G, 4], [n, G] bool. A
    row is kept when its label is a class (>= 0) and the clipped box holds at least
    min_visible of the moved box's area (and some area)."""
    H, W = hw
    moved = move_points(boxes, p, hw).astype(np.float64)
    clipped = np.clip(moved, 0, [W, H, W, H])
    area = (moved[..., 2] - moved[..., 0]) * (moved[..., 3] - moved[..., 1])
    cw, ch = clipped[..., 2] - clipped[..., 0], clipped[..., 3] - clipped[..., 1]
    keep = (labels >= 0) & (cw > 0) & (ch > 0) & (cw * ch >= min_visible * area)
    return clipped.astype(boxes.dtype), keep


class Affine:
    """The augmentation of one loader's fields. images: name -> fill per channel;
    dense: name -> fill ([n, H, W] label maps); boxes, labels: the object fields (or
    None); masks: [n, G, H, W] fields; keypoints: [n, G, K, 3] fields; rows: other
    fields with a row per object (zeroed where one is dropped). The first image's size
    is the one boxes and keypoints are measured in."""

    def __init__(self, scale: float, translate: float, min_visible: float, images: dict, dense=None,
                 boxes=None, labels=None, masks=(), keypoints=(), rows=()):
        if boxes is not None and labels is None:
            raise NetdslError("affine moves boxes with their labels (-1 marks a dropped object), and there are none")
        self.scale, self.translate, self.min_visible = scale, translate, min_visible
        self.images, self.dense = dict(images), dict(dense or {})
        self.boxes, self.labels = boxes, labels
        self.masks, self.keypoints, self.rows = list(masks), list(keypoints), list(rows)

    def __call__(self, b: dict, u: np.ndarray) -> dict:
        """Transform batch b in place (its arrays are the loader's private copies) by the
        draws u [n, DRAWS]; returns b."""
        p = params(u, self.scale, self.translate)
        hw = next(iter(b[k] for k in self.images)).shape[-2:] if self.images else None
        for k, fill in self.images.items():
            b[k] = warp_images(b[k], p, fill)
        for k, fill in self.dense.items():
            b[k] = warp_nearest(b[k], p, fill)
        for k in self.masks:
            b[k] = warp_nearest(b[k], p, 0)
        for k in self.keypoints:
            kp = b[k]
            xy = move_points(kp[..., :2], p, hw)
            inside = (kp[..., 2] > 0) & (xy[..., 0] >= 0) & (xy[..., 0] < hw[1]) & (xy[..., 1] >= 0) & \
                (xy[..., 1] < hw[0])
            b[k] = np.where(inside[..., None], np.concatenate([xy, kp[..., 2:]], -1), 0).astype(kp.dtype)
        if self.boxes is None:
            return b
        boxes, keep = move_boxes(b[self.boxes], b[self.labels], p, hw, self.min_visible)
        b[self.boxes] = boxes
        # each image's kept objects first, in order (a stable sort on "dropped")
        order = np.argsort(~keep, axis=1, kind="stable")
        keep = np.take_along_axis(keep, order, 1)
        for k in [self.boxes, self.labels, *self.masks, *self.keypoints, *self.rows]:
            a = b[k]
            a = a[np.arange(len(a))[:, None], order]
            a[~keep] = -1 if k == self.labels else 0
            b[k] = a
        return b
