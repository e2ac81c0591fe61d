"""Image tasks on COCO-format data: `netdsl eval RUN_DIR` and `netdsl run SPEC --predict IMAGE|DIR`.

Which output holds what is read from the losses it feeds (`heads`): class scores per
pixel [N, C, H, W] into a cross-entropy (segmentation: fcn.net, sliding_window.net),
class scores [N, C] into a cross-entropy (cls_loc.net's logits), a box [N, 4] (x1, y1,
x2, y2 in the input's pixels) into an L2 loss against the input `box`, joints [N, K, 2]
into one against `joints` (pose.net), as metrics.py's task metrics read them.

Evaluation runs the checkpoint over the data's test split (the COCO `val` file), writes
the predictions as a COCO results file (results.json, in the original images' pixels)
and scores that file with datasets/evaluate.py: mIoU and pixel accuracy for
segmentation, COCOeval's bbox table for boxes (with class accuracy and mean box IoU),
COCOeval's keypoints table (OKS) and PCK for joints; a detector's (the three outputs of
an nms, and Mask R-CNN's masks) is scored by detection.py. The figures go to eval.json.

Prediction reads PNG/JPEG images, resizes them to the spec's input as the COCO reader
does, normalises them with the training data's statistics, and draws the predictions
over each original image with datasets/preview.py: coloured masks with a legend, the
box and class name, the skeleton; a detector's boxes with class and score (detection.py).
"""
from __future__ import annotations

import json
import math
import os

import numpy as np

from ..errors import NetdslError
from .detection import SCORE_THRESHOLD, detection_outputs, draw_detections

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
MIN_WIDTH = 320     # overlays of small images are enlarged by a whole factor to at least this width
MASK_ALPHA = 0.8    # predicted classes tint the pixels strongly: the shapes' own colours vary
CAPTION = 18        # the strip under a classifier's overlay (as tall as preview.grid's legend)


def is_image_path(path: str) -> bool:
    """Whether --predict names images (a file with an image extension, or a directory)."""
    return os.path.isdir(path) or os.path.splitext(path)[1].lower() in IMAGE_EXTS


def heads(g) -> dict[str, str]:
    """task -> output name: 'segment' (per-pixel class scores), 'classify' (class
    scores), 'box', 'joints', for the outputs that feed a loss of that task."""
    from .metrics import regression_head
    outputs = {id(v): n for n, v in g.outputs.items()}
    out = {}
    for l in g.losses:
        node = l.value.producer
        if node is None:
            continue
        task, pred = None, node.inputs[0]
        if node.op == "cross_entropy":
            task = {4: "segment", 2: "classify"}.get(pred.rank)
        elif (head := regression_head(g, node)) is not None:
            task, pred, _ = head
        if task is not None and id(pred) in outputs:
            out.setdefault(task, outputs[id(pred)])
    return out


# ---------------------------------------------------------------- evaluation

