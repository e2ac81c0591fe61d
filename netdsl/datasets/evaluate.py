"""Scoring predictions the field's standard way.

- boxes, masks, keypoints: pycocotools' COCOeval, its AP/AR table unchanged (never a
  re-implementation of mAP); keypoint OKS with per-joint sigmas looked up by name.
- semantic segmentation: a confusion matrix over all pixels, then pixel accuracy and
  mean IoU over the classes present in prediction or truth (as FCN reports it).
- pose: PCK@alpha, a labelled joint counting as found when it lies within alpha times
  the person's size: max(width, height) of its ground-truth box (norm="bbox"), or
  the left-shoulder to right-hip distance (norm="torso", as for LSP).

    figures, table = evaluate("annotations/instances_val.json", "results.json", "bbox")
"""
from __future__ import annotations

import contextlib
import io

import numpy as np

from ..errors import NetdslError
from . import cocofile

KINDS = ("bbox", "segm", "keypoints", "semantic")
# COCOeval.stats, in the order summarize() prints them
STATS = {"bbox": ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"),
         "keypoints": ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")}
STATS["segm"] = STATS["bbox"]

# OKS sigmas: COCO's 17 joints (pycocotools' defaults) and CrowdPose's head and neck
SIGMAS = {"nose": .026, "left_eye": .025, "right_eye": .025, "left_ear": .035, "right_ear": .035,
          "left_shoulder": .079, "right_shoulder": .079, "left_elbow": .072, "right_elbow": .072,
          "left_wrist": .062, "right_wrist": .062, "left_hip": .107, "right_hip": .107,
          "left_knee": .087, "right_knee": .087, "left_ankle": .089, "right_ankle": .089,
          "head": .079, "neck": .079}


# ---------------------------------------------------------------- arrays

def confusion(pred: np.ndarray, truth: np.ndarray, classes: int, ignore: int | None = None) -> np.ndarray:
    """int64 [classes, classes], rows the true class, columns the predicted one."""
    pred, truth = np.asarray(pred).ravel(), np.asarray(truth).ravel()
    if pred.shape != truth.shape:
        raise NetdslError(f"predictions hold {pred.size} pixels but the truth {truth.size}")
    keep = truth != ignore if ignore is not None else np.ones(truth.shape, bool)
    t, p = truth[keep].astype(np.int64), pred[keep].astype(np.int64)
    for what, a in (("true", t), ("predicted", p)):
        if a.size and (a.min() < 0 or a.max() >= classes):
            raise NetdslError(f"a {what} class is {int(a.min() if a.min() < 0 else a.max())}, outside [0, {classes})")
    return np.bincount(t * classes + p, minlength=classes * classes).reshape(classes, classes)


def segmentation_scores(c: np.ndarray, names=None) -> dict:
    """pixel_accuracy, miou and iou/NAME per class present in prediction or truth."""
    tp = np.diag(c).astype(np.float64)
    union = c.sum(0) + c.sum(1) - tp
    present = union > 0
    out = {"pixel_accuracy": float(tp.sum() / max(c.sum(), 1)),
           "miou": float((tp[present] / union[present]).mean()) if present.any() else 0.0}
    names = names or [str(i) for i in range(len(c))]
    for i in np.flatnonzero(present):
        out[f"iou/{names[i]}"] = float(tp[i] / union[i])
    return out


def pck(pred, truth, visible, box=None, alpha: float = 0.2, norm: str = "bbox", names=None) -> float:
    """The fraction of labelled joints (visible > 0) within alpha * size of the truth;
    size per example from `box` (x1, y1, x2, y2; norm="bbox") or from the left-shoulder
    to right-hip distance of `truth` (norm="torso", needs the joint names)."""
    pred, truth = np.asarray(pred, np.float64), np.asarray(truth, np.float64)
    seen = np.asarray(visible) > 0
    if pred.shape != truth.shape or seen.shape != truth.shape[:2]:
        raise NetdslError(f"PCK: predictions {pred.shape}, truth {truth.shape} and visibility {seen.shape} "
                          f"do not match ([N, K, 2] and [N, K])")
    if norm == "bbox":
        b = np.asarray(box, np.float64)
        size = np.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1])
    elif norm == "torso":
        names = list(names or [])
        if "left_shoulder" not in names or "right_hip" not in names:
            raise NetdslError("PCK with norm='torso' needs joints named left_shoulder and right_hip")
        size = np.linalg.norm(truth[:, names.index("left_shoulder")] - truth[:, names.index("right_hip")], axis=1)
    else:
        raise NetdslError(f"PCK: norm must be 'bbox' or 'torso', got '{norm}'")
    hit = np.linalg.norm(pred - truth, axis=2) <= alpha * size[:, None]
    return float((hit & seen).sum() / max(seen.sum(), 1))


