"""Box tables shared by the CPU and CUDA kernels (target-neutral, numpy on the host).

Faster R-CNN's base anchors and SSD's default boxes are constants of the architecture.
They are computed here as torchvision computes them: float32 arithmetic in its order
(AnchorGenerator.generate_anchors, DefaultBoxGenerator._generate_wh_pairs and
_grid_default_boxes), so both targets give its numbers to the last bit.
"""
from __future__ import annotations

import math

import numpy as np

F32 = np.float32


def coder_layout(shape, anchors_shape):
    """(rows, div, K, aoff) of a box coder's input against K anchors [K, 4] or RoIs [K, 5]
    (aoff: the columns before the box): row r uses anchor (r // div) % K. Class-specific
    deltas of K RoIs, [K, C, 4], have div = C; [K, 4] and [N, K, 4] have div = 1."""
    K, cols = anchors_shape
    rows = math.prod(shape[:-1])
    per_class = len(shape) == 3 and shape[0] == K and (shape[1] != K or cols == 5)
    return rows, shape[1] if per_class else 1, K, cols - 4


def base_anchors(sizes, ratios) -> np.ndarray:
    """[A, 4] float32 anchors centred on (0, 0), A = len(ratios) * len(sizes), ratio-major
    (a = r * len(sizes) + s); ratio = height / width; rounded half to even (torch.round)."""
    scales = np.asarray(sizes, F32)
    h = np.sqrt(np.asarray(ratios, F32))
    w = F32(1) / h
    ws = (w[:, None] * scales[None, :]).reshape(-1)
    hs = (h[:, None] * scales[None, :]).reshape(-1)
    return np.round(np.stack([-ws, -hs, ws, hs], axis=1) / F32(2))


def ssd_scales(maps: int, smin: float, smax: float, scales=()) -> list[float]:
    """s_1..s_m and the extra s_{m+1} that the ratio-1 box s'_m = sqrt(s_m s_{m+1}) needs:
    SSD's linear rule with torchvision's s_{m+1} = 1 (Python floats, as torchvision)."""
    if scales:
        return list(scales)
    if maps == 1:
        return [smin, smax]
    return [smin + (smax - smin) * k / (maps - 1.0) for k in range(maps)] + [1.0]


def ssd_wh_pairs(ratios, scales) -> list[np.ndarray]:
    """Per map k, its (w, h) pairs as fractions of the image, float32 and clipped to [0, 1]:
    (s_k, s_k), (s'_k, s'_k), then (s_k sqrt r, s_k / sqrt r) and its transpose per ratio r."""
    out = []
    for k, rs in enumerate(ratios):
        s = scales[k]
        sp = math.sqrt(scales[k] * scales[k + 1])
        pairs = [[s, s], [sp, sp]]
        for r in rs:
            q = math.sqrt(r)
            pairs += [[s * q, s / q], [s / q, s * q]]
        out.append(np.clip(np.asarray(pairs, F32), F32(0), F32(1)))
    return out


def default_boxes(grids, ratios, smin, smax, image=(0, 0), scales=(), steps=(), dtype=np.float32) -> np.ndarray:
    """SSD's default boxes over maps of sizes grids[k] = (H_k, W_k): [sum H_k W_k P_k, 4]
    (x1, y1, x2, y2), ordered (map, y, x, pair). Centres ((j + 0.5) / f_k) with f_k the map's
    size, or image / steps[k] when steps are given; corners scaled to image = (H, W) pixels,
    or left as fractions of the image when image is (0, 0)."""
    dtype = np.dtype(dtype).type
    s = ssd_scales(len(grids), smin, smax, scales)
    wh = ssd_wh_pairs(ratios, s)
    H, W = image
    size = np.array([W, H], dtype) if H and W else np.ones(2, dtype)
    out = []
    for k, (fh, fw) in enumerate(grids):
        yf, xf = (H / steps[k], W / steps[k]) if steps else (fh, fw)
        # torch: (arange + 0.5) / f in float32 (default dtype), then .to(dtype)
        cx = ((np.arange(fw, dtype=F32) + F32(0.5)) / F32(xf)).astype(dtype)
        cy = ((np.arange(fh, dtype=F32) + F32(0.5)) / F32(yf)).astype(dtype)
        cxy = np.stack(np.broadcast_arrays(cx[None, :, None], cy[:, None, None]), axis=-1)   # [fh, fw, 1, 2]
        pairs = wh[k].astype(dtype)[None, None]                                             # [1, 1, P, 2]
        half = dtype(0.5) * pairs
        lo, hi = (cxy - half) * size, (cxy + half) * size
        out.append(np.concatenate([lo, hi], axis=-1).reshape(-1, 4))
    return np.ascontiguousarray(np.concatenate(out, axis=0), dtype=dtype)
