"""Boxes on the device: the twin of kernels/cpu/boxes.py (same names, same numbers, the
same padding contract; see that module).

NMS is torchvision's CUDA algorithm. The candidates of an image are compacted (an atomic
counter; their order does not matter) and ranked by (score descending, index ascending):
each candidate counts those before it, so the order is the CPU's stable sort whatever the
compaction order. Then, per chunk of CH sorted candidates, one block of 64 threads per
64 x 64 tile writes, for each row candidate, a 64-bit mask of the later column candidates
of its class it overlaps by IoU > iou; a single block walks the chunk in order, keeping a
candidate unless an earlier kept one's mask removed it, and ORs the kept one's mask row
into the removed words (shared memory). A chunk after the first also drops what the
candidates kept so far overlap. The walk stops at max_out, so proposals and detections
cost no more than their outputs need; the chunks bound the mask at CH^2 / 8 bytes.

Anchors: the base anchors come from box_tables (host, float32 as torchvision) and are
spread over the grid here; SSD's default boxes are computed on the host and copied up,
as torchvision computes them on the CPU and moves them to the device.
"""
from __future__ import annotations

import math

import numpy as np
from numba import cuda

from .. import box_tables
from . import device, empty, flat, kernel, launch, to_device

BBOX_CLIP = math.log(1000.0 / 16)
NB = 64              # candidates per mask word and per tile side
NB4 = 4 * NB         # (shared array sizes must be module constants)
CH = NB * NB         # candidates per chunk: the removed words of a chunk fit one block's shared memory
RT = 128             # threads per block of the ranking kernel (its tile of keys)


# ---- anchors and default boxes

