"""Dense captioning at test time: `netdsl eval RUN_DIR` and `--predict IMAGE|DIR` for
densecap.net (Johnson et al. 2016), whose graph at training = false gives, per proposal,
its refined box (`boxes` [N, P, 4]), object probability (`region_scores` [N, P]), the
proposal row (`regions` [N*P, 5], image index -1 for padding) and caption scores
(`caption_logits` [N*P, T, vocab]) for the words fed in `tokens` [N, P, T].

Decoding is caption.py's: the LSTM runs one word at a time, <start> first, each
proposal's most likely word fed back, the scan's state carried from one call to the
next, until <end> or the data's phrase length. Then, as the paper's test time, the
regions scoring at least MIN_SCORE are kept through a final NMS at FINAL_NMS IoU, best
first, at most MAX_REGIONS an image.

Scores (`evaluate_regions`): the ground-truth regions are matched to the detections
greedily by decreasing score (each detection to the unmatched region it overlaps most
at IoU >= 0.5, as COCOeval matches), and
  caption_match  the share of ground-truth regions matched by a detection whose greedy
                 caption equals the region's phrase (tokenised: case and punctuation aside)
  localized      the share matched at all
  bleu4          sacrebleu's corpus BLEU-4 of the matched detections' captions against
                 their regions' phrases
  AP, AP50 ...   COCOeval's box table of the detections against the regions (one class)
"""
from __future__ import annotations

import json
import math
import os

import numpy as np

from ..errors import NetdslError

OUTPUTS = ("boxes", "region_scores", "regions", "caption_logits")
MIN_SCORE = 0.05
FINAL_NMS = 0.3         # Johnson et al.'s final_nms_thresh
MAX_REGIONS = 100
MATCH_IOU = 0.5


def is_dense_captioner(g) -> bool:
    """Whether g is a dense captioning graph at test time (the outputs above and `tokens`)."""
    return all(n in g.outputs for n in OUTPUTS) and "tokens" in g.inputs


def describe(model, vocab: list[str], feeds: dict, max_len: int) -> list[list[dict]]:
    """Per image of the batch in `feeds` (its `tokens` replaced here), the kept regions:
    [{"box": [x1, y1, x2, y2] in the input's pixels, "score", "caption"}], best first."""
    from ..kernels.cpu.boxes import nms
    from ..datasets.captions import END, PAD, START
    tok = model.g.inputs["tokens"]
    B = len(next(iter(feeds.values())))
    P = tok.shape[1]
    word = np.full(B * P, START, np.int64)
    done = np.zeros(B * P, bool)
    words = [[] for _ in range(B * P)]
    carry, first = None, None
    for _ in range(max_len + 1):
        out = model.infer({**feeds, "tokens": word.reshape(B, P, 1)}, want=list(OUTPUTS), carry=carry)
        carry = model.carries
        first = first or out
        scores = np.asarray(out["caption_logits"])[:, 0]
        word = scores.argmax(1)
        if word.max() >= len(vocab):
            raise NetdslError(f"the model chose word id {int(word.max())}, outside the run's vocabulary of "
                              f"{len(vocab)} words", hint="train with --set vocab=<the data's vocabulary size>")
        for r in np.flatnonzero(~done):
            if word[r] == END:
                done[r] = True
            else:
                words[r].append(vocab[word[r]])
        if done.all():
            break
        word = np.where(done, PAD, word)
    h, w = model.g.inputs["image"].shape[2:]
    boxes = np.asarray(first["boxes"], np.float32).copy()       # refined boxes may leave the image: clip them
    np.clip(boxes, 0, np.array([w, h, w, h], np.float32), out=boxes)
    probs = np.asarray(first["region_scores"], np.float32)
    valid = (np.asarray(first["regions"])[:, 0] >= 0).reshape(B, P)
    result = []
    for b in range(B):
        wh = boxes[b, :, 2:] - boxes[b, :, :2]
        cand = np.flatnonzero(valid[b] & (probs[b] >= MIN_SCORE) & (wh > 0).all(1))
        keep = cand[nms(boxes[b, cand], probs[b, cand], FINAL_NMS)][:MAX_REGIONS] if len(cand) else cand
        result.append([{"box": boxes[b, k].tolist(), "score": float(probs[b, k]),
                        "caption": " ".join(words[b * P + k])} for k in keep])
    return result


