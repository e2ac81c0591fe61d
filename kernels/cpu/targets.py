"""Training targets of the detectors: matching, sampling, and what each RoI must predict.

None of these has a gradient. The shapes and the padding contract are docs/language.md's
("Target assignment and sampling"): ground truth is [N, G, ...] with label -1 on padding
rows (never matched, never a RoI); a RoI (image index, x1, y1, x2, y2) with a negative
index is padding; an empty box (x2 <= x1 or y2 <= y1) has IoU 0 with everything.

- assign_targets: torchvision's Matcher(fg, bg, allow_low_quality_matches=True) per
  image: each anchor's best gt (the first on ties), IoU >= fg foreground, < bg background,
  between ignored; an anchor whose IoU with some gt equals that gt's best (> 0) keeps its
  own best match. (torchvision also does this for a gt that overlaps nothing, which then
  makes every anchor foreground: here such a gt matches nothing.)
- sample_anchors / sample_rois: torchvision's BalancedPositiveNegativeSampler (up to
  batch * fg_fraction positives, negatives for the rest). A subset is drawn as the
  candidates with the smallest hash keys mix(mix(seed) + offset + index): a uniform random
  subset that depends on the seed and the image alone, not on the order of the work.
- hard_negatives: SSD's hard negative mining (torchvision's SSD.compute_loss): the
  ratio * positives negatives of highest cross-entropy, ties to the lower index.
- mask_targets: roi_heads.project_masks_on_boxes, i.e. roi_align of the matched gt mask
  (scale 1, adaptive sampling, not aligned); keypoint_targets: roi_heads.keypoints_to_heatmap.
- yolo_targets / yolo_decode: YOLO v1's grid (docs/language.md).

IEEE order throughout (exact), so thresholds and ties fall as torchvision's float32 does.
"""
from __future__ import annotations

import math

import numpy as np

from . import as_float, kernel, njit, prange
from .rand import mix
from .roi import roi_align

u64 = np.uint64


def exact(fn):
    return njit(fn, exact=True)


