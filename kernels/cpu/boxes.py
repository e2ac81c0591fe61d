"""Boxes: anchors, SSD default boxes, box coding, IoU, NMS, RPN proposals, RoIs.

torchvision's conventions and numbers: a box is (x1, y1, x2, y2); a RoI is (image index,
x1, y1, x2, y2). None of these has a gradient (docs/language.md, "Detection").

Padding (the detection contract): an *empty* box (x2 <= x1 or y2 <= y1; the all-zero
padding row among them) is never a box. It encodes to zero deltas, has IoU 0 with
everything, never enters NMS, and to_rois makes it a padding RoI. Outputs of a fixed size
pad after the valid rows: NMS with zero boxes and scores and label -1, proposals with
RoIs of image index -1 and a zero box.

NMS is greedy in the order (score descending, index ascending): a candidate is kept when
no kept candidate of its class overlaps it by IoU > iou (torchvision's C++ semantics, its
stable sort). Candidates are checked against the kept ones only, so the cost is
candidates x kept, and stops once enough are kept. The arithmetic is exact IEEE in
torchvision's order (no fastmath), so a borderline IoU falls the same way on both targets.
"""
from __future__ import annotations

import math

import numpy as np

from .. import box_tables
from . import as_float, kernel, njit, prange

BBOX_CLIP = math.log(1000.0 / 16)    # torchvision's BoxCoder clamps dw, dh to this before exp


def exact(fn):
    """A helper in IEEE order (no fastmath), as every function here."""
    return njit(fn, exact=True)


# ---- anchors and default boxes