def evaluate_run(t, run_dir: str) -> tuple[dict, str]:
    """(figures, printable report) of the trainer's checkpoint on its data's test split;
    writes run_dir/results.json (COCO data) and run_dir/eval.json."""
    from ..datasets.coco import CocoDataset
    from ..datasets import results as coco_results
    from ..datasets.evaluate import box_iou, confusion, evaluate, segmentation_scores
    from .checkpoint import atomic_write
    from .detection import evaluate_detections
    from ..datasets.captions import CaptionsDataset
    from ..datasets.vg import RegionsDataset
    from .densecap import evaluate_regions, is_dense_captioner
    ds = t.data
    if isinstance(ds, RegionsDataset) and is_dense_captioner(t.g):     # dense captioning
        figures, report = evaluate_regions(t, run_dir)
    elif isinstance(ds, CaptionsDataset):
        from .caption import evaluate_captions, is_captioner
        figures = t.evaluate()
        report = ["  ".join(f"{k} {v:.4f}" for k, v in figures.items())]
        if is_captioner(t.g):
            more, lines = evaluate_captions(t)
            figures.update(more)
            report += lines
    elif not isinstance(ds, CocoDataset):     # the training-time figures: loss and task metrics
        figures = t.evaluate()
        report = ["  ".join(f"{k} {v:.4f}" for k, v in figures.items())]
    elif detection_outputs(t.g) and ds.task in ("detect", "segment"):     # a segmentation set has boxes too
        figures, report = evaluate_detections(t, run_dir, _predict_split)
    else:
        figures, report = {}, []
        h = heads(t.g)
        want = {"segment": ("segment",), "localize": ("classify", "box"), "pose": ("joints",)}.get(ds.task)
        if want is None:
            raise NetdslError(f"netdsl eval: the data is COCO task '{ds.task}', and network '{t.g.name}' outputs no "
                              f"detections (the boxes, scores and labels of an nms) to score on it", t.g.pos,
                              hint="a detector spec with a `training` parameter detects at training = false, "
                                   "which netdsl eval chooses")
        missing = [w for w in want if w not in h]
        if missing:
            raise NetdslError(f"netdsl eval: network '{t.g.name}' has no {' or '.join(missing)} output for the "
                              f"data's task '{ds.task}' (its outputs by task: "
                              f"{', '.join(f'{k} {v}' for k, v in h.items()) or 'none'})", t.g.pos,
                              hint="evaluate a run on the data it was made for (--data)")
        pred = _predict_split(t, [h[w] for w in want])
        gt = ds.meta["test"]["file"]
        path = os.path.join(run_dir, "results.json")
        if ds.task == "segment":
            maps = pred[h["segment"]].argmax(1)
            res = coco_results.label_map_results(ds, "test", maps)
            kind = "semantic"
        elif ds.task == "localize":
            scores = _softmax(pred[h["classify"]])
            label, box = scores.argmax(1), pred[h["box"]]
            res = coco_results.box_results(ds, "test", box, label, scores.max(1))
            kind = "bbox"
            figures["accuracy"] = float((label == ds.test["label"]).mean())
            figures["box_iou"] = float(box_iou(box, ds.test["box"]).mean())
        else:
            res = coco_results.keypoint_results(ds, "test", pred[h["joints"]])
            kind = "keypoints"
        if res:
            coco_results.write(path, res)
            scores, table = evaluate(gt, path, kind)
        else:       # every pixel predicted background: nothing to write, and the truth is all missed
            if os.path.exists(path):
                os.remove(path)     # an earlier evaluation's, which these figures do not describe
            c = confusion(maps, ds.test["label"], ds.num_classes)
            scores = segmentation_scores(c, ["background", *ds.categories])
            table = "no pixel was predicted as an object: no results file (scored on the arrays)\n"
        figures.update(scores)
        report.append(table.rstrip("\n"))
        if ds.task == "localize":
            report.append(f"class accuracy {figures['accuracy']:.4f}  mean box IoU {figures['box_iou']:.4f}")
        if res:
            report.append(f"predictions: {path}")
    atomic_write(os.path.join(run_dir, "eval.json"), lambda f: f.write(json.dumps(figures, indent=1).encode()))
    return figures, "\n".join(report)


def _predict_split(t, names: list[str]) -> dict[str, np.ndarray]:
    """The outputs `names` for every example of the test split, in order."""
    parts: dict[str, list] = {n: [] for n in names}
    for batch in t.test_loader:      # in order, normalised as in training
        out = t.model.infer(t._feeds(batch), want=names)
        for n in names:
            parts[n].append(np.asarray(out[n]))
    return {n: np.concatenate(p) for n, p in parts.items()}


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


# ---------------------------------------------------------------- prediction on images