@exact
def _iou(ax1, ay1, ax2, ay2, bx1, by1, bx2, by2):
    """torchvision's box_iou of one pair, in the boxes' dtype; 0 if either box is empty."""
    T = type(ax1)
    if ax2 <= ax1 or ay2 <= ay1 or bx2 <= bx1 or by2 <= by1:
        return T(0)
    w = min(ax2, bx2) - max(ax1, bx1)
    h = min(ay2, by2) - max(ay1, by1)
    w = w if w > T(0) else T(0)
    h = h if h > T(0) else T(0)
    inter = w * h
    return inter / ((ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter)


def _gt(gt_boxes, gt_labels, dtype):
    gb = np.ascontiguousarray(gt_boxes, dtype)
    gl = np.ascontiguousarray(gt_labels, np.int64)
    if gb.ndim != 3 or gb.shape[2] != 4 or gl.shape != gb.shape[:2]:
        raise ValueError(f"gt boxes must be [N, G, 4] with labels [N, G], got {gb.shape} and {gl.shape}")
    return gb, gl


# ---------------------------------------------------------------- assign_targets

def _iou_matrix(ref, gb, gl, iou):
    """iou[n, g, k]: anchor (or RoI) k with gt g of image n; -1 where g is padding or
    RoI k belongs to another image, so that pair never matches."""
    N, G, K = iou.shape
    c = ref.shape[1] - 4                       # a RoI's box starts after its image index
    for e in prange(N * G):
        n, g = e // G, e % G
        for k in range(K):
            if gl[n, g] < 0 or (c == 1 and int(ref[k, 0]) != n):
                iou[n, g, k] = -1
            else:
                iou[n, g, k] = _iou(ref[k, c], ref[k, c + 1], ref[k, c + 2], ref[k, c + 3],
                                    gb[n, g, 0], gb[n, g, 1], gb[n, g, 2], gb[n, g, 3])
    return iou


def _assign(iou, ref, gb, gl, fg, bg, binary, labels, boxes):
    N, G, K = iou.shape
    T = iou.dtype.type
    best = np.empty((N, G), iou.dtype)           # each gt's best IoU over the anchors
    for n in range(N):
        for g in range(G):
            m = T(-1)
            for k in range(K):
                m = max(m, iou[n, g, k])
            best[n, g] = m
    for e in prange(N * K):
        n, k = e // K, e % K
        m = _match(iou, best, n, k, G, fg, bg)
        labels[n, k] = (1 if binary else gl[n, m]) if m >= 0 else (0 if m == -1 else -1)
        for j in range(4):
            boxes[n, k, j] = gb[n, m, j] if m >= 0 else T(0)
        if ref.shape[1] == 5 and int(ref[k, 0]) != n:      # a RoI of another image: no label
            labels[n, k] = -1
    return labels


@exact
def _match(iou, best, n, k, G, fg, bg):
    """Anchor k's gt index, or -1 (below bg, or no gt) / -2 (between the thresholds)."""
    T = iou.dtype.type
    bi, bv = -1, T(-1)
    for g in range(G):
        if iou[n, g, k] > bv:
            bi, bv = g, iou[n, g, k]
    if bi < 0:
        return -1                         # no gt in the image: background
    if bv >= fg:
        return bi
    for g in range(G):                    # low-quality match: k is some gt's best anchor
        if best[n, g] > T(0) and iou[n, g, k] == best[n, g]:
            return bi
    return -1 if bv < bg else -2


_iou_matrix = kernel(_iou_matrix, exact=True)
_assign = kernel(_assign, exact=True)


def _reference(anchors):
    ref = as_float(anchors)
    if ref.ndim != 2 or ref.shape[1] not in (4, 5):
        raise ValueError(f"anchors must be [K, 4] (or RoIs [K, 5]), got {ref.shape}")
    return ref


def assign_targets(anchors, gt_boxes, gt_labels, fg_iou, bg_iou, binary):
    """(labels i64 [N, K], matched gt boxes [N, K, 4]): per anchor the label of its gt
    (1 if binary) at IoU >= fg_iou, 0 below bg_iou, -1 between; zero boxes where no gt."""
    ref = _reference(anchors)
    gb, gl = _gt(gt_boxes, gt_labels, ref.dtype)
    N, G = gl.shape
    K = ref.shape[0]
    iou = _iou_matrix(N * G * K, ref, gb, gl, np.empty((N, G, K), ref.dtype))
    T = ref.dtype.type
    labels, boxes = np.empty((N, K), np.int64), np.empty((N, K, 4), ref.dtype)
    _assign(N * G * K, iou, ref, gb, gl, T(fg_iou), T(bg_iou), bool(binary), labels, boxes)
    return labels, boxes


# ---------------------------------------------------------------- balanced sampling

@exact
def _choose(cand, m, take, base, offset, keep):
    """keep[cand[i]] = 1 for the `take` of cand[:m] with the smallest keys
    mix(base + offset + cand[i]) (distinct: mix is a bijection)."""
    if take >= m:
        for i in range(m):
            keep[cand[i]] = 1
        return
    if take <= 0:
        return
    keys = np.empty(m, np.uint64)
    for i in range(m):
        keys[i] = mix(base + u64(offset + cand[i]))
    order = np.argsort(keys)
    for j in range(take):
        keep[cand[order[j]]] = 1


@exact
def _balanced(lab, m, batch, max_pos, base, offset, keep):
    """torchvision's BalancedPositiveNegativeSampler on lab[:m]: keep[i] = 1 for up to
    max_pos positives (label > 0) and negatives (label 0) for the rest of `batch`."""
    pos, neg = np.empty(m, np.int64), np.empty(m, np.int64)
    npos = nneg = 0
    for i in range(m):
        keep[i] = 0
        if lab[i] > 0:
            pos[npos] = i
            npos += 1
        elif lab[i] == 0:
            neg[nneg] = i
            nneg += 1
    take = min(npos, max_pos)
    _choose(pos, npos, take, base, offset, keep)
    _choose(neg, nneg, min(nneg, batch - take), base, offset, keep)


def _sample_anchors(labels, out, batch, max_pos, seed):
    N, K = labels.shape
    base = mix(seed)
    for n in prange(N):
        keep = np.empty(K, np.uint8)
        _balanced(labels[n], K, batch, max_pos, base, n * K, keep)
        for k in range(K):
            out[n, k] = labels[n, k] if keep[k] else -1
    return out


_sample_anchors = kernel(_sample_anchors, exact=True)


def _seed(seed):
    return u64(int(seed) % 2 ** 64)


def sample_anchors(labels, batch, fg_fraction, seed):
    """labels [N, K] with all but the sampled anchors set to -1 (the RPN's 256 per image)."""
    labels = np.ascontiguousarray(labels, np.int64)
    return _sample_anchors(labels.size, labels, np.empty_like(labels), int(batch),
                           int(batch * fg_fraction), _seed(seed))


def _sample_rois(rois, gb, gl, batch, max_pos, fg, bg, bg_lo, seed, o_rois, o_lab, o_box, o_match):
    R = rois.shape[0]
    N, G = gl.shape
    T = rois.dtype.type
    base = mix(seed)
    for n in prange(N):
        # candidates: the image's proposals, then its gt boxes (torchvision's add_gt_proposals)
        cb = np.empty((R + G, 4), rois.dtype)
        m = 0
        for r in range(R):
            if int(rois[r, 0]) == n and rois[r, 3] > rois[r, 1] and rois[r, 4] > rois[r, 2]:
                for j in range(4):
                    cb[m, j] = rois[r, j + 1]
                m += 1
        for g in range(G):
            if gl[n, g] >= 0 and gb[n, g, 2] > gb[n, g, 0] and gb[n, g, 3] > gb[n, g, 1]:
                for j in range(4):
                    cb[m, j] = gb[n, g, j]
                m += 1
        lab, match = np.empty(m, np.int64), np.empty(m, np.int64)
        for i in range(m):           # Matcher(fg, bg) without low-quality matches; no gt: IoU 0
            bi, bv = -1, T(0)
            for g in range(G):
                if gl[n, g] >= 0:
                    v = _iou(cb[i, 0], cb[i, 1], cb[i, 2], cb[i, 3], gb[n, g, 0], gb[n, g, 1], gb[n, g, 2], gb[n, g, 3])
                    if v > bv:
                        bi, bv = g, v
            match[i] = bi if bv >= fg else -1
            lab[i] = gl[n, bi] if bv >= fg else (0 if bv < bg and bv >= bg_lo else -1)
        keep = np.empty(m, np.uint8)
        _balanced(lab, m, batch, max_pos, base, n * (R + G), keep)
        j = n * batch
        for i in range(m):           # in candidate order, as torchvision's where(pos | neg)
            if keep[i]:
                o_rois[j, 0] = T(n)
                for c in range(4):
                    o_rois[j, c + 1] = cb[i, c]
                    o_box[j, c] = gb[n, match[i], c] if lab[i] > 0 else T(0)
                o_lab[j] = lab[i]
                o_match[j] = match[i] if lab[i] > 0 else -1
                j += 1
        for p in range(j, (n + 1) * batch):      # padding rows
            o_rois[p, 0] = T(-1)
            for c in range(4):
                o_rois[p, c + 1] = T(0)
                o_box[p, c] = T(0)
            o_lab[p] = -1
            o_match[p] = -1
    return o_lab


_sample_rois = kernel(_sample_rois, exact=True)


def sample_rois(rois, gt_boxes, gt_labels, batch, fg_fraction, fg_iou, bg_iou, bg_lo, seed):
    """Fast R-CNN's minibatch of `batch` RoIs per image: (rois [N*batch, 5], labels,
    matched gt boxes [N*batch, 4], matched gt index), image n's in rows n*batch.., in
    candidate order, then padding (index -1, label -1, matched -1)."""
    rois = as_float(rois)
    if rois.ndim != 2 or rois.shape[1] != 5:
        raise ValueError(f"rois must be [R, 5], got {rois.shape}")
    gb, gl = _gt(gt_boxes, gt_labels, rois.dtype)
    N = gl.shape[0]
    T = rois.dtype.type
    o_rois, o_box = np.empty((N * batch, 5), rois.dtype), np.empty((N * batch, 4), rois.dtype)
    o_lab, o_match = np.empty(N * batch, np.int64), np.empty(N * batch, np.int64)
    _sample_rois(rois.size * gl.shape[1], rois, gb, gl, int(batch), int(batch * fg_fraction), T(fg_iou), T(bg_iou),
                 T(bg_lo), _seed(seed), o_rois, o_lab, o_box, o_match)
    return o_rois, o_lab, o_box, o_match


# ---------------------------------------------------------------- SSD's hard negatives

def _negative_loss(logits, labels, loss):
    """loss[n, k] = cross-entropy of class 0 (torch's -log_softmax) for a negative
    (label 0), -inf for anything else."""
    N, K, C = logits.shape
    T = logits.dtype.type
    for e in prange(N * K):
        n, k = e // K, e % K
        if labels[n, k] != 0:
            loss[n, k] = -T(np.inf)
            continue
        mx = logits[n, k, 0]
        for c in range(1, C):
            mx = max(mx, logits[n, k, c])
        s = T(0)
        for c in range(C):
            s += math.exp(logits[n, k, c] - mx)
        loss[n, k] = math.log(s) - (logits[n, k, 0] - mx)
    return loss


def _keep_hardest(loss, labels, ratio, out):
    N, K = labels.shape
    for n in prange(N):
        npos = nneg = 0
        for k in range(K):
            out[n, k] = labels[n, k]
            npos += labels[n, k] > 0
            nneg += labels[n, k] == 0
        take = ratio * npos
        if take >= nneg:
            continue
        order = np.argsort(-loss[n], kind="mergesort")     # stable: ties to the lower index
        for j in range(take, K):
            k = order[j]
            if labels[n, k] == 0:
                out[n, k] = -1
    return out


_negative_loss = kernel(_negative_loss, exact=True)
_keep_hardest = kernel(_keep_hardest, exact=True)


def negative_loss(logits, labels):
    logits = as_float(logits)
    labels = np.ascontiguousarray(labels, np.int64)
    return _negative_loss(logits.size, logits, labels, np.empty(labels.shape, logits.dtype))


def keep_hardest(loss, labels, ratio):
    """labels with every negative but the ratio * positives of highest loss set to -1."""
    labels = np.ascontiguousarray(labels, np.int64)
    return _keep_hardest(labels.size, np.ascontiguousarray(loss), labels, int(ratio), np.empty_like(labels))


def hard_negatives(logits, labels, ratio):
    """SSD's hard negative mining: logits [N, K, C], labels [N, K] -> labels [N, K]."""
    return keep_hardest(negative_loss(logits, labels), labels, ratio)


# ---------------------------------------------------------------- per-RoI targets

def _positive(labels, lo, y):
    for i in prange(labels.size):
        y[i] = y.dtype.type(1) if labels[i] >= lo else y.dtype.type(0)
    return y


_positive = kernel(_positive)


def positive(labels, dtype=np.float32, lo=1):
    """1.0 where the label is >= lo (1: foreground; 0: every sampled anchor or RoI), else 0.0."""
    labels = np.ascontiguousarray(labels, np.int64)
    y = np.empty(labels.shape, dtype)
    _positive(labels.size, labels.reshape(-1), lo, y.reshape(-1))
    return y


def _rows(rois, matched, N, G, what):
    """(image index, gt index) per RoI as i64, checked; -1 for padding or background."""
    rois = np.asarray(rois)
    matched = np.ascontiguousarray(matched, np.int64)
    if rois.ndim != 2 or rois.shape[1] != 5 or matched.shape != (rois.shape[0],):
        raise ValueError(f"{what}: rois must be [R, 5] and matched [R], got {rois.shape} and {matched.shape}")
    b = rois[:, 0].astype(np.int64)
    for bad, msg in (((b >= N), lambda i: f"RoI {i} has image index {b[i]}, but there are {N} images"),
                     ((b >= 0) & (matched >= G), lambda i: f"RoI {i} is matched to gt {matched[i]}, but there "
                                                           f"are {G} per image"),
                     ((matched < -1), lambda i: f"RoI {i} is matched to {matched[i]} (-1 is background)")):
        if bad.any():
            raise IndexError(msg(int(np.flatnonzero(bad)[0])))
    m = np.where((b >= 0) & (matched >= 0), matched, -1)
    return np.where(m >= 0, b, -1), m


def _gather(gt, b, m, fill, y):
    M = gt.shape[2]
    for r in prange(y.shape[0]):
        for j in range(M):
            y[r, j] = gt[b[r], m[r], j] if m[r] >= 0 else fill
    return y


_gather = kernel(_gather)


def match_gather(gt, rois, matched, fill):
    """gt [N, G, ...] -> [R, ...]: gt[image of RoI r, matched[r]], `fill` for background
    (matched -1) and padding RoIs."""
    gt = np.ascontiguousarray(gt)
    N, G = gt.shape[:2]
    b, m = _rows(rois, matched, N, G, "match_gather")
    y = np.empty((b.shape[0],) + gt.shape[2:], gt.dtype)
    _gather(y.size, gt.reshape(N, G, -1), b, m, gt.dtype.type(fill), y.reshape(b.shape[0], -1))
    return y


def mask_targets(gt_masks, rois, matched, size):
    """Each positive RoI's gt mask cropped and resized (roi_align, scale 1, adaptive
    sampling, not aligned: torchvision's project_masks_on_boxes): [R, size, size]; zeros
    for background and padding."""
    masks = as_float(gt_masks)
    N, G, H, W = masks.shape
    b, m = _rows(rois, matched, N, G, "mask_targets")
    mrois = np.array(rois, masks.dtype, copy=True).reshape(-1, 5)
    mrois[:, 0] = np.where(m >= 0, b * G + m, -1)        # mask (image, gt) as one batch index
    return roi_align(masks.reshape(N * G, 1, H, W), mrois, size, 1.0, 0, False)[:, 0]


@exact
def _heat_cell(p, lo, hi, size):
    """floor((p - lo) * (size / (hi - lo))) if that is in [0, size), else -1; size - 1 at
    p == hi (torchvision's right and bottom edges)."""
    T = type(p)
    if p == hi:
        return size - 1
    v = (p - lo) * (T(size) / (hi - lo))
    return int(v) if v >= T(0) and v < T(size) else -1


def _heat(kp, rois, b, m, size, y):
    R, K = y.shape
    T = kp.dtype.type
    for e in prange(R * K):
        r, j = e // K, e % K
        y[r, j] = -1
        if m[r] < 0:
            continue
        x1, y1, x2, y2 = rois[r, 1], rois[r, 2], rois[r, 3], rois[r, 4]
        px, py, vis = kp[b[r], m[r], j, 0], kp[b[r], m[r], j, 1], kp[b[r], m[r], j, 2]
        if x2 <= x1 or y2 <= y1 or not vis > T(0):
            continue
        ix, iy = _heat_cell(px, x1, x2, size), _heat_cell(py, y1, y2, size)
        if ix >= 0 and iy >= 0:
            y[r, j] = iy * size + ix
    return y


_heat = kernel(_heat, exact=True)


def keypoint_targets(gt_keypoints, rois, matched, size):
    """torchvision's keypoints_to_heatmap: per RoI and keypoint, the cell index y*size + x
    of a visible keypoint inside the RoI's size x size grid, else -1: i64 [R, K]."""
    kp = as_float(gt_keypoints)
    N, G, K, _ = kp.shape
    b, m = _rows(rois, matched, N, G, "keypoint_targets")
    rois = np.ascontiguousarray(rois, kp.dtype)
    y = np.empty((rois.shape[0], K), np.int64)
    return _heat(y.size, kp, rois, b, m, int(size), y)


# ---------------------------------------------------------------- YOLO v1

@exact
def _cell_of(gb, n, g, S, H, W):
    """(row, column) of the cell holding gt g's centre, and its centre and size as
    fractions of the image; row -1 for an empty box."""
    T = gb.dtype.type
    x1, y1, x2, y2 = gb[n, g, 0], gb[n, g, 1], gb[n, g, 2], gb[n, g, 3]
    cx, cy = (x1 + x2) * T(0.5) / W, (y1 + y2) * T(0.5) / H
    if x2 <= x1 or y2 <= y1:
        return -1, -1, cx, cy, T(0), T(0)
    col = min(max(int(math.floor(cx * T(S))), 0), S - 1)
    row = min(max(int(math.floor(cy * T(S))), 0), S - 1)
    return row, col, cx, cy, (x2 - x1) / W, (y2 - y1) / H


@exact
def _pred_box(pred, n, row, col, b, S):
    """Predictor b's box as (centre x, centre y, w, h), fractions of the image."""
    T = pred.dtype.type
    o = b * 5
    return ((T(col) + pred[n, row, col, o]) / T(S), (T(row) + pred[n, row, col, o + 1]) / T(S),
            pred[n, row, col, o + 2] * pred[n, row, col, o + 2], pred[n, row, col, o + 3] * pred[n, row, col, o + 3])


@exact
def _responsible(pred, n, row, col, B, S, cx, cy, w, h):
    """(predictor, IoU): the highest IoU with the gt (first on ties); if none overlaps,
    the smallest squared error of (x, y, w, h), as darknet's detection layer."""
    T = pred.dtype.type
    best, best_iou, best_err = 0, T(0), T(np.inf)
    for b in range(B):
        px, py, pw, ph = _pred_box(pred, n, row, col, b, S)
        v = _iou(px - pw * T(0.5), py - ph * T(0.5), px + pw * T(0.5), py + ph * T(0.5),
                 cx - w * T(0.5), cy - h * T(0.5), cx + w * T(0.5), cy + h * T(0.5))
        err = (px - cx) * (px - cx) + (py - cy) * (py - cy) + (pw - w) * (pw - w) + (ph - h) * (ph - h)
        if best_iou > T(0) or v > T(0):
            if v > best_iou:
                best, best_iou = b, v
        elif err < best_err:
            best, best_err = b, err
    return best, best_iou


def _yolo_targets(pred, gb, gl, B, C, H, W, target, obj, noobj, cell):
    N, S = pred.shape[0], pred.shape[1]
    G = gl.shape[1]
    T = pred.dtype.type
    for n in prange(N):
        for g in range(G):
            lab = gl[n, g]
            if lab <= 0:                  # padding (-1) or background (0): not an object
                continue
            row, col, cx, cy, w, h = _cell_of(gb, n, g, S, H, W)
            if row < 0 or cell[n, row, col] > T(0):    # empty box, or the cell's taken: first wins
                continue
            cell[n, row, col] = T(1)
            b, v = _responsible(pred, n, row, col, B, S, cx, cy, w, h)
            o = b * 5
            target[n, row, col, o] = cx * T(S) - T(col)
            target[n, row, col, o + 1] = cy * T(S) - T(row)
            target[n, row, col, o + 2] = math.sqrt(w)
            target[n, row, col, o + 3] = math.sqrt(h)
            target[n, row, col, o + 4] = v
            obj[n, row, col, b] = T(1)
            noobj[n, row, col, b] = T(0)
            target[n, row, col, B * 5 + lab - 1] = T(1)
    return target


_yolo_targets = kernel(_yolo_targets, exact=True)


def _image(image):
    return (image, image) if isinstance(image, int) else tuple(image)


def yolo_targets(pred, gt_boxes, gt_labels, boxes, classes, image):
    """YOLO v1's targets for pred [N, S, S, B*5 + C] from gt in image pixels (labels
    1..C): (target like pred, obj [N, S, S, B], noobj [N, S, S, B], cell [N, S, S])."""
    pred = as_float(pred)
    gb, gl = _gt(gt_boxes, gt_labels, pred.dtype)
    bad = np.flatnonzero(gl.reshape(-1) > classes)
    if bad.size:
        raise IndexError(f"gt label {gl.reshape(-1)[bad[0]]} is not a class in 1..{classes} (0: none, -1: padding)")
    N, S = pred.shape[:2]
    T = pred.dtype.type
    H, W = _image(image)
    target = np.zeros(pred.shape, pred.dtype)
    obj, noobj = np.zeros((N, S, S, boxes), pred.dtype), np.ones((N, S, S, boxes), pred.dtype)
    cell = np.zeros((N, S, S), pred.dtype)
    _yolo_targets(pred.size, pred, gb, gl, int(boxes), int(classes), T(H), T(W), target, obj, noobj, cell)
    return target, obj, noobj, cell


def _yolo_decode(pred, B, C, H, W, boxes, scores):
    N, S = pred.shape[0], pred.shape[1]
    T = pred.dtype.type
    for e in prange(N * S * S * B):
        n, q = e // (S * S * B), e % (S * S * B)
        row, col, b = q // (S * B), (q // B) % S, q % B
        cx, cy, w, h = _pred_box(pred, n, row, col, b, S)
        boxes[n, q, 0] = min(max((cx - w * T(0.5)) * W, T(0)), W)
        boxes[n, q, 1] = min(max((cy - h * T(0.5)) * H, T(0)), H)
        boxes[n, q, 2] = min(max((cx + w * T(0.5)) * W, T(0)), W)
        boxes[n, q, 3] = min(max((cy + h * T(0.5)) * H, T(0)), H)
        conf = max(pred[n, row, col, b * 5 + 4], T(0))
        scores[n, q, 0] = T(0)
        for c in range(C):
            scores[n, q, c + 1] = max(pred[n, row, col, B * 5 + c], T(0)) * conf
    return boxes


_yolo_decode = kernel(_yolo_decode, exact=True)


def yolo_decode(pred, boxes, classes, image):
    """Every predictor's box in image pixels (clipped to it) and its class-specific scores
    Pr(class) * confidence (each clamped at 0), column 0 (background) zero:
    (boxes [N, S*S*B, 4], scores [N, S*S*B, 1 + C]), in (row, column, predictor) order."""
    pred = as_float(pred)
    N, S = pred.shape[:2]
    K = S * S * boxes
    T = pred.dtype.type
    H, W = _image(image)
    out_b, out_s = np.empty((N, K, 4), pred.dtype), np.empty((N, K, 1 + classes), pred.dtype)
    _yolo_decode(pred.size, pred, int(boxes), int(classes), T(H), T(W), out_b, out_s)
    return out_b, out_s
