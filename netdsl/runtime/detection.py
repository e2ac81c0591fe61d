"""Detectors on COCO-format data: `netdsl eval RUN_DIR` and `--predict IMAGE|DIR` (vision.py
calls in here when a network outputs detections).

A detector's detections are the three outputs of one `nms` (boxes [N, D, 4] in the
input's pixels, scores [N, D], labels [N, D]: class 1..K, padding rows label -1, score 0;
docs/language.md "Detection"), and for Mask R-CNN a mask per detection [N, D, M, M]
(logits, or probabilities when a sigmoid makes them) and, with its keypoint head, K
heatmaps per detection [N, D, K, S, S] (logits), computed from those detections.
Specs with a `training` parameter (faster_rcnn, fast_rcnn, rcnn, mask_rcnn) output
detections only at training = false: evaluation and prediction elaborate that graph, whose
parameters are the training graph's, and load the run's checkpoint into it.

Evaluation collects every val image's real detections, maps them back to the original
image's pixels, writes them as COCO results (results.json: boxes; results_segm.json:
masks pasted into the image as torchvision's paste_masks_in_image does; results_keypoints.json:
each heatmap's peak mapped into its box) and scores them with COCOeval (bbox, and segm and
keypoints where the data has them); a model that detects nothing writes no results file and
scores AP 0 through COCOeval given an empty detection set.
"""
from __future__ import annotations

import math
import os

import numpy as np

from ..errors import NetdslError

SCORE_THRESHOLD = 0.5     # --predict draws detections scoring at least this


# ---------------------------------------------------------------- which outputs

def detection_outputs(g) -> dict[str, str]:
    """{'boxes', 'scores', 'labels'[, 'masks'][, 'keypoints']} -> output name, when the
    outputs include the three outputs of an `nms` (the first such); else {}. 'masks' is
    an output [N, D, M, M] (D the nms's max_out) computed from those detections,
    'keypoints' one [N, D, K, S, S] (heatmaps)."""
    names = {id(v): n for n, v in g.outputs.items()}
    for node in g.nodes:
        if node.op == "nms" and all(id(o) in names for o in node.outputs):
            out = dict(zip(("boxes", "scores", "labels"), (names[id(o)] for o in node.outputs)))
            D = node.attrs["max_out"]
            for n, v in g.outputs.items():
                key = {4: "masks", 5: "keypoints"}.get(v.rank)
                if (key and key not in out and v.dtype.startswith("f") and v.shape[1] == D
                        and v.shape[-2] == v.shape[-1] and isinstance(v.shape[-1], int) and _reads(v, node)):
                    out[key] = n
            return out
    return {}


def _reads(v, node) -> bool:
    """Whether value v is computed from node's outputs."""
    seen, stack = set(), [v]
    while stack:
        x = stack.pop()
        if id(x) in seen or x.producer is None:
            continue
        seen.add(id(x))
        if x.producer is node:
            return True
        stack.extend(i for i in x.producer.inputs if i is not None)
    return False


def mask_probabilities(g, name: str, masks: np.ndarray) -> np.ndarray:
    """The mask output as probabilities: a sigmoid of logits (Mask R-CNN's mask head
    ends in a 1x1 conv), unless the spec applies one (through reshapes) itself."""
    node = g.outputs[name].producer
    while node is not None and node.op in ("reshape", "transpose", "flatten") and node.inputs:
        node = node.inputs[0].producer
    if node is not None and node.op == "sigmoid":
        return masks
    return 1 / (1 + np.exp(-masks.astype(np.float32)))