def _batches(t):
    """(feeds, image rows) per batch of the held-out split, normalised as in training."""
    row = 0
    for batch in t.test_loader:      # in order
        feeds = t._feeds(batch)
        n = len(feeds["image"])
        yield feeds, range(row, row + n)
        row += n


def match(dets: list[dict], regions: list, iou: float = MATCH_IOU) -> list[tuple[int, int]]:
    """[(detection index, region index)]: detections by decreasing score, each matched to
    the unmatched region (box, phrase) it overlaps most at IoU >= iou."""
    from ..datasets.evaluate import box_iou
    if not dets or not regions:
        return []
    order = sorted(range(len(dets)), key=lambda i: -dets[i]["score"])
    gt = np.array([r[0] for r in regions], np.float64)
    taken, pairs = np.zeros(len(regions), bool), []
    for i in order:
        o = box_iou(np.repeat(np.array([dets[i]["box"]], np.float64), len(gt), 0), gt)
        o[taken] = -1
        j = int(np.argmax(o))
        if o[j] >= iou:
            taken[j] = True
            pairs.append((i, j))
    return pairs


def region_scores(detections: list[list[dict]], regions: list[list]) -> dict[str, float]:
    """caption_match, localized and bleu4 (module docstring) of detections (per image,
    boxes in the regions' pixels) against the regions (per image, [(box, phrase)])."""
    from ..datasets.captions import caption_scores, tokenize
    total = sum(len(r) for r in regions)
    if total == 0:
        raise NetdslError("no ground-truth region to score the detections against")
    hits, hyps, refs = 0, [], []
    for dets, regs in zip(detections, regions):
        for i, j in match(dets, regs):
            hyps.append(dets[i]["caption"])
            refs.append([regs[j][1]])
            hits += tokenize(dets[i]["caption"]) == tokenize(regs[j][1])
    out = {"caption_match": hits / total, "localized": len(hyps) / total, "bleu4": 0.0}
    if hyps:
        out["bleu4"] = caption_scores([h or "<none>" for h in hyps], refs)["bleu4"]
    return out


def evaluate_regions(t, run_dir: str) -> tuple[dict, list[str]]:
    """(figures, report lines) of the run's checkpoint on the held-out split; writes
    run_dir/regions.json (every image's kept regions in its file's pixels), and for
    COCOeval run_dir/regions_gt.json (the regions as COCO instances) and results.json."""
    from .checkpoint import atomic_write
    ds = t.data
    meta = ds.meta["test"]
    h, w = ds.test["image"].shape[2:]
    dets = []
    for feeds, rows in _batches(t):
        for k, got in zip(rows, describe(t.model, ds.vocab, feeds, ds.max_len)):
            H, W = meta["sizes"][k]
            s = np.array([W / w, H / h] * 2)
            dets.append([{**d, "box": (np.asarray(d["box"]) * s).tolist()} for d in got])
    figures = region_scores(dets, meta["regions"])
    ids = meta["image_ids"].tolist()
    atomic_write(os.path.join(run_dir, "regions.json"), lambda f: f.write(json.dumps(
        [{"image_id": i, "regions": d} for i, d in zip(ids, dets)], indent=1).encode()))
    total = sum(len(r) for r in meta["regions"])
    lines = [f"{sum(map(len, dets))} regions kept in {len(dets)} held-out images ({total} described); "
             f"greedy captions",
             f"ground-truth regions matched (IoU >= {MATCH_IOU}) with the right caption: "
             f"{figures['caption_match']:.4f}  matched at all: {figures['localized']:.4f}  BLEU-4 of the matched: "
             f"{figures['bleu4']:.4f} (sacrebleu)"]
    more, table = _box_ap(ds, dets, run_dir)
    figures.update(more)
    lines.append(table.rstrip("\n"))
    for k in range(min(3, len(dets))):
        got = "; ".join(f"{d['caption']!r} {d['score']:.2f}" for d in dets[k][:4]) or "nothing"
        lines.append(f"  image {ids[k]}: {got}   (described: {'; '.join(p for _, p in meta['regions'][k])})")
    return figures, lines