def box_iou(a, b) -> np.ndarray:
    """IoU of matching rows of two [N, 4] x1, y1, x2, y2 arrays."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    w = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    h = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    area = lambda x: np.clip(x[:, 2] - x[:, 0], 0, None) * np.clip(x[:, 3] - x[:, 1], 0, None)  # noqa: E731
    inter = w * h
    union = area(a) + area(b) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


# ---------------------------------------------------------------- files

def evaluate(gt_json: str, results_json: str, kind: str, *, alpha: float = 0.2, norm: str = "bbox",
             sigmas=None) -> tuple[dict, str]:
    """(figures, table) for a COCO results file against a COCO annotation file.
    kind: bbox, segm or keypoints (COCOeval; keypoints adds PCK@alpha), or semantic
    (per-image per-class masks, as COCO-Stuff results, scored by confusion matrix)."""
    if kind not in KINDS:
        raise NetdslError(f"evaluation kind must be one of {', '.join(KINDS)}, got '{kind}'")
    gt = cocofile.load(gt_json)
    results = cocofile.read_json(results_json, "results file")
    check_results(results, gt, kind, results_json)
    if kind == "semantic":
        return _semantic(gt, results, gt_json)
    return _cocoeval(gt, results, kind, gt_json, alpha, norm, sigmas)


def evaluate_nothing(gt_json: str, kind: str) -> tuple[dict, str]:
    """(figures, table) of COCOeval for a model that predicted nothing (bbox, segm or
    keypoints): a COCO results file cannot be empty (loadRes refuses one), so the
    evaluator is given an empty detection set; every object is missed (AP and AR 0,
    -1 where the truth has no such objects)."""
    if kind not in STATS:
        raise NetdslError(f"evaluation kind must be one of {', '.join(STATS)}, got '{kind}'")
    gt = cocofile.load(gt_json)
    return _cocoeval(gt, [], kind, gt_json, 0.2, "bbox", None)


def check_results(results, gt, kind: str, path: str) -> None:
    """What COCO.loadRes and COCOeval assume of a results list, checked against gt."""
    def bad(i, msg):
        raise NetdslError(f"{path}: result {i}: {msg}")
    if not isinstance(results, list):
        raise NetdslError(f"{path} is not a COCO results file: expected a list of predictions, "
                          f"got {type(results).__name__}")
    if not results:
        raise NetdslError(f"{path} holds no predictions to evaluate")
    field = {"bbox": "bbox", "segm": "segmentation", "semantic": "segmentation", "keypoints": "keypoints"}[kind]
    for i, r in enumerate(results):
        if not isinstance(r, dict):
            bad(i, f"expected an object, got {cocofile._show(r)}")
        if not cocofile._int(r.get("image_id")) or r["image_id"] not in gt.imgs:
            bad(i, f"image_id {cocofile._show(r.get('image_id'))} is not an image of the ground truth")
        if not cocofile._int(r.get("category_id")) or r["category_id"] not in gt.cats:
            bad(i, f"category_id {cocofile._show(r.get('category_id'))} is not a category of the ground truth")
        if kind != "semantic" and not cocofile._num(r.get("score")):
            bad(i, f"'score' must be a number, got {cocofile._show(r.get('score'))}")
        v = r.get(field)
        if field not in r:
            bad(i, f"has no '{field}', which {kind} evaluation reads")
        if kind == "bbox" and not (isinstance(v, list) and len(v) == 4 and all(map(cocofile._num, v))
                                   and v[2] >= 0 and v[3] >= 0):
            bad(i, f"'bbox' must be [x, y, width, height] with width, height >= 0, got {cocofile._show(v)}")
        if field == "segmentation":
            info = gt.imgs[r["image_id"]]
            hw = [info["height"], info["width"]]
            if not (isinstance(v, dict) and v.get("size") == hw and isinstance(v.get("counts"), str)):
                bad(i, f"'segmentation' must be a compressed RLE ({{'size': {hw}, 'counts': '...'}}), "
                       f"got {cocofile._show(v)}")
            if not cocofile.rle_fits(v["counts"], hw):
                bad(i, f"the RLE counts do not describe a {hw[0]} x {hw[1]} mask")
        if kind == "keypoints":
            k = len(gt.cats[r["category_id"]].get("keypoints") or [])
            if not (isinstance(v, list) and k and len(v) == 3 * k and all(map(cocofile._num, v))):
                bad(i, f"'keypoints' must be {3 * k} numbers (x, y, v per joint), got {cocofile._show(v)}")


def _cocoeval(gt, results, kind, gt_json, alpha, norm, sigmas):
    from pycocotools.cocoeval import COCOeval
    params = None
    if kind == "keypoints":
        cat = _keypoint_category(gt, gt_json)
        params = oks_sigmas(cat["keypoints"], sigmas)
        missing = [a["id"] for a in gt.anns.values() if "keypoints" in a and "num_keypoints" not in a]
        if missing:
            raise NetdslError(f"{gt_json}: annotation {missing[0]} has keypoints but no 'num_keypoints', "
                              f"which COCOeval reads")
    with contextlib.redirect_stdout(io.StringIO()):      # loadRes and evaluate print progress
        dt = gt.loadRes(results) if results else _no_detections(gt)
        E = COCOeval(gt, dt, kind)
        if params is not None:
            E.params.kpt_oks_sigmas = params
        E.evaluate()
        E.accumulate()
    table = io.StringIO()
    with contextlib.redirect_stdout(table):
        E.summarize()
    figures = {name: float(v) for name, v in zip(STATS[kind], E.stats)}
    text = f"COCOeval {kind} ({len(results)} predictions, {len(gt.imgs)} images; -1: no such objects)\n" \
        + table.getvalue()
    if kind == "keypoints":
        p = _pck_of_results(gt, dt, cat, alpha, norm, gt_json)
        if p is not None:
            figures[f"PCK@{alpha:g}"] = p
            text += f" PCK@{alpha:g} ({norm} size) = {p:.3f}\n"
    return figures, text


def _no_detections(gt):
    """An empty detection set over gt's images, as loadRes would make from no results."""
    from pycocotools.coco import COCO
    dt = COCO()
    dt.dataset = {"images": list(gt.dataset["images"]), "categories": list(gt.dataset.get("categories", [])),
                  "annotations": []}
    dt.createIndex()
    return dt


