"""The detectors' training targets on the device: the twin of kernels/cpu/targets.py
(same names, semantics and padding contract; see its doc), one thread per output.

What runs on the host, and why: the random subsets of sample_anchors and sample_rois and
the per-image sort of hard_negatives (a few thousand rows per image, copied down and up
once; the CPU kernels draw the same subsets for a seed). The gathers (match_gather,
mask_targets, keypoint_targets) and yolo_targets check their indices on the host first
(rois' image column, matched, gt labels: a few KB), so a bad index raises the CPU's
IndexError on both targets.
"""
from __future__ import annotations

import math

import numpy as np
from numba import cuda

from ..cpu import targets as C
from . import TPB_RED, device, empty, flat, kernel, launch, launch_rows, to_device, tree_max
from .roi import roi_align


@device
def _iou(a, ax1, ay1, ax2, ay2, bx1, by1, bx2, by2):
    """torchvision's box_iou of one pair in the dtype of a; 0 if either box is empty."""
    T = a.dtype.type
    if ax2 <= ax1 or ay2 <= ay1 or bx2 <= bx1 or by2 <= by1:
        return T(0)
    w = min(ax2, bx2) - max(ax1, bx1)
    h = min(ay2, by2) - max(ay1, by1)
    w = w if w > T(0) else T(0)
    h = h if h > T(0) else T(0)
    inter = w * h
    return inter / ((ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter)


# ---------------------------------------------------------------- assign_targets

@kernel("aialaiii")
def _iou_matrix(ref, c, gb, gl, iou, N, G, K):
    """iou[n, g, k], -1 for padding gt and RoIs of another image (c = 1: RoIs [K, 5])."""
    for e in range(cuda.grid(1), iou.size, cuda.gridsize(1)):
        n, g, k = e // (G * K), (e // K) % G, e % K
        cw = 4 + c
        r = k * cw + c
        q = (n * G + g) * 4
        if gl[n * G + g] < 0 or (c == 1 and int(ref[k * cw]) != n):
            iou[e] = -1
        else:
            iou[e] = _iou(ref, ref[r], ref[r + 1], ref[r + 2], ref[r + 3], gb[q], gb[q + 1], gb[q + 2], gb[q + 3])


@kernel("aai")
def _best(iou, best, K):
    """best[n, g] = max over k of iou[n, g, k]: one block per (n, g), a tree in shared memory."""
    T = iou.dtype.type
    sh = cuda.shared.array(TPB_RED, iou.dtype)
    t = cuda.threadIdx.x
    for row in range(cuda.blockIdx.x, best.size, cuda.gridDim.x):
        m = T(-1)
        for k in range(t, K, TPB_RED):
            m = max(m, iou[row * K + k])
        sh[t] = m
        tree_max(sh, t)
        if t == 0:
            best[row] = sh[0]
        cuda.syncthreads()


@kernel("aaaialffilaiii")
def _assign(iou, best, ref, c, gb, gl, fg, bg, binary, labels, boxes, N, G, K):
    T = iou.dtype.type
    for e in range(cuda.grid(1), labels.size, cuda.gridsize(1)):
        n, k = e // K, e % K
        bi, bv = -1, T(-1)
        for g in range(G):
            v = iou[(n * G + g) * K + k]
            if v > bv:
                bi, bv = g, v
        m = bi
        if bi < 0:
            m = -1                               # no gt in the image: background
        elif bv < fg:
            m = -1 if bv < bg else -2
            for g in range(G):                   # low-quality match: k is some gt's best anchor
                if best[n * G + g] > T(0) and iou[(n * G + g) * K + k] == best[n * G + g]:
                    m = bi
        lab = (1 if binary else gl[n * G + m]) if m >= 0 else (0 if m == -1 else -1)
        labels[e] = -1 if c == 1 and int(ref[k * 5]) != n else lab
        for j in range(4):
            boxes[e * 4 + j] = gb[(n * G + m) * 4 + j] if m >= 0 else T(0)


def assign_targets(anchors, gt_boxes, gt_labels, fg_iou, bg_iou, binary):
    """(labels i64 [N, K], matched gt boxes [N, K, 4]); see the CPU twin."""
    K, c = anchors.shape[0], anchors.shape[1] - 4
    N, G = gt_labels.shape
    T = np.dtype(anchors.dtype).type
    iou, best = empty((N, G, K), anchors.dtype), empty((N, G), anchors.dtype)
    launch(_iou_matrix, iou.size, flat(anchors), c, flat(gt_boxes), flat(gt_labels), flat(iou), N, G, K)
    launch_rows(_best, N * G, flat(iou), flat(best), K)
    labels, boxes = empty((N, K), np.int64), empty((N, K, 4), anchors.dtype)
    launch(_assign, N * K, flat(iou), flat(best), flat(anchors), c, flat(gt_boxes), flat(gt_labels),
           T(fg_iou), T(bg_iou), int(bool(binary)), flat(labels), flat(boxes), N, G, K)
    return labels, boxes


# ---------------------------------------------------------------- sampling (on the host)

def _host(a):
    return a.copy_to_host()


def sample_anchors(labels, batch, fg_fraction, seed):
    # A random subset of each image's anchors: the CPU kernel on a copy (N*K labels).
    return to_device(C.sample_anchors(_host(labels), batch, fg_fraction, seed))


def sample_rois(rois, gt_boxes, gt_labels, batch, fg_fraction, fg_iou, bg_iou, bg_lo, seed):
    # Matching a few thousand proposals and drawing a subset: the CPU kernel on copies.
    out = C.sample_rois(_host(rois), _host(gt_boxes), _host(gt_labels), batch, fg_fraction, fg_iou, bg_iou,
                        bg_lo, seed)
    return tuple(to_device(a) for a in out)


# ---------------------------------------------------------------- SSD's hard negatives

@kernel("alai")
def _negative_loss(logits, labels, loss, Cn):
    """loss[n, k] = -log_softmax(logits[n, k])[0] for a negative (label 0), -inf otherwise."""
    T = logits.dtype.type
    for e in range(cuda.grid(1), loss.size, cuda.gridsize(1)):
        if labels[e] != 0:
            loss[e] = -T(np.inf)
            continue
        base = e * Cn
        mx = logits[base]
        for c in range(1, Cn):
            mx = max(mx, logits[base + c])
        s = T(0)
        for c in range(Cn):
            s += math.exp(logits[base + c] - mx)
        loss[e] = math.log(s) - (logits[base] - mx)


def negative_loss(logits, labels):
    N, K, Cn = logits.shape
    loss = empty((N, K), logits.dtype)
    launch(_negative_loss, loss.size, flat(logits), flat(labels), flat(loss), Cn)
    return loss


def hard_negatives(logits, labels, ratio):
    """SSD's hard negative mining: the losses on the device; the per-image sort of K
    losses on the host (N*K numbers copied once)."""
    loss = negative_loss(logits, labels)
    return to_device(C.keep_hardest(_host(loss), _host(labels), ratio))


# ---------------------------------------------------------------- per-RoI targets

@kernel("lia")
def _positive(labels, lo, y):
    T = y.dtype.type
    for i in range(cuda.grid(1), y.size, cuda.gridsize(1)):
        y[i] = T(1) if labels[i] >= lo else T(0)


def positive(labels, dtype=np.float32, lo=1):
    y = empty(labels.shape, dtype)
    launch(_positive, y.size, flat(labels), lo, flat(y))
    return y


def _rows(rois, matched, N, G, what):
    """(image index, gt index) per RoI, checked on the host as the CPU does (R numbers)."""
    return C._rows(_host(rois), _host(matched), N, G, what)


def match_gather(gt, rois, matched, fill):
    """gt [N, G, ...] -> [R, ...]: each RoI's matched gt entry, `fill` for background."""
    N, G = gt.shape[:2]
    b, m = _rows(rois, matched, N, G, "match_gather")
    R = b.shape[0]
    y = empty((R,) + tuple(gt.shape[2:]), gt.dtype)
    M = int(np.prod(gt.shape[2:], dtype=np.int64))
    launch(_gather_rows, y.size, flat(gt), to_device(b * G + m), to_device(m), flat(y), M,
           np.dtype(gt.dtype).type(fill))
    return y


@kernel("allaif")
def _gather_rows(gt, row, m, y, M, fill):
    """y[r] = gt[row[r]] (gt as [N*G, M]) where m[r] >= 0, else fill."""
    for e in range(cuda.grid(1), y.size, cuda.gridsize(1)):
        r = e // M
        y[e] = gt[row[r] * M + e - r * M] if m[r] >= 0 else fill


def mask_targets(gt_masks, rois, matched, size):
    """roi_align of each positive RoI's matched gt mask (scale 1, adaptive, not aligned)."""
    N, G, H, W = gt_masks.shape
    b, m = _rows(rois, matched, N, G, "mask_targets")
    mrois = _host(rois).astype(gt_masks.dtype)
    mrois[:, 0] = np.where(m >= 0, b * G + m, -1)        # mask (image, gt) as one batch index
    y = roi_align(gt_masks.reshape(N * G, 1, H, W), to_device(mrois), size, 1.0, 0, False)
    return y.reshape(y.shape[0], size, size)


@device
def _heat_cell(a, p, lo, hi, size):
    """floor((p - lo) * size / (hi - lo)) if in [0, size) (size - 1 at p == hi), else -1."""
    T = a.dtype.type
    if p == hi:
        return size - 1
    v = (p - lo) * (T(size) / (hi - lo))
    return int(v) if v >= T(0) and v < T(size) else -1


@kernel("aallliii")
def _heat(kp, rois, b, m, y, G, K, size):
    """torchvision's keypoints_to_heatmap, one thread per (RoI, keypoint)."""
    T = kp.dtype.type
    for e in range(cuda.grid(1), y.size, cuda.gridsize(1)):
        r, j = e // K, e % K
        y[e] = -1
        if m[r] < 0:
            continue
        x1, y1, x2, y2 = rois[r * 5 + 1], rois[r * 5 + 2], rois[r * 5 + 3], rois[r * 5 + 4]
        q = ((b[r] * G + m[r]) * K + j) * 3
        px, py, vis = kp[q], kp[q + 1], kp[q + 2]
        if x2 <= x1 or y2 <= y1 or not vis > T(0):
            continue
        ix, iy = _heat_cell(kp, px, x1, x2, size), _heat_cell(kp, py, y1, y2, size)
        if ix >= 0 and iy >= 0:
            y[e] = iy * size + ix


def keypoint_targets(gt_keypoints, rois, matched, size):
    N, G, K, _ = gt_keypoints.shape
    b, m = _rows(rois, matched, N, G, "keypoint_targets")
    y = empty((b.shape[0], K), np.int64)
    launch(_heat, y.size, flat(gt_keypoints), flat(rois), to_device(b), to_device(m), flat(y), G, K, int(size))
    return y


# ---------------------------------------------------------------- YOLO v1

@device
def _pred_box(pred, base, o, row, col, S):
    """Predictor (offset o in the cell at base) as (centre x, centre y, w, h), fractions."""
    T = pred.dtype.type
    sw, sh = pred[base + o + 2], pred[base + o + 3]
    return (T(col) + pred[base + o]) / T(S), (T(row) + pred[base + o + 1]) / T(S), sw * sw, sh * sh


@kernel("aalaaaaiiiiiff")
def _yolo_targets(pred, gb, gl, target, obj, noobj, cell, N, S, G, B, Cn, H, W):
    """One thread per cell: the first object whose centre lies in it, its responsible
    predictor (highest IoU, else darknet's smallest error) and the targets."""
    T = pred.dtype.type
    D = B * 5 + Cn
    for e in range(cuda.grid(1), cell.size, cuda.gridsize(1)):
        n, row, col = e // (S * S), (e // S) % S, e % S
        base = e * D
        for j in range(D):
            target[base + j] = T(0)
        for b in range(B):
            obj[e * B + b] = T(0)
            noobj[e * B + b] = T(1)
        cell[e] = T(0)
        for g in range(G):
            lab = gl[n * G + g]
            q = (n * G + g) * 4
            x1, y1, x2, y2 = gb[q], gb[q + 1], gb[q + 2], gb[q + 3]
            if lab <= 0 or x2 <= x1 or y2 <= y1:
                continue
            cx, cy = (x1 + x2) * T(0.5) / W, (y1 + y2) * T(0.5) / H
            if (min(max(int(math.floor(cx * T(S))), 0), S - 1) != col
                    or min(max(int(math.floor(cy * T(S))), 0), S - 1) != row):
                continue
            w, h = (x2 - x1) / W, (y2 - y1) / H
            best, best_iou, best_err = 0, T(0), T(np.inf)
            for b in range(B):
                px, py, pw, ph = _pred_box(pred, base, b * 5, row, col, S)
                v = _iou(pred, px - pw * T(0.5), py - ph * T(0.5), px + pw * T(0.5), py + ph * T(0.5),
                         cx - w * T(0.5), cy - h * T(0.5), cx + w * T(0.5), cy + h * T(0.5))
                err = (px - cx) * (px - cx) + (py - cy) * (py - cy) + (pw - w) * (pw - w) + (ph - h) * (ph - h)
                if best_iou > T(0) or v > T(0):
                    if v > best_iou:
                        best, best_iou = b, v
                elif err < best_err:
                    best, best_err = b, err
            o = base + best * 5
            target[o] = cx * T(S) - T(col)
            target[o + 1] = cy * T(S) - T(row)
            target[o + 2] = math.sqrt(w)
            target[o + 3] = math.sqrt(h)
            target[o + 4] = best_iou
            obj[e * B + best] = T(1)
            noobj[e * B + best] = T(0)
            target[base + B * 5 + lab - 1] = T(1)
            cell[e] = T(1)
            break


def yolo_targets(pred, gt_boxes, gt_labels, boxes, classes, image):
    """(target, obj, noobj, cell); see the CPU twin. Labels are checked on the host."""
    gl = _host(gt_labels)
    bad = np.flatnonzero(gl.reshape(-1) > classes)
    if bad.size:
        raise IndexError(f"gt label {gl.reshape(-1)[bad[0]]} is not a class in 1..{classes} (0: none, -1: padding)")
    N, S = pred.shape[:2]
    H, W = C._image(image)
    T = np.dtype(pred.dtype).type
    target = empty(pred.shape, pred.dtype)
    obj, noobj = empty((N, S, S, boxes), pred.dtype), empty((N, S, S, boxes), pred.dtype)
    cell = empty((N, S, S), pred.dtype)
    launch(_yolo_targets, cell.size, flat(pred), flat(gt_boxes), flat(gt_labels), flat(target), flat(obj),
           flat(noobj), flat(cell), N, S, gl.shape[1], int(boxes), int(classes), T(H), T(W))
    return target, obj, noobj, cell


@kernel("aaaiiiff")
def _yolo_decode(pred, boxes, scores, S, B, Cn, H, W):
    T = pred.dtype.type
    D = B * 5 + Cn
    for e in range(cuda.grid(1), boxes.size // 4, cuda.gridsize(1)):
        q = e % (S * S * B)
        row, col, b = q // (S * B), (q // B) % S, q % B
        base = (e // B) * D                 # the cell's row of pred
        cx, cy, w, h = _pred_box(pred, base, b * 5, row, col, S)
        boxes[e * 4] = min(max((cx - w * T(0.5)) * W, T(0)), W)
        boxes[e * 4 + 1] = min(max((cy - h * T(0.5)) * H, T(0)), H)
        boxes[e * 4 + 2] = min(max((cx + w * T(0.5)) * W, T(0)), W)
        boxes[e * 4 + 3] = min(max((cy + h * T(0.5)) * H, T(0)), H)
        conf = max(pred[base + b * 5 + 4], T(0))
        scores[e * (Cn + 1)] = T(0)
        for c in range(Cn):
            scores[e * (Cn + 1) + c + 1] = max(pred[base + B * 5 + c], T(0)) * conf


def yolo_decode(pred, boxes, classes, image):
    """(boxes [N, S*S*B, 4] in pixels, scores [N, S*S*B, 1 + C]); see the CPU twin."""
    N, S = pred.shape[:2]
    K = S * S * boxes
    H, W = C._image(image)
    T = np.dtype(pred.dtype).type
    out_b, out_s = empty((N, K, 4), pred.dtype), empty((N, K, 1 + classes), pred.dtype)
    launch(_yolo_decode, N * K, flat(pred), flat(out_b), flat(out_s), S, int(boxes), int(classes), T(H), T(W))
    return out_b, out_s