def inference_graph(path: str, network, sets: dict, explicit: dict, g, sources):
    """(graph, sources) that evaluation and prediction run (sources: file name -> text,
    for the checkpoint's spec hash): g, or, for a spec with a
    `training` parameter whose g has no detections but whose training = false graph
    has, that graph (unless `explicit`, the command's own --set, chooses `training`).
    Its parameters must be g's, names and shapes, for the checkpoint to load."""
    from .densecap import is_dense_captioner     # dense captioning: regions and their captions
    if detection_outputs(g) or g.args.get("training") is not True or "training" in explicit:
        return g, sources
    from ..lang.elaborate import elaborate
    gi, si = elaborate(path, network, {**sets, "training": False})
    if not detection_outputs(gi) and not is_dense_captioner(gi):
        return g, sources
    shapes = lambda x: {k: tuple(p.shape) for k, p in x.params.items()}     # noqa: E731
    if shapes(gi) != shapes(g):
        diff = sorted(set(shapes(gi).items()) ^ set(shapes(g).items()))
        raise NetdslError(f"network '{g.name}' detects at training = false, but that graph's parameters differ "
                          f"from the trained graph's ({', '.join(f'{k} {list(s)}' for k, s in diff[:4])}), so "
                          f"the checkpoint cannot be loaded into it", gi.pos,
                          hint="both branches of `if training` must name their layers alike")
    return gi, si.sources


def class_name(ds, c: int) -> str:
    cats = list(getattr(ds, "categories", []) or [])
    return cats[c - 1] if 1 <= c <= len(cats) else f"class {c}"


# ---------------------------------------------------------------- evaluation

def evaluate_detections(t, run_dir: str, predict_split) -> tuple[dict, list[str]]:
    """(figures, report lines) of COCOeval bbox (and segm for masks) on the test split's
    detections; writes run_dir/results.json (and results_segm.json)."""
    from ..datasets import results as coco_results
    from ..datasets.evaluate import evaluate, evaluate_nothing
    from ..datasets.results import heatmap_keypoints
    ds = t.data
    det = detection_outputs(t.g)
    pred = predict_split(t, list(det.values()))
    boxes, scores, labels = (pred[det[k]] for k in ("boxes", "scores", "labels"))
    if labels.shape != scores.shape or boxes.shape != (*labels.shape, 4):
        raise NetdslError(f"network '{t.g.name}': detections of shapes {boxes.shape}, {scores.shape} and "
                          f"{labels.shape} are not boxes [N, D, 4], scores [N, D] and labels [N, D]", t.g.pos)
    if labels.max(initial=0) > len(ds.categories):
        raise NetdslError(f"network '{t.g.name}' detects class {int(labels.max())}, but the data has "
                          f"{len(ds.categories)} categories ({', '.join(ds.categories)})", t.g.pos,
                          hint=f"--set classes={len(ds.categories)} when training on this data")
    gt = ds.meta["test"]["file"]
    found = int((labels >= 1).sum())
    kinds = {"bbox": ("results.json", lambda: coco_results.box_results(ds, "test", boxes, labels, scores), "")}
    figures = {"detections": found}
    report = [f"{found} detections in {len(labels)} images (at most {labels.shape[1]} an image)"]
    if "masks" in det and _has_masks(gt):
        masks = mask_probabilities(t.g, det["masks"], pred[det["masks"]])
        kinds["segm"] = ("results_segm.json",
                         lambda: coco_results.instance_mask_results(ds, "test", boxes, labels, scores, masks), "mask_")
    elif "masks" in det:
        report.append(f"masks not scored: {gt} has no segmentation for its objects")
    if "keypoints" in det and _has_keypoints(gt):
        kp = heatmap_keypoints(pred[det["keypoints"]], boxes)
        kinds["keypoints"] = ("results_keypoints.json",
                              lambda: coco_results.instance_keypoint_results(ds, "test", kp, labels, scores),
                              "keypoint_")
    elif "keypoints" in det:
        report.append(f"keypoints not scored: {gt} has no category with keypoints")
    for kind, (file, make, prefix) in kinds.items():
        path = os.path.join(run_dir, file)
        res = make()
        if res:
            coco_results.write(path, res)
            got, table = evaluate(gt, path, kind)
            table += f"predictions: {path}\n"
        else:       # COCO results cannot say nothing: no file, and every object missed
            if os.path.exists(path):
                os.remove(path)     # an earlier evaluation's, which these figures do not describe
            got, table = evaluate_nothing(gt, kind)
            table = f"no detections: no {kind} results file (every object is missed)\n" + table
        figures.update({prefix + k: v for k, v in got.items()})
        report.append(table.rstrip("\n"))
    return figures, report