def _box_ap(ds, dets, run_dir) -> tuple[dict, str]:
    """COCOeval's bbox table of the detections, the regions written as one-class COCO instances."""
    from ..datasets import results as coco_results
    from ..datasets.evaluate import evaluate, evaluate_nothing
    meta = ds.meta["test"]
    gt = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "region"}]}
    res = []
    for i, (image_id, (H, W), regs, got) in enumerate(zip(meta["image_ids"].tolist(), meta["sizes"].tolist(),
                                                         meta["regions"], dets)):
        gt["images"].append({"id": image_id, "width": W, "height": H, "file_name": f"{image_id}"})
        for (x1, y1, x2, y2), _ in regs:
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": image_id, "category_id": 1,
                                      "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                                      "iscrowd": 0})
        for d in got:
            x1, y1, x2, y2 = d["box"]
            res.append({"image_id": image_id, "category_id": 1, "score": round(d["score"], 5),
                        "bbox": [round(v, 2) for v in (x1, y1, x2 - x1, y2 - y1)]})
    from .checkpoint import atomic_write
    gt_path, res_path = os.path.join(run_dir, "regions_gt.json"), os.path.join(run_dir, "results.json")
    atomic_write(gt_path, lambda f: f.write(json.dumps(gt).encode()))
    if not res:
        if os.path.exists(res_path):
            os.remove(res_path)
        return evaluate_nothing(gt_path, "bbox")
    coco_results.write(res_path, res)
    return evaluate(gt_path, res_path, "bbox")


def predict_regions(t, path: str, out_dir: str, score_threshold: float) -> list[dict]:
    """`--predict IMAGE|DIR`: each image with its kept regions scoring at least
    score_threshold drawn over it, boxes numbered and their captions listed under the
    picture (out_dir/predict/NAME.png), and out_dir/predict/regions.json."""
    from PIL import Image, ImageDraw
    from ..datasets.preview import colour, overlay
    from .checkpoint import atomic_write
    from .vision import MIN_WIDTH, _image_files, _read, _resize
    vocab = getattr(t.data, "vocab", None)
    if not isinstance(vocab, list) or "<start>" not in vocab:
        raise NetdslError(f"--predict {path}: the data of this run has no phrase vocabulary (vg)",
                          hint="dense captioning runs read their words from --data vg:DIR")
    v = t.g.inputs["image"]
    H, W = v.shape[2], v.shape[3]
    norm = t.norm.get(t.fields.get("image"))
    out_dir = os.path.join(out_dir, "predict")
    os.makedirs(out_dir, exist_ok=True)
    P = t.g.inputs["tokens"].shape[1]
    records = []
    for f in _image_files(path):
        im = _read(f)
        x = _resize(im, H, W)[None]
        if norm is not None:
            x = (x - norm[0].reshape(1, -1, 1, 1)) / norm[1].reshape(1, -1, 1, 1)
        got = describe(t.model, vocab, {"image": x.astype(np.float32), "tokens": np.zeros((1, P, 1), np.int64)},
                       t.data.max_len)[0]
        s = np.array([im.shape[1] / W, im.shape[0] / H] * 2)
        got = [{**d, "box": [round(float(c), 2) for c in np.asarray(d["box"]) * s], "score": round(d["score"], 5)}
               for d in got if d["score"] >= score_threshold]
        scale = max(1, math.ceil(MIN_WIDTH / im.shape[1]))
        pic = overlay(im, boxes=[d["box"] for d in got], labels=list(range(1, len(got) + 1)), scale=scale)
        sheet = Image.new("RGB", (pic.width, pic.height + 14 * len(got) + 4), (32, 32, 32))
        sheet.paste(pic, (0, 0))
        draw = ImageDraw.Draw(sheet)
        for k, d in enumerate(got):
            draw.text((d["box"][0] * scale + 2, d["box"][1] * scale + 1), str(k + 1), fill=colour(k + 1))
            draw.text((4, pic.height + 2 + 14 * k), f"{k + 1}. {d['caption']} ({d['score']:.2f})", fill=colour(k + 1))
        target = os.path.join(out_dir, os.path.splitext(os.path.basename(f))[0] + ".png")
        atomic_write(target, lambda fh, sheet=sheet: sheet.save(fh, format="PNG"))
        records.append({"file": f, "overlay": target, "regions": got})
    atomic_write(os.path.join(out_dir, "regions.json"), lambda fh: fh.write(json.dumps(records, indent=1).encode()))
    return records