def predict_images(t, path: str, out_dir: str, score_threshold: float = SCORE_THRESHOLD) -> list[str]:
    """Overlay PNGs of the predictions on the image `path` or every image in the
    directory `path`, written to out_dir/predict/; returns their paths. Also writes
    out_dir/predict/predictions.json (class, score, box and joints in each image's pixels;
    a detector's detections scoring at least score_threshold)."""
    from .checkpoint import atomic_write
    files = _image_files(path)
    det = detection_outputs(t.g)
    h = heads(t.g) if not det else {}
    if not h and not det:
        raise NetdslError(f"--predict {path}: network '{t.g.name}' has no output to draw (per-pixel class scores, "
                          f"class scores with a box, joints feeding their loss, or the detections of an nms)",
                          t.g.pos, hint="an .npy/.npz file gives the raw outputs of any spec")
    name, v = _image_input(t, list(det.values()) or list(h.values()))
    H, W = v.shape[2], v.shape[3]
    names = _class_names(t, h)
    want = sorted(set(det.values()) | set(h.values()))
    out_dir = os.path.join(out_dir, "predict")
    os.makedirs(out_dir, exist_ok=True)
    written, records, b = [], [], t.cfg["batch"]
    targets = {}
    for f in files:
        target = os.path.join(out_dir, os.path.splitext(os.path.basename(f))[0] + ".png")
        if target in targets:
            raise NetdslError(f"--predict {path}: {os.path.basename(targets[target])} and {os.path.basename(f)} "
                              f"would both be drawn to {target}", hint="rename one of them")
        targets[target] = f
    for i in range(0, len(files), b):
        chunk = files[i:i + b]
        originals = [_read(f) for f in chunk]
        x = np.stack([_resize(im, H, W) for im in originals])
        f_img = t.fields.get(name)
        if f_img in t.norm:
            mean, std = t.norm[f_img]
            x = (x - mean.reshape(1, -1, 1, 1)) / std.reshape(1, -1, 1, 1)
        out = t.model.infer({name: x}, want=want)
        for k, (f, im) in enumerate(zip(chunk, originals)):
            one = {n: np.asarray(y[k]) for n, y in out.items()}
            if det:
                pic, rec = draw_detections(t, det, one, im, (H, W), score_threshold,
                                           max(1, math.ceil(MIN_WIDTH / im.shape[1])), MASK_ALPHA)
            else:
                pic, rec = _draw(t, h, one, im, (H, W), names)
            target = os.path.join(out_dir, os.path.splitext(os.path.basename(f))[0] + ".png")
            atomic_write(target, lambda fh, pic=pic: pic.save(fh, format="PNG"))
            written.append(target)
            records.append({"file": f, "overlay": target, **rec})
    atomic_write(os.path.join(out_dir, "predictions.json"),
                 lambda fh: fh.write(json.dumps(records, indent=1).encode()))
    return written


def _image_files(path: str) -> list[str]:
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path)
                       if os.path.splitext(f)[1].lower() in IMAGE_EXTS and os.path.isfile(os.path.join(path, f)))
        if not files:
            raise NetdslError(f"--predict {path}: the directory holds no images ({', '.join(IMAGE_EXTS)})")
        return files
    if not os.path.exists(path):
        raise NetdslError(f"--predict {path}: no such file")
    return [path]


def _image_input(t, outputs: list[str]):
    """(name, value) of the one image input [N, 3, H, W] the drawn outputs read."""
    from .model import inputs_of
    read = set().union(*(inputs_of(t.g, t.g.outputs[o]) for o in outputs))
    ins = [n for n, v in t.g.inputs.items() if id(v) in read]
    if len(ins) != 1 or t.g.inputs[ins[0]].rank != 4 or t.g.inputs[ins[0]].shape[1] != 3 \
            or not all(isinstance(d, int) for d in t.g.inputs[ins[0]].shape[2:]):
        from .feeds import describe_inputs
        raise NetdslError(f"--predict with images needs outputs that read one RGB image input [N, 3, H, W] of a "
                          f"fixed size; '{t.g.name}' reads {', '.join(ins) or 'no input'} "
                          f"(its inputs: {describe_inputs(t.g)})", t.g.pos,
                          hint="give an .npz with an array per input instead")
    return ins[0], t.g.inputs[ins[0]]