def _has_keypoints(gt_json: str) -> bool:
    from ..datasets import cocofile
    return sum(bool(c.get("keypoints")) for c in cocofile.load(gt_json).cats.values()) == 1


def _has_masks(gt_json: str) -> bool:
    from ..datasets import cocofile
    anns = cocofile.load(gt_json).anns.values()
    return bool(anns) and all(a.get("segmentation") for a in anns)


# ---------------------------------------------------------------- drawing

def draw_detections(t, det: dict, out: dict, im: np.ndarray, hw, threshold: float, scale: int, alpha: float):
    """(PIL image, record) of one image's detections scoring at least `threshold`: boxes
    named with class and score, masks (Mask R-CNN) pasted into the image and tinted."""
    from PIL import ImageDraw
    from ..datasets.preview import colour, overlay
    from ..datasets.results import paste_masks
    H, W = im.shape[:2]
    s = np.array([W / hw[1], H / hw[0]] * 2)
    labels, scores = np.asarray(out[det["labels"]]), np.asarray(out[det["scores"]], np.float64)
    keep = np.flatnonzero((labels >= 1) & (scores >= threshold))
    keep = keep[np.argsort(-scores[keep], kind="stable")]
    boxes = np.asarray(out[det["boxes"]], np.float64)[keep] * s
    labels, scores = labels[keep].tolist(), scores[keep].tolist()
    masks = ()
    if "masks" in det:
        probs = mask_probabilities(t.g, det["masks"], np.asarray(out[det["masks"]])[keep])
        masks = list(paste_masks(probs, boxes, H, W) > 0.5)
    pic = overlay(im, masks=masks, boxes=boxes.tolist(), labels=labels, scale=scale, alpha=alpha)
    d = ImageDraw.Draw(pic)
    points = ()
    if "keypoints" in det:
        from ..datasets.results import heatmap_keypoints
        points = heatmap_keypoints(np.asarray(out[det["keypoints"]])[keep], boxes)
        for kp in points:
            _skeleton(d, kp, getattr(t.data, "skeleton", ()), getattr(t.data, "keypoint_names", ()), scale)
    rec = []
    for i, (box, c, p) in enumerate(zip(boxes.tolist(), labels, scores)):
        name = class_name(t.data, c)
        d.text((box[0] * scale + 2, box[1] * scale + 1), f"{name} {p:.2f}", fill=colour(c))
        rec.append({"label": name, "score": round(p, 5), "box": [round(v, 2) for v in box]})
        if len(points):
            rec[-1]["keypoints"] = [[round(float(x), 2), round(float(y), 2)] for x, y in points[i][:, :2]]
    return pic, {"detections": rec}


def _skeleton(d, kp, skeleton, names, scale: int):
    """One detection's keypoints [K, 3] (image pixels) drawn as preview.overlay draws a
    person's: limbs along the 1-based skeleton pairs, left joints red, right blue."""
    from ..datasets.preview import CENTRE, LEFT, RIGHT
    pts = [(float(x) * scale, float(y) * scale) for x, y in kp[:, :2]]
    for a, b in skeleton:
        if 1 <= a <= len(pts) and 1 <= b <= len(pts):
            d.line([pts[a - 1], pts[b - 1]], fill=(255, 255, 0), width=max(1, scale // 2))
    r = max(2, scale)
    for i, (x, y) in enumerate(pts):
        side = names[i].split("_")[0] if i < len(names) else ""
        d.ellipse([x - r, y - r, x + r, y + r], fill=LEFT if side == "left" else RIGHT if side == "right" else CENTRE,
                  outline=(0, 0, 0))


def check_threshold(v: float) -> float:
    if not (isinstance(v, (int, float)) and math.isfinite(v) and 0 <= v <= 1):
        raise NetdslError(f"--score-threshold must be between 0 and 1, got {v}")
    return float(v)
