"""Predictions as a COCO results file, in the original images' pixels, so COCOeval and
other tools read them.

The arrays are those of a CocoDataset split (coco.py): predictions in the resized
images' pixels, classes numbered as there. Each converter returns a list of COCO
result records; `write` stores one atomically.

    write("run/results.json", box_results(ds, "test", boxes, labels, scores))
"""
from __future__ import annotations

import json

import numpy as np

from ..errors import NetdslError


def _scales(ds, split: str) -> np.ndarray:
    """[N, 2]: (x, y) factors from the resized images back to each original image."""
    sizes = ds.meta[split]["sizes"]                       # (height, width) of each file image
    h, w = ds.split(split)["image"].shape[2:]
    return np.stack([sizes[:, 1] / w, sizes[:, 0] / h], 1)


def _count(ds, split, a, what):
    n = len(ds.meta[split]["image_ids"])
    if len(a) != n:
        raise NetdslError(f"{what}: {len(a)} predictions for the {n} images of the {split} split")


def to_original(ds, split: str, boxes) -> np.ndarray:
    """Boxes x1, y1, x2, y2 in the resized images' pixels, [N, G, 4] or one per image
    [N, 4], as float64 in each original image's pixels (the inverse of the reader's scaling)."""
    b = np.asarray(boxes, np.float64)
    _count(ds, split, b, "box results")
    s = np.tile(_scales(ds, split), 2)                    # x, y, x, y factors per image
    return b * (s[:, None] if b.ndim == 3 else s)