def _read(file: str) -> np.ndarray:
    from PIL import Image
    try:
        with Image.open(file) as f:
            return np.asarray(f.convert("RGB"))
    except FileNotFoundError:
        raise NetdslError(f"--predict: {file} does not exist") from None
    except Exception as e:  # noqa: BLE001 - Pillow raises many kinds for a file it cannot read
        raise NetdslError(f"--predict: {file} cannot be read as an image ({type(e).__name__}: {e})") from None


def _resize(im: np.ndarray, h: int, w: int) -> np.ndarray:
    """float32 [3, h, w] in [0, 1], resized bilinearly as the COCO reader resizes."""
    from PIL import Image
    if im.shape[:2] != (h, w):
        im = np.asarray(Image.fromarray(im).resize((w, h), Image.BILINEAR))
    return im.astype(np.float32).transpose(2, 0, 1) * np.float32(1 / 255)


def _class_names(t, h) -> list[str]:
    """Names of classes 1..C (segmentation: class 0 is background) or 0..C-1 (classification)."""
    ds = t.data
    cats = list(getattr(ds, "categories", []) or [])
    if "segment" in h:
        c = t.g.outputs[h["segment"]].shape[1]
        return [cats[i] if i < len(cats) else f"class {i + 1}" for i in range(c - 1)]
    if "classify" in h:
        c = t.g.outputs[h["classify"]].shape[1]
        return [cats[i] if i < len(cats) else f"class {i}" for i in range(c)]
    return []


def _draw(t, h, out, im, hw, names):
    """(PIL image, record) of one image's predictions drawn over it."""
    from PIL import Image
    from ..datasets.preview import grid, overlay
    H, W = im.shape[:2]
    sx, sy = W / hw[1], H / hw[0]
    scale = max(1, math.ceil(MIN_WIDTH / W))
    rec = {}
    if "segment" in h:
        label = out[h["segment"]].argmax(0)
        if label.shape != (H, W):
            label = np.asarray(Image.fromarray(label.astype(np.int32)).resize((W, H), Image.NEAREST))
        present = [int(c) for c in np.unique(label) if c > 0]
        rec["pixels"] = {names[c - 1]: int((label == c).sum()) for c in present}
        pic = overlay(im, masks=[label == c for c in present], labels=present, scale=scale, alpha=MASK_ALPHA)
        return grid([pic], columns=1, legend=names), rec
    boxes, labels, kp, joint_names, skeleton = [], [], None, (), ()
    if "classify" in h:
        p = _softmax(out[h["classify"]][None])[0]
        c = int(p.argmax())
        rec.update(label=names[c], score=round(float(p[c]), 5))
    if "box" in h:
        x1, y1, x2, y2 = (float(v) for v in out[h["box"]])
        box = [x1 * sx, y1 * sy, x2 * sx, y2 * sy]
        rec["box"] = [round(v, 2) for v in box]
        boxes, labels = [box], [int(np.argmax(out[h["classify"]])) + 1 if "classify" in h else 1]
    if "joints" in h:
        xy = out[h["joints"]] * np.array([sx, sy])
        rec["joints"] = [[round(float(x), 2), round(float(y), 2)] for x, y in xy]
        kp = np.concatenate([xy, np.ones((len(xy), 1))], 1)
        joint_names = list(getattr(t.data, "keypoint_names", []) or [])
        skeleton = list(getattr(t.data, "skeleton", []) or [])
    pic = overlay(im, boxes=boxes, labels=labels, names=names if "classify" in h else (), keypoints=kp,
                  joint_names=joint_names, skeleton=skeleton, scale=scale)
    if "classify" in h:
        pic = _caption(pic, f"{rec['label']} {rec['score']:.2f}", labels[0] if labels else c + 1)
    return pic, rec


def _caption(pic, text: str, label: int):
    """The picture with a strip under it naming the predicted class (in its colour)."""
    from PIL import Image, ImageDraw
    from ..datasets.preview import colour
    w, h = pic.size
    out = Image.new("RGB", (w, h + CAPTION), (32, 32, 32))
    out.paste(pic, (0, 0))
    ImageDraw.Draw(out).text((4, h + 3), text, fill=colour(label))
    return out