def _spread(base, out, W, stride):
    """out[(y*W + x)*A + a] = base[a] shifted by (x, y) * stride (torchvision grid_anchors)."""
    A = base.shape[0]
    for e in prange(out.shape[0]):
        a = e % A
        cell = e // A
        sx = out.dtype.type((cell % W) * stride)
        sy = out.dtype.type((cell // W) * stride)
        out[e, 0] = sx + base[a, 0]
        out[e, 1] = sy + base[a, 1]
        out[e, 2] = sx + base[a, 2]
        out[e, 3] = sy + base[a, 3]
    return out


_spread = kernel(_spread, exact=True)


def anchors(hw, sizes, ratios, stride, dtype=np.float32):
    """Faster R-CNN's anchors over an H x W feature map: [H*W*A, 4], (y, x, anchor) order,
    anchor a = ratio * len(sizes) + size (torchvision's AnchorGenerator)."""
    H, W = int(hw[0]), int(hw[1])
    base = box_tables.base_anchors(sizes, ratios).astype(dtype)
    out = np.empty((H * W * base.shape[0], 4), dtype)
    _spread(out.size, base, out, W, int(stride))
    return out


def default_boxes(grids, ratios, smin, smax, image=(0, 0), scales=(), steps=(), dtype=np.float32):
    """SSD's default boxes (torchvision's DefaultBoxGenerator); see box_tables.default_boxes."""
    return box_tables.default_boxes(grids, ratios, smin, smax, image, scales, steps, dtype)


# ---- box coding

def _encode(b, a, out, w, div, K, aoff):
    T = out.dtype.type
    half = T(0.5)
    for r in prange(b.shape[0]):
        k = (r // div) % K
        ew = a[k, aoff + 2] - a[k, aoff]
        eh = a[k, aoff + 3] - a[k, aoff + 1]
        gw = b[r, 2] - b[r, 0]
        gh = b[r, 3] - b[r, 1]
        if ew <= 0 or eh <= 0 or gw <= 0 or gh <= 0:    # an empty box (padding): no target
            for i in range(4):
                out[r, i] = T(0)
            continue
        ecx = a[k, aoff] + half * ew
        ecy = a[k, aoff + 1] + half * eh
        gcx = b[r, 0] + half * gw
        gcy = b[r, 1] + half * gh
        out[r, 0] = w[0] * (gcx - ecx) / ew
        out[r, 1] = w[1] * (gcy - ecy) / eh
        out[r, 2] = w[2] * np.log(gw / ew)
        out[r, 3] = w[3] * np.log(gh / eh)
    return out


@exact
def _decode_one(ax1, ay1, ax2, ay2, d0, d1, d2, d3, w, clip):
    """One box from its deltas and anchor (torchvision's BoxCoder.decode_single)."""
    half = w.dtype.type(0.5)
    widths = ax2 - ax1
    heights = ay2 - ay1
    cx = ax1 + half * widths
    cy = ay1 + half * heights
    dx = d0 / w[0]
    dy = d1 / w[1]
    dw = d2 / w[2]
    dh = d3 / w[3]
    if dw > clip:       # (NaN stays NaN, as with torch.clamp)
        dw = clip
    if dh > clip:
        dh = clip
    pcx = dx * widths + cx
    pcy = dy * heights + cy
    hw = half * (np.exp(dw) * widths)
    hh = half * (np.exp(dh) * heights)
    return pcx - hw, pcy - hh, pcx + hw, pcy + hh



def _decode(d, a, out, w, div, K, aoff, clip):
    c = out.dtype.type(clip)
    for r in prange(d.shape[0]):
        k = (r // div) % K
        x1, y1, x2, y2 = _decode_one(a[k, aoff], a[k, aoff + 1], a[k, aoff + 2], a[k, aoff + 3],
                                     d[r, 0], d[r, 1], d[r, 2], d[r, 3], w, c)
        out[r, 0] = x1
        out[r, 1] = y1
        out[r, 2] = x2
        out[r, 3] = y2
    return out


_encode = kernel(_encode, exact=True)
_decode = kernel(_decode, exact=True)


def _coder(fn, x, anchors, weights, *extra):
    x = as_float(x)
    a = np.ascontiguousarray(anchors, x.dtype)
    rows, div, K, aoff = box_tables.coder_layout(x.shape, a.shape)
    out = np.empty(x.shape, x.dtype)
    fn(x.size, x.reshape(rows, 4), a, out.reshape(rows, 4), np.asarray(weights, x.dtype), div, K, aoff, *extra)
    return out


def box_encode(boxes, anchors, weights=(1.0, 1.0, 1.0, 1.0)):
    """(dx, dy, dw, dh) of boxes against their anchors (torchvision BoxCoder.encode)."""
    return _coder(_encode, boxes, anchors, weights)


def box_decode(deltas, anchors, weights=(1.0, 1.0, 1.0, 1.0), clip=BBOX_CLIP):
    """Boxes from deltas and anchors (BoxCoder.decode, dw and dh clamped at clip)."""
    return _coder(_decode, deltas, anchors, weights, clip)


# ---- IoU

@exact
def _iou_pair(b, i, c, j):
    """IoU of b[i] and c[j] as torchvision computes it; 0 where the union is not positive
    (two empty boxes: torchvision's box_iou gives NaN there)."""
    T = b.dtype.type
    w = min(b[i, 2], c[j, 2]) - max(b[i, 0], c[j, 0])
    h = min(b[i, 3], c[j, 3]) - max(b[i, 1], c[j, 1])
    w = w if w > 0 else T(0)
    h = h if h > 0 else T(0)
    inter = w * h
    union = (b[i, 2] - b[i, 0]) * (b[i, 3] - b[i, 1]) + (c[j, 2] - c[j, 0]) * (c[j, 3] - c[j, 1]) - inter
    return inter / union if union > 0 else T(0)



def _iou(a, b, out):
    A = a.shape[0]
    for r in prange(out.shape[0] * A):
        n = r // A
        i = r % A
        for j in range(b.shape[1]):
            out[n, i, j] = _iou_pair(a, i, b[n], j)
    return out


_iou = kernel(_iou, exact=True)


def box_iou(a, b):
    """IoU of every pair: a [A, 4] with b [B, 4] -> [A, B]; b [N, B, 4] -> [N, A, B]."""
    a = as_float(a)
    b = np.ascontiguousarray(b, a.dtype)
    bb = b.reshape(-1, b.shape[-2], 4)
    out = np.empty((bb.shape[0], a.shape[0], bb.shape[1]), a.dtype)
    _iou(out.size, a, bb, out)
    return out.reshape(tuple(b.shape[:-2]) + (a.shape[0], b.shape[-2]))


# ---- greedy NMS

@exact
def _greedy(sb, sc, count, thr, max_out, keep):
    """Greedy NMS over sorted candidates sb[:count] (boxes) of classes sc: fills keep with
    the positions kept, at most max_out; returns how many."""
    kept = 0
    for i in range(count):
        ok = True
        for t in range(kept):
            j = keep[t]
            if sc[j] == sc[i] and _iou_pair(sb, j, sb, i) > thr:
                ok = False
                break
        if ok:
            keep[kept] = i
            kept += 1
            if kept == max_out:
                break
    return kept


@exact
def _sorted(cand, count, key, boxes, bdiv, cls, C):
    """The candidates cand[:count] ordered by key descending then index (a stable sort):
    (ids, their boxes [count, 4] from boxes[id // bdiv], their classes: id % C, or
    cls[id] when C is 0)."""
    neg = np.empty(count, key.dtype)
    for a in range(count):
        neg[a] = -key[cand[a]]
    order = np.argsort(neg, kind="mergesort")
    ids = np.empty(count, np.int64)
    sb = np.empty((count, 4), boxes.dtype)
    sc = np.empty(count, np.int64)
    for a in range(count):
        q = cand[order[a]]
        ids[a] = q
        for i in range(4):
            sb[a, i] = boxes[q // bdiv, i]
        sc[a] = q % C if C > 0 else cls[q]
    return ids, sb, sc


@exact
def _non_empty(b, i):
    return b[i, 2] > b[i, 0] and b[i, 3] > b[i, 1]


@exact
def _nms_keep(boxes, scores, cls, thr):
    count = 0
    cand = np.empty(scores.shape[0], np.int64)
    for q in range(scores.shape[0]):
        if scores[q] == scores[q]:      # NaN scores have no place in the order
            cand[count] = q
            count += 1
    ids, sb, sc = _sorted(cand, count, scores, boxes, 1, cls, 0)
    keep = np.empty(count, np.int64)
    kept = _greedy(sb, sc, count, thr, count, keep)
    out = np.empty(kept, np.int64)
    for t in range(kept):
        out[t] = ids[keep[t]]
    return out


def nms(boxes, scores, iou):
    """torchvision.ops.nms: indices (i64) of the boxes kept, by decreasing score."""
    return batched_nms(boxes, scores, None, iou)


def batched_nms(boxes, scores, idxs, iou):
    """torchvision.ops.batched_nms: NMS within each class idxs[i] (None: one class);
    indices kept, by decreasing score (then index)."""
    boxes = as_float(boxes).reshape(-1, 4)
    scores = np.ascontiguousarray(scores, boxes.dtype).reshape(-1)
    cls = np.zeros(scores.shape[0], np.int64) if idxs is None else np.ascontiguousarray(idxs, np.int64).reshape(-1)
    return _nms_keep(boxes, scores, cls, boxes.dtype.type(iou))


# ---- NMS of a detector's outputs, per image and class

def _detect(boxes, scores, C, bdiv, bg, sthr, thr, ob, os, ol):
    none = np.zeros(1, np.int64)
    M = ol.shape[1]
    for n in prange(scores.shape[0]):
        KC = scores.shape[1]
        cand = np.empty(KC, np.int64)
        count = 0
        for q in range(KC):
            s = scores[n, q]
            if q % C != bg and s > sthr and _non_empty(boxes[n], q // bdiv):
                cand[count] = q
                count += 1
        ids, sb, sc = _sorted(cand, count, scores[n], boxes[n], bdiv, none, C)
        keep = np.empty(M, np.int64)
        kept = _greedy(sb, sc, count, thr, M, keep)
        for t in range(M):
            if t < kept:
                a = keep[t]
                for i in range(4):
                    ob[n, t, i] = sb[a, i]
                os[n, t] = scores[n, ids[a]]
                ol[n, t] = sc[a]
            else:
                for i in range(4):
                    ob[n, t, i] = 0
                os[n, t] = 0
                ol[n, t] = -1
    return ob


_detect = kernel(_detect, exact=True)


def detect_nms(boxes, scores, iou, max_out, score_thresh=0.0, background=-1):
    """The `nms` operator: per image, the boxes of every class but `background` scoring
    above score_thresh, NMS within each class, the max_out best by score. scores [N, K]
    (one class) or [N, K, C]; boxes [N, K, 4] (shared) or [N, K, C, 4]. Returns boxes
    [N, M, 4], scores [N, M], labels i64 [N, M]; padding rows 0, 0 and -1."""
    boxes = as_float(boxes)
    N, K = scores.shape[:2]
    C = scores.shape[2] if scores.ndim == 3 else 1
    scores = np.ascontiguousarray(scores, boxes.dtype).reshape(N, K * C)
    bdiv = C if boxes.ndim == 3 else 1
    b = boxes.reshape(N, -1, 4)
    T = boxes.dtype.type
    ob = np.empty((N, max_out, 4), boxes.dtype)
    os = np.empty((N, max_out), boxes.dtype)
    ol = np.empty((N, max_out), np.int64)
    _detect(scores.size, b, scores, C, bdiv, int(background), T(score_thresh), T(iou), ob, os, ol)
    return ob, os, ol


# ---- RPN proposals

def _proposals(obj, d, a, aoff, pre, post, thr, min_size, H, W, clip, rois):
    T = d.dtype.type
    none = np.zeros(1, np.int64)
    N, K = d.shape[:2]
    P = obj.shape[2]
    for n in prange(N):
        boxes = np.empty((K, 4), d.dtype)
        key = np.empty(K, d.dtype)
        cand = np.empty(K, np.int64)
        count = 0
        one = np.ones(4, d.dtype)
        for k in range(K):
            x1, y1, x2, y2 = _decode_one(a[k, aoff], a[k, aoff + 1], a[k, aoff + 2], a[k, aoff + 3],
                                         d[n, k, 0], d[n, k, 1], d[n, k, 2], d[n, k, 3], one, clip)
            if H > 0:      # torchvision's clip_boxes_to_image (NaN stays NaN)
                x1 = min(max(x1, T(0)), W) if x1 == x1 else x1
                x2 = min(max(x2, T(0)), W) if x2 == x2 else x2
                y1 = min(max(y1, T(0)), H) if y1 == y1 else y1
                y2 = min(max(y2, T(0)), H) if y2 == y2 else y2
            boxes[k, 0] = x1
            boxes[k, 1] = y1
            boxes[k, 2] = x2
            boxes[k, 3] = y2
            s = obj[n, k, P - 1] - obj[n, k, 0] if P == 2 else obj[n, k, 0]
            key[k] = s
            w = x2 - x1
            h = y2 - y1
            if s == s and w > 0 and h > 0 and w >= min_size and h >= min_size:
                cand[count] = k
                count += 1
        ids, sb, sc = _sorted(cand, count, key, boxes, 1, none, 1)
        keep = np.empty(post, np.int64)
        kept = _greedy(sb, sc, min(count, pre), thr, post, keep)
        for t in range(post):
            r = n * post + t
            if t < kept:
                rois[r, 0] = T(n)
                for i in range(4):
                    rois[r, 1 + i] = sb[keep[t], i]
            else:
                rois[r, 0] = T(-1)
                for i in range(4):
                    rois[r, 1 + i] = T(0)
    return rois


_proposals = kernel(_proposals, exact=True)


def proposals(scores, deltas, anchors, pre_nms, post_nms, iou, min_size=0.0, image=(0, 0)):
    """The RPN's proposal layer. scores [N, K] (objectness logit) or [N, K, 2] (background,
    object: ordered by their difference), deltas [N, K, 4], anchors [K, 4]. Per image:
    decode every anchor (BoxCoder weights 1), clip to image = (H, W) (0: no clipping),
    drop empty boxes and those with a side below min_size, keep the pre_nms best, NMS at
    iou, keep post_nms: RoIs [N*post_nms, 5], image n's in rows n*post_nms..., best
    first; rows past the survivors are padding (index -1, zero box)."""
    d = as_float(deltas)
    N, K = d.shape[:2]
    obj = np.ascontiguousarray(scores, d.dtype).reshape(N, K, -1)
    a = np.ascontiguousarray(anchors, d.dtype)
    T = d.dtype.type
    H, W = image
    rois = np.empty((N * post_nms, 5), d.dtype)
    _proposals(d.size, obj, d, a, a.shape[1] - 4, int(pre_nms), int(post_nms), T(iou), T(min_size),
               T(H if H and W else 0), T(W), T(BBOX_CLIP), rois)
    return rois


# ---- RoIs

def to_rois(boxes):
    """Boxes per image [N, K, 4] -> RoIs [N*K, 5], each prefixed with its image index; an
    empty box (padding) becomes a padding RoI (index -1, zero box)."""
    b = as_float(boxes)
    N, K = b.shape[:2]
    out = np.zeros((N * K, 5), b.dtype)
    flat = b.reshape(N * K, 4)
    ok = (flat[:, 2] > flat[:, 0]) & (flat[:, 3] > flat[:, 1])
    out[:, 0] = np.where(ok, np.repeat(np.arange(N, dtype=b.dtype), K), b.dtype.type(-1))
    out[:, 1:] = np.where(ok[:, None], flat, 0)
    return out