def box_results(ds, split: str, boxes, labels, scores) -> list[dict]:
    """Detections [N, G, 4] (x1, y1, x2, y2), labels [N, G] (class 1..K; below 1 is no
    object: a padding row, label -1, is never written) and scores [N, G]; or one per
    image: [N, 4], labels [N] 0-based as the single-object `label`, scores [N]."""
    boxes, labels, scores = to_original(ds, split, boxes), np.asarray(labels), np.asarray(scores, np.float64)
    if boxes.ndim == 2:                                   # single-object: one box per image
        boxes, labels, scores = boxes[:, None], labels[:, None] + 1, scores[:, None]
    out = []
    for k, image_id in enumerate(ds.meta[split]["image_ids"].tolist()):
        for (x1, y1, x2, y2), c, p in zip(boxes[k].tolist(), labels[k].tolist(), scores[k].tolist()):
            if c < 1:
                continue
            out.append({"image_id": image_id, "category_id": ds.category_ids[c - 1],
                        "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                        "score": round(p, 5)})
    return out


def instance_mask_results(ds, split: str, boxes, labels, scores, masks, threshold: float = 0.5) -> list[dict]:
    """Mask R-CNN's detections as COCO `segm` results: each detection's mask [M, M]
    (probabilities, masks [N, G, M, M]) pasted into its box in the original image
    (paste_masks), cut at `threshold` and stored as compressed RLE; boxes, labels and
    scores as box_results takes them (padding rows, label below 1, never written)."""
    from pycocotools import mask as cmask
    boxes, labels = to_original(ds, split, boxes), np.asarray(labels)
    scores, masks = np.asarray(scores, np.float64), np.asarray(masks, np.float32)
    out = []
    for k, image_id in enumerate(ds.meta[split]["image_ids"].tolist()):
        H, W = ds.meta[split]["sizes"][k].tolist()
        real = np.flatnonzero(labels[k] >= 1)
        pasted = paste_masks(masks[k][real], boxes[k][real], H, W)
        for i, m in zip(real.tolist(), pasted):
            rle = cmask.encode(np.asfortranarray(m > threshold, dtype=np.uint8))
            out.append({"image_id": image_id, "category_id": ds.category_ids[int(labels[k, i]) - 1],
                        "segmentation": {"size": [H, W], "counts": rle["counts"].decode("ascii")},
                        "score": round(float(scores[k, i]), 5)})
    return out


def paste_masks(masks, boxes, H: int, W: int, padding: int = 1) -> np.ndarray:
    """torchvision's paste_masks_in_image: each [M, M] mask (float32) padded by `padding`
    zeros, its box grown by the same factor (M + 2 padding) / M about its centre and
    truncated to integers, the mask resized bilinearly (F.interpolate, align_corners=False)
    to the box's (x2 - x1 + 1) x (y2 - y1 + 1) pixels and written into a zero H x W image
    where the box lies in it: float32 [D, H, W]."""
    masks = np.asarray(masks, np.float32)
    boxes = np.asarray(boxes, np.float32)
    out = np.zeros((len(masks), H, W), np.float32)
    if not len(masks):
        return out
    M = masks.shape[-1]
    scale = np.float32((M + 2 * padding) / M)
    padded = np.pad(masks, ((0, 0), (padding, padding), (padding, padding)))
    half = (boxes[:, 2:] - boxes[:, :2]) * np.float32(0.5) * scale        # (w, h) halves, float32 as torch
    centre = (boxes[:, 2:] + boxes[:, :2]) * np.float32(0.5)
    grown = np.concatenate([centre - half, centre + half], 1).astype(np.int64)   # .to(int64): toward zero
    for d, (x1, y1, x2, y2) in enumerate(grown.tolist()):
        w, h = max(x2 - x1 + 1, 1), max(y2 - y1 + 1, 1)
        m = _bilinear(padded[d], h, w)
        xa, xb, ya, yb = max(x1, 0), min(x2 + 1, W), max(y1, 0), min(y2 + 1, H)
        if xb > xa and yb > ya:
            out[d, ya:yb, xa:xb] = m[ya - y1:yb - y1, xa - x1:xb - x1]
    return out


def _bilinear(a: np.ndarray, h: int, w: int) -> np.ndarray:
    """PyTorch's bilinear resize of a float32 [h0, w0] map to [h, w] (align_corners=False:
    source = (i + 0.5) * h0 / h - 0.5, clamped at 0, the far neighbour clamped at the edge)."""
    def taps(n_in, n_out):
        src = np.maximum((np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * (np.float32(n_in) / np.float32(n_out))
                         - np.float32(0.5), np.float32(0))
        i0 = src.astype(np.int64)
        i1 = np.minimum(i0 + 1, n_in - 1)
        f = src - i0.astype(np.float32)
        return i0, i1, f, np.float32(1) - f
    y0, y1, fy, gy = taps(a.shape[0], h)
    x0, x1, fx, gx = taps(a.shape[1], w)
    top = a[y0][:, x0] * gx + a[y0][:, x1] * fx
    bottom = a[y1][:, x0] * gx + a[y1][:, x1] * fx
    return top * gy[:, None] + bottom * fy[:, None]


def heatmap_keypoints(heatmaps, boxes) -> np.ndarray:
    """Keypoints from Mask R-CNN's heatmaps [..., K, S, S] over their boxes [..., 4]:
    float32 [..., K, 3] (x, y, the heatmap's highest logit). x, y is the centre of the
    highest cell mapped into the box (torchvision's heatmaps_to_keypoints first resizes
    each map bicubically to the box's pixels; at 56 cells a side over a box of a few dozen
    pixels a cell is already under a pixel, so the argmax cell is kept as it is)."""
    h = np.asarray(heatmaps, np.float32)
    b = np.asarray(boxes, np.float32)
    S = h.shape[-1]
    flat = h.reshape(*h.shape[:-2], S * S)
    best = flat.argmax(-1)
    peak = np.take_along_axis(flat, best[..., None], -1)[..., 0]
    iy, ix = best // S, best % S
    x1, y1 = b[..., None, 0], b[..., None, 1]
    w, hh = (b[..., None, 2] - x1) / np.float32(S), (b[..., None, 3] - y1) / np.float32(S)
    x = x1 + (ix.astype(np.float32) + np.float32(0.5)) * w
    y = y1 + (iy.astype(np.float32) + np.float32(0.5)) * hh
    return np.stack([x, y, peak], -1).astype(np.float32)


def instance_keypoint_results(ds, split: str, keypoints, labels, scores) -> list[dict]:
    """Mask R-CNN's detections as COCO `keypoints` results: keypoints [N, D, K, 3] (x, y
    in the resized image's pixels, heatmap_keypoints), labels [N, D] (class 1..K; padding
    rows, below 1, never written), scores [N, D] (the detection's, as torchvision reports
    them). Only detections of a category that names keypoints are written."""
    kp, labels, scores = np.asarray(keypoints, np.float64), np.asarray(labels), np.asarray(scores, np.float64)
    _count(ds, split, kp, "keypoint results")
    s = _scales(ds, split)
    out = []
    for k, image_id in enumerate(ds.meta[split]["image_ids"].tolist()):
        for i in np.flatnonzero(labels[k] >= 1).tolist():
            xy = kp[k, i, :, :2] * s[k]
            out.append({"image_id": image_id, "category_id": ds.category_ids[int(labels[k, i]) - 1],
                        "keypoints": [round(float(v), 2) for x, y in xy for v in (x, y, 1)],
                        "score": round(float(scores[k, i]), 5)})
    return out


def keypoint_results(ds, split: str, joints, scores=None) -> list[dict]:
    """One person per image: joints [N, K, 2] (x, y); scores [N] (default 1)."""
    joints = np.asarray(joints, np.float64)
    _count(ds, split, joints, "keypoint results")
    scores = np.ones(len(joints)) if scores is None else np.asarray(scores, np.float64)
    s = _scales(ds, split)
    cat = ds.category_ids[0] if len(ds.category_ids) == 1 else None
    if cat is None:
        raise NetdslError("keypoint results need a data set with one (person) category")
    out = []
    for k, image_id in enumerate(ds.meta[split]["image_ids"].tolist()):
        xy = joints[k] * s[k]
        kp = [round(float(v), 2) for x, y in xy for v in (x, y, 1)]
        out.append({"image_id": image_id, "category_id": cat, "keypoints": kp, "score": round(float(scores[k]), 5)})
    return out


def label_map_results(ds, split: str, maps) -> list[dict]:
    """Label maps [N, h, w] (0 background, class 1..K) as one compressed RLE per image
    and class present, resized nearest-neighbour to the original image (COCO-Stuff's
    results format)."""
    from PIL import Image
    from pycocotools import mask as cmask
    maps = np.asarray(maps)
    _count(ds, split, maps, "label map results")
    out = []
    for k, image_id in enumerate(ds.meta[split]["image_ids"].tolist()):
        H, W = ds.meta[split]["sizes"][k].tolist()
        m = maps[k]
        if m.shape != (H, W):
            m = np.asarray(Image.fromarray(m.astype(np.int32)).resize((W, H), Image.NEAREST))
        for c in np.unique(m).tolist():
            if c < 1:
                continue
            rle = cmask.encode(np.asfortranarray(m == c, dtype=np.uint8))
            out.append({"image_id": image_id, "category_id": ds.category_ids[c - 1],
                        "segmentation": {"size": [H, W], "counts": rle["counts"].decode("ascii")}, "score": 1.0})
    return out


def mask_results(ds, split: str, masks, labels, scores) -> list[dict]:
    """Instance masks [N, G, h, w] (bool, or probabilities cut at 0.5), labels [N, G]
    (class 1..K; below 1 is no object) and scores [N, G], each mask resized
    nearest-neighbour to its original image and stored as compressed RLE."""
    from PIL import Image
    from pycocotools import mask as cmask
    masks, labels, scores = np.asarray(masks), np.asarray(labels), np.asarray(scores, np.float64)
    _count(ds, split, masks, "mask results")
    out = []
    for k, image_id in enumerate(ds.meta[split]["image_ids"].tolist()):
        H, W = ds.meta[split]["sizes"][k].tolist()
        for m, c, p in zip(masks[k], labels[k].tolist(), scores[k].tolist()):
            if c < 1:
                continue
            m = (m > 0.5 if m.dtype.kind == "f" else m.astype(bool)).astype(np.uint8)
            if m.shape != (H, W):
                m = np.asarray(Image.fromarray(m).resize((W, H), Image.NEAREST))
            rle = cmask.encode(np.asfortranarray(m))
            out.append({"image_id": image_id, "category_id": ds.category_ids[c - 1],
                        "segmentation": {"size": [H, W], "counts": rle["counts"].decode("ascii")},
                        "score": round(float(p), 5)})
    return out


def write(path: str, results: list[dict]) -> None:
    """The results as JSON at path, written to a temp file and renamed into place."""
    from ..runtime.checkpoint import atomic_write
    data = json.dumps(results, separators=(",", ":")).encode()
    atomic_write(path, lambda f: f.write(data))