@kernel("aaiii")
def _spread(base, out, W, A, stride):
    T = out.dtype.type
    for e in range(cuda.grid(1), out.size // 4, cuda.gridsize(1)):
        a = e % A
        cell = e // A
        sx = T((cell % W) * stride)
        sy = T((cell // W) * stride)
        out[4 * e] = sx + base[4 * a]
        out[4 * e + 1] = sy + base[4 * a + 1]
        out[4 * e + 2] = sx + base[4 * a + 2]
        out[4 * e + 3] = sy + base[4 * a + 3]


def anchors(hw, sizes, ratios, stride, dtype=np.float32):
    """Faster R-CNN's anchors over an H x W map: [H*W*A, 4] (y, x, anchor) (torchvision)."""
    H, W = int(hw[0]), int(hw[1])
    base = box_tables.base_anchors(sizes, ratios).astype(dtype)
    out = empty((H * W * base.shape[0], 4), dtype)
    launch(_spread, H * W * base.shape[0], to_device(base.reshape(-1)), flat(out), W, base.shape[0], int(stride))
    return out


def default_boxes(grids, ratios, smin, smax, image=(0, 0), scales=(), steps=(), dtype=np.float32):
    """SSD's default boxes (torchvision's DefaultBoxGenerator), computed on the host."""
    return to_device(box_tables.default_boxes(grids, ratios, smin, smax, image, scales, steps, dtype))


# ---- box coding

@kernel("aaaaiiii")
def _encode(b, a, w, out, div, K, acol, aoff):
    T = out.dtype.type
    half, zero = T(0.5), T(0)    # (typed constants: an int literal would compare in float64)
    for r in range(cuda.grid(1), out.size // 4, cuda.gridsize(1)):
        k = (r // div) % K
        o = k * acol + aoff
        ew = a[o + 2] - a[o]
        eh = a[o + 3] - a[o + 1]
        gw = b[4 * r + 2] - b[4 * r]
        gh = b[4 * r + 3] - b[4 * r + 1]
        if ew <= zero or eh <= zero or gw <= zero or gh <= zero:      # an empty box (padding): no target
            for i in range(4):
                out[4 * r + i] = zero
            continue
        ecx = a[o] + half * ew
        ecy = a[o + 1] + half * eh
        gcx = b[4 * r] + half * gw
        gcy = b[4 * r + 1] + half * gh
        out[4 * r] = w[0] * (gcx - ecx) / ew
        out[4 * r + 1] = w[1] * (gcy - ecy) / eh
        out[4 * r + 2] = w[2] * math.log(gw / ew)
        out[4 * r + 3] = w[3] * math.log(gh / eh)


@device
def _decode_at(a, o, d, p, w, clip, out, q):
    """out[q:q+4] = the box of deltas d[p:p+4] at anchor a[o:o+4] (BoxCoder.decode_single)."""
    T = out.dtype.type
    half = T(0.5)
    widths = a[o + 2] - a[o]
    heights = a[o + 3] - a[o + 1]
    cx = a[o] + half * widths
    cy = a[o + 1] + half * heights
    dx = d[p] / w[0]
    dy = d[p + 1] / w[1]
    dw = d[p + 2] / w[2]
    dh = d[p + 3] / w[3]
    if dw > clip:       # (NaN stays NaN, as with torch.clamp)
        dw = clip
    if dh > clip:
        dh = clip
    pcx = dx * widths + cx
    pcy = dy * heights + cy
    hw = half * (math.exp(dw) * widths)
    hh = half * (math.exp(dh) * heights)
    out[q] = pcx - hw
    out[q + 1] = pcy - hh
    out[q + 2] = pcx + hw
    out[q + 3] = pcy + hh


@kernel("aaaaiiiif")
def _decode(d, a, w, out, div, K, acol, aoff, clip):
    for r in range(cuda.grid(1), out.size // 4, cuda.gridsize(1)):
        _decode_at(a, ((r // div) % K) * acol + aoff, d, 4 * r, w, clip, out, 4 * r)


def _coder(fn, x, anchors, weights, *extra):
    rows, div, K, aoff = box_tables.coder_layout(x.shape, anchors.shape)
    out = empty(x.shape, x.dtype)
    w = to_device(np.asarray(weights, x.dtype))
    launch(fn, rows, flat(x), flat(anchors), w, flat(out), div, K, anchors.shape[1], aoff, *extra)
    return out


def box_encode(boxes, anchors, weights=(1.0, 1.0, 1.0, 1.0)):
    """(dx, dy, dw, dh) of boxes against their anchors (torchvision BoxCoder.encode)."""
    return _coder(_encode, boxes, anchors, weights)


def box_decode(deltas, anchors, weights=(1.0, 1.0, 1.0, 1.0), clip=BBOX_CLIP):
    """Boxes from deltas and anchors (BoxCoder.decode, dw and dh clamped at clip)."""
    return _coder(_decode, deltas, anchors, weights, deltas.dtype.type(clip))


# ---- IoU

@device
def _iou(a, i, b, j):
    """IoU of boxes a[4i:4i+4] and b[4j:4j+4] (0 where the union is not positive)."""
    zero = a.dtype.type(0)
    w = min(a[4 * i + 2], b[4 * j + 2]) - max(a[4 * i], b[4 * j])
    h = min(a[4 * i + 3], b[4 * j + 3]) - max(a[4 * i + 1], b[4 * j + 1])
    w = w if w > zero else zero
    h = h if h > zero else zero
    inter = w * h
    union = ((a[4 * i + 2] - a[4 * i]) * (a[4 * i + 3] - a[4 * i + 1])
             + (b[4 * j + 2] - b[4 * j]) * (b[4 * j + 3] - b[4 * j + 1])) - inter
    return inter / union if union > zero else zero


@kernel("aaaii")
def _iou_all(a, b, out, A, B):
    for e in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        j = e % B
        i = (e // B) % A
        n = e // (A * B)
        out[e] = _iou(a, i, b, n * B + j)


def box_iou(a, b):
    """IoU of every pair: a [A, 4] with b [B, 4] -> [A, B]; b [N, B, 4] -> [N, A, B]."""
    bs = tuple(b.shape)     # (the simulator's shapes refuse negative indices)
    A, B = a.shape[0], bs[-2]
    out = empty(bs[:-2] + (A, B), a.dtype)
    launch(_iou_all, out.size, flat(a), flat(b), flat(out), A, B)
    return out


# ---- candidates, their order, greedy NMS

@kernel("aaiiiifll")
def _det_candidates(scores, boxes, KC, C, bdiv, bg, sthr, cand, count):
    """Image candidates q = k*C + c of scores [K*C]: not background, score > sthr, box
    (boxes[q // bdiv]) not empty."""
    for q in range(cuda.grid(1), KC, cuda.gridsize(1)):
        o = 4 * (q // bdiv)
        if q % C != bg and scores[q] > sthr and boxes[o + 2] > boxes[o] and boxes[o + 3] > boxes[o + 1]:
            cand[cuda.atomic.add(count, 0, 1)] = q


@kernel("aill")
def _all_candidates(scores, K, cand, count):
    for q in range(cuda.grid(1), K, cuda.gridsize(1)):
        if scores[q] == scores[q]:      # NaN scores have no place in the order
            cand[cuda.atomic.add(count, 0, 1)] = q


@kernel("aiaaiiiffffaall")
def _rpn_candidates(obj, P, d, a, acol, aoff, K, clip, H, W, min_size, boxes, key, cand, count):
    """Decode (weights 1), clip to (H, W) unless H is 0, key = objectness; candidates are
    the anchors whose box is not empty and has both sides >= min_size."""
    zero = d.dtype.type(0)
    one = cuda.local.array(4, d.dtype)
    for i in range(4):
        one[i] = d.dtype.type(1)
    for k in range(cuda.grid(1), K, cuda.gridsize(1)):
        _decode_at(a, k * acol + aoff, d, 4 * k, one, clip, boxes, 4 * k)
        if H > zero:      # torchvision's clip_boxes_to_image (NaN stays NaN)
            for i in range(4):
                v = boxes[4 * k + i]
                hi = W if i % 2 == 0 else H
                if v < zero:
                    v = zero
                if v > hi:
                    v = hi
                boxes[4 * k + i] = v
        s = obj[P * k + P - 1] - obj[P * k] if P == 2 else obj[P * k]
        key[k] = s
        w = boxes[4 * k + 2] - boxes[4 * k]
        h = boxes[4 * k + 3] - boxes[4 * k + 1]
        if s == s and w > zero and h > zero and w >= min_size and h >= min_size:
            cand[cuda.atomic.add(count, 0, 1)] = k


@kernel("alil")
def _rank(key, cand, V, order):
    """order[rank] = cand[i], rank = the candidates before it: a higher key, or an equal key
    and a lower id (a stable sort, descending). Keys come through a shared tile."""
    sk = cuda.shared.array(RT, key.dtype)
    sq = cuda.shared.array(RT, np.int64)
    t = cuda.threadIdx.x
    i = cuda.blockIdx.x * RT + t
    q = cand[i] if i < V else 0
    s = key[q]
    r = 0
    for b0 in range(0, V, RT):
        if b0 + t < V:
            sq[t] = cand[b0 + t]
            sk[t] = key[sq[t]]
        cuda.syncthreads()
        for u in range(min(RT, V - b0)):
            if sk[u] > s or (sk[u] == s and sq[u] < q):
                r += 1
        cuda.syncthreads()
    if i < V:
        order[r] = q


@kernel("liaiilal")
def _gather(order, V, boxes, bdiv, C, cls, sb, sc):
    """Sorted boxes sb[V*4] (boxes[id // bdiv]) and classes sc (id % C, or cls[id] if C is 0)."""
    for p in range(cuda.grid(1), V, cuda.gridsize(1)):
        q = order[p]
        o = 4 * (q // bdiv)
        for i in range(4):
            sb[4 * p + i] = boxes[o + i]
        sc[p] = q % C if C > 0 else cls[q]


@kernel("aliiifl")
def _mask(sb, sc, c0, L, CB, thr, mask):
    """Block (column tile, row tile): for each row candidate, the bits of the later column
    candidates of its class that it overlaps by IoU > thr."""
    cb = cuda.blockIdx.x
    rb = cuda.blockIdx.y
    if cb < rb:
        return
    cbox = cuda.shared.array(NB4, sb.dtype)
    ccls = cuda.shared.array(NB, np.int64)
    t = cuda.threadIdx.x
    ncol = min(NB, L - cb * NB)
    if t < ncol:
        j = c0 + cb * NB + t
        for i in range(4):
            cbox[4 * t + i] = sb[4 * j + i]
        ccls[t] = sc[j]
    cuda.syncthreads()
    if t < min(NB, L - rb * NB):
        i = c0 + rb * NB + t
        bits = np.int64(0)
        for u in range(ncol):
            if (cb > rb or u > t) and ccls[u] == sc[i] and _iou(sb, i, cbox, u) > thr:
                bits |= np.int64(1) << np.int64(u)
        mask[(rb * NB + t) * CB + cb] = bits


@kernel("aliillfl")
def _against_kept(sb, sc, c0, L, keep, kept, thr, removed):
    """removed[i] = 1 when a candidate kept by an earlier chunk overlaps candidate c0 + i."""
    for i in range(cuda.grid(1), L, cuda.gridsize(1)):
        hit = 0
        for t in range(kept[0]):
            j = keep[t]
            if sc[j] == sc[c0 + i] and _iou(sb, j, sb, c0 + i) > thr:
                hit = 1
                break
        removed[i] = hit


@kernel("lliiill")
def _walk(mask, removed0, c0, L, CB, keep, kept):
    """One block of NB threads: the chunk's candidates in order, each kept unless removed;
    a kept one's mask row is ORed into the removed words. Stops at keep's size."""
    removed = cuda.shared.array(NB, np.int64)
    t = cuda.threadIdx.x
    if t < NB:
        removed[t] = 0
    cuda.syncthreads()
    n = kept[0]
    for i in range(L):
        if n >= keep.size:
            break
        word = removed[i // NB]
        if removed0[i] == 0 and ((word >> np.int64(i % NB)) & 1) == 0:
            if t == 0:
                keep[n] = c0 + i
            n += 1
            for j in range(i // NB + t, CB, NB):
                removed[j] |= mask[i * CB + j]
            cuda.syncthreads()
    if t == 0:
        kept[0] = n


def _ids(count_host: int):
    return cuda.device_array(max(count_host, 1), np.int64)


def _sorted(key, cand, V, boxes, bdiv, C, cls):
    """Candidates in (key descending, id ascending) order: (ids, boxes [V*4], classes)."""
    order, sb, sc = _ids(V), empty(max(V, 1) * 4, boxes.dtype), _ids(V)
    if V:
        _rank[(V + RT - 1) // RT, RT](key, cand, V, order)
        launch(_gather, V, order, V, boxes, bdiv, C, cls, sb, sc)
    return order, sb, sc


def _greedy(sb, sc, V, thr, max_out):
    """Greedy NMS of V sorted candidates: (keep: the positions kept, kept: their count [1]),
    both on the device."""
    keep, kept = cuda.device_array(max_out, np.int64), cuda.to_device(np.zeros(1, np.int64))
    L = max(1, min(V, CH))
    mask = cuda.device_array(L * ((L + NB - 1) // NB), np.int64)
    removed0 = cuda.to_device(np.zeros(L, np.int64))
    for c0 in range(0, V, CH):
        L = min(CH, V - c0)
        CB = (L + NB - 1) // NB
        if c0:
            if int(kept.copy_to_host()[0]) >= max_out:
                break
            launch(_against_kept, L, sb, sc, c0, L, keep, kept, thr, removed0)
        _mask[(CB, CB), NB](sb, sc, c0, L, CB, thr, mask)
        _walk[1, NB](mask, removed0, c0, L, CB, keep, kept)
    return keep, kept


def _count(cand_kernel, n, *args):
    cand, count = cuda.device_array(max(n, 1), np.int64), cuda.to_device(np.zeros(1, np.int64))
    launch(cand_kernel, n, *args, cand, count)
    return cand, int(count.copy_to_host()[0])


@kernel("llil")
def _keep_ids(order, keep, kept, out):
    for t in range(cuda.grid(1), kept, cuda.gridsize(1)):
        out[t] = order[keep[t]]


def nms(boxes, scores, iou):
    """torchvision.ops.nms: indices (i64) of the boxes kept, by decreasing score."""
    return batched_nms(boxes, scores, None, iou)


def batched_nms(boxes, scores, idxs, iou):
    """torchvision.ops.batched_nms: NMS within each class idxs[i] (None: one class)."""
    K = scores.size
    b, s = flat(boxes), flat(scores)
    cls = to_device(np.zeros(1, np.int64)) if idxs is None else flat(idxs)
    cand, V = _count(_all_candidates, K, s, K)
    order, sb, sc = _sorted(s, cand, V, b, 1, 1 if idxs is None else 0, cls)
    keep, kept = _greedy(sb, sc, V, boxes.dtype.type(iou), max(V, 1))
    n = int(kept.copy_to_host()[0]) if V else 0
    out = empty(n, np.int64)
    launch(_keep_ids, n, order, keep, n, out)
    return out


# ---- NMS of a detector's outputs, per image and class

@kernel("lllaial")
def _write_det(order, keep, kept, scores, C, os, ol):
    """Score and label of row t of an image's detections: the t-th kept candidate's, or
    padding (0, -1)."""
    T = os.dtype.type
    for t in range(cuda.grid(1), ol.size, cuda.gridsize(1)):
        if t < kept[0]:
            q = order[keep[t]]
            os[t] = scores[q]
            ol[t] = q % C
        else:
            os[t] = T(0)
            ol[t] = -1


def detect_nms(boxes, scores, iou, max_out, score_thresh=0.0, background=-1):
    """The `nms` operator (kernels/cpu/boxes.py's detect_nms): boxes [N, M, 4], scores
    [N, M], labels i64 [N, M], padding rows 0, 0 and -1."""
    N, K = scores.shape[:2]
    C = scores.shape[2] if len(scores.shape) == 3 else 1
    bdiv = C if len(boxes.shape) == 3 else 1
    T = boxes.dtype.type
    ob, os, ol = empty((N, max_out, 4), boxes.dtype), empty((N, max_out), boxes.dtype), empty((N, max_out), np.int64)
    fb, fs, fob, fos, fol = flat(boxes), flat(scores), flat(ob), flat(os), flat(ol)
    KC, KB = K * C, K * C // bdiv
    none = to_device(np.zeros(1, np.int64))
    for n in range(N):
        s, b = fs[n * KC:(n + 1) * KC], fb[n * KB * 4:(n + 1) * KB * 4]
        cand, V = _count(_det_candidates, KC, s, b, KC, C, bdiv, int(background), T(score_thresh))
        order, sb, sc = _sorted(s, cand, V, b, bdiv, C, none)
        keep, kept = _greedy(sb, sc, V, T(iou), max_out)
        o = fob[n * max_out * 4:(n + 1) * max_out * 4]
        launch(_write_boxes, max_out, keep, kept, sb, o)
        launch(_write_det, max_out, order, keep, kept, s, C, fos[n * max_out:(n + 1) * max_out],
               fol[n * max_out:(n + 1) * max_out])
    return ob, os, ol


@kernel("llaa")
def _write_boxes(keep, kept, sb, out):
    T = out.dtype.type
    for t in range(cuda.grid(1), out.size // 4, cuda.gridsize(1)):
        for i in range(4):
            out[4 * t + i] = sb[4 * keep[t] + i] if t < kept[0] else T(0)


# ---- RPN proposals

@kernel("llaia")
def _write_rois(keep, kept, sb, n, rois):
    """Image n's RoI rows: the kept boxes, then padding (index -1, zero box)."""
    T = rois.dtype.type
    for t in range(cuda.grid(1), rois.size // 5, cuda.gridsize(1)):
        ok = t < kept[0]
        rois[5 * t] = T(n) if ok else T(-1)
        for i in range(4):
            rois[5 * t + 1 + i] = sb[4 * keep[t] + i] if ok else T(0)


def proposals(scores, deltas, anchors, pre_nms, post_nms, iou, min_size=0.0, image=(0, 0)):
    """The RPN's proposal layer (kernels/cpu/boxes.py's proposals): RoIs [N*post_nms, 5]."""
    N, K = deltas.shape[:2]
    P = scores.size // (N * K)
    T = deltas.dtype.type
    H, W = image
    rois = empty((N * post_nms, 5), deltas.dtype)
    fo, fd, fr = flat(scores), flat(deltas), flat(rois)
    boxes, key = empty(K * 4, deltas.dtype), empty(K, deltas.dtype)
    none = to_device(np.zeros(1, np.int64))
    for n in range(N):
        cand, V = _count(_rpn_candidates, K, fo[n * K * P:(n + 1) * K * P], P, fd[n * K * 4:(n + 1) * K * 4],
                         flat(anchors), anchors.shape[1], anchors.shape[1] - 4, K, T(BBOX_CLIP),
                         T(H if H and W else 0), T(W), T(min_size), boxes, key)
        order, sb, sc = _sorted(key, cand, V, boxes, 1, 1, none)
        keep, kept = _greedy(sb, sc, min(V, pre_nms), T(iou), post_nms)
        launch(_write_rois, post_nms, keep, kept, sb, n, fr[n * post_nms * 5:(n + 1) * post_nms * 5])
    return rois


# ---- RoIs

@kernel("aai")
def _to_rois(b, out, K):
    T = out.dtype.type
    for r in range(cuda.grid(1), out.size // 5, cuda.gridsize(1)):
        ok = b[4 * r + 2] > b[4 * r] and b[4 * r + 3] > b[4 * r + 1]
        out[5 * r] = T(r // K) if ok else T(-1)
        for i in range(4):
            out[5 * r + 1 + i] = b[4 * r + i] if ok else T(0)


def to_rois(boxes):
    """Boxes per image [N, K, 4] -> RoIs [N*K, 5]; an empty box becomes a padding RoI."""
    N, K = boxes.shape[:2]
    out = empty((N * K, 5), boxes.dtype)
    launch(_to_rois, N * K, flat(boxes), flat(out), K)
    return out
