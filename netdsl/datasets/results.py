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


def box_results(ds, split: str, boxes, labels, scores) -> list[dict]:
    """Detections [N, G, 4] (x1, y1, x2, y2), labels [N, G] (class 1..K; below 1 is no
    object) and scores [N, G]; or one per image: [N, 4], labels [N] 0-based as the
    single-object `label`, scores [N]."""
    boxes, labels, scores = np.asarray(boxes, np.float64), np.asarray(labels), np.asarray(scores, np.float64)
    _count(ds, split, boxes, "box results")
    if boxes.ndim == 2:                                   # single-object: one box per image
        boxes, labels, scores = boxes[:, None], labels[:, None] + 1, scores[:, None]
    s = _scales(ds, split)
    out = []
    for k, image_id in enumerate(ds.meta[split]["image_ids"].tolist()):
        for b, c, p in zip(boxes[k], labels[k].tolist(), scores[k].tolist()):
            if c < 1:
                continue
            x1, x2 = b[[0, 2]] * s[k, 0]
            y1, y2 = b[[1, 3]] * s[k, 1]
            out.append({"image_id": image_id, "category_id": ds.category_ids[c - 1],
                        "bbox": [round(float(x1), 2), round(float(y1), 2), round(float(x2 - x1), 2),
                                 round(float(y2 - y1), 2)], "score": round(float(p), 5)})
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