def _keypoint_category(gt, gt_json):
    cats = [c for c in gt.cats.values() if c.get("keypoints")]
    if len(cats) != 1:
        raise NetdslError(f"{gt_json}: keypoint evaluation needs exactly one category with keypoints, "
                          f"found {len(cats)}")
    return cats[0]


def oks_sigmas(names, sigmas=None) -> np.ndarray:
    """The per-joint OKS sigmas: given, or looked up by joint name (SIGMAS)."""
    if sigmas is not None:
        s = np.asarray(sigmas, np.float64)
        if s.shape != (len(names),) or not np.all(s > 0):
            raise NetdslError(f"keypoint sigmas must be {len(names)} positive numbers, one per joint")
        return s
    unknown = [n for n in names if n not in SIGMAS]
    if unknown:
        raise NetdslError(f"no OKS sigma is known for joint '{unknown[0]}'",
                          hint="give sigmas=[...], one per joint (COCO's range from 0.025 to 0.107)")
    return np.array([SIGMAS[n] for n in names])


def _pck_of_results(gt, dt, cat, alpha, norm, gt_json):
    """PCK of each image's best-scoring prediction against its one person; None when
    some image holds several people (PCK is a single-person measure)."""
    truth, pred, seen, boxes = [], [], [], []
    k = len(cat["keypoints"])
    for image_id in sorted(gt.imgs):
        people = [a for a in gt.imgToAnns[image_id] if "keypoints" in a and a.get("num_keypoints", 0) > 0
                  and not a.get("iscrowd", 0)]
        if not people:
            continue
        if len(people) > 1:
            return None
        a = people[0]
        kp = np.reshape(a["keypoints"], (k, 3))
        cands = [d for d in dt.imgToAnns.get(image_id, []) if d["category_id"] == cat["id"]]
        best = max(cands, key=lambda d: d["score"]) if cands else None
        truth.append(kp[:, :2])
        seen.append(kp[:, 2] > 0)
        pred.append(np.reshape(best["keypoints"], (k, 3))[:, :2] if best else np.full((k, 2), np.inf))
        x, y, w, h = a["bbox"]
        boxes.append([x, y, x + w, y + h])
    if not truth:
        return None
    return pck(np.array(pred), np.array(truth), np.array(seen), np.array(boxes), alpha, norm, cat["keypoints"])


def _semantic(gt, results, gt_json):
    from .coco import paint_label_map
    cats = sorted(gt.cats)
    cls = {c: i + 1 for i, c in enumerate(cats)}
    by_image: dict[int, list] = {}
    for r in results:
        by_image.setdefault(r["image_id"], []).append(r)
    from pycocotools import mask as cmask
    c = np.zeros((len(cats) + 1,) * 2, np.int64)
    for image_id, info in gt.imgs.items():
        hw = (info["height"], info["width"])
        truth = paint_label_map(gt, gt.imgToAnns[image_id], cls, hw, gt_json)
        pred = np.zeros(hw, np.int64)
        for r in by_image.get(image_id, []):
            pred[cmask.decode({"size": r["segmentation"]["size"],
                               "counts": r["segmentation"]["counts"].encode()}).astype(bool)] = cls[r["category_id"]]
        c += confusion(pred, truth, len(cats) + 1)
    figures = segmentation_scores(c, ["background"] + [gt.cats[i]["name"] for i in cats])
    lines = [f"semantic segmentation ({len(gt.imgs)} images, {int(c.sum())} pixels)",
             f"  pixel accuracy  {figures['pixel_accuracy']:.4f}", f"  mean IoU        {figures['miou']:.4f}"]
    lines += [f"  IoU {k[4:]:<12}{v:.4f}" for k, v in figures.items() if k.startswith("iou/")]
    return figures, "\n".join(lines) + "\n"

