"""Axis-aligned warps of image batches: the resampling of netdsl/runtime/affine.py's
random scaling and translation (a training augmentation, not an operator).

A scale and a shift per axis map each output column j to one source coordinate and each
output row i to another, so the 2-D sampling separates into per-axis tables that the
caller computes (O(N*(H+W)) numbers) and these kernels only gather:

- bilinear: out[n, c, i, j] = sum over the 2x2 neighbours (y0[n,i] + a, x0[n,j] + b) of
  weight * src, a neighbour outside the image reading fill[c] (torch's grid_sample with
  padding "zeros" when fill is 0). fy, fx are the weights of the second neighbour.
- nearest: out[n, k, i, j] = src[n, k, yi[n,i], xi[n,j]], or fill where either index is
  -1 (label maps, per-object masks: values are copied, never blended).
"""
from __future__ import annotations

import numpy as np

from . import kernel, prange


def _bilinear(src, y0, fy, x0, fx, fill, out):
    N, C, H, W = src.shape
    one = src.dtype.type(1)
    for q in prange(N * C):
        n = q // C
        c = q % C
        f = fill[c]
        for i in range(H):
            ya = y0[n, i]
            wb = fy[n, i]
            wa = one - wb
            for j in range(W):
                xa = x0[n, j]
                vb = fx[n, j]
                va = one - vb
                # the four neighbours; outside the image they read the fill
                v00 = src[n, c, ya, xa] if 0 <= ya < H and 0 <= xa < W else f
                v01 = src[n, c, ya, xa + 1] if 0 <= ya < H and 0 <= xa + 1 < W else f
                v10 = src[n, c, ya + 1, xa] if 0 <= ya + 1 < H and 0 <= xa < W else f
                v11 = src[n, c, ya + 1, xa + 1] if 0 <= ya + 1 < H and 0 <= xa + 1 < W else f
                out[n, c, i, j] = wa * (va * v00 + vb * v01) + wb * (va * v10 + vb * v11)
    return out


def _nearest(src, yi, xi, fill, out):
    N, K, H, W = src.shape
    for q in prange(N * K):
        n = q // K
        k = q % K
        for i in range(H):
            y = yi[n, i]
            for j in range(W):
                x = xi[n, j]
                out[n, k, i, j] = src[n, k, y, x] if y >= 0 and x >= 0 else fill
    return out


_bilinear = kernel(_bilinear)
_nearest = kernel(_nearest)


def warp_bilinear(src: np.ndarray, y0, fy, x0, fx, fill) -> np.ndarray:
    """src float [N, C, H, W]; y0, x0 int64 [N, H], [N, W] (the first neighbour, may be
    -1 or the last index); fy, fx [N, H], [N, W] the second neighbour's weight; fill [C]."""
    dt = src.dtype
    src = np.ascontiguousarray(src)
    out = np.empty_like(src)
    return _bilinear(src.size, src, np.ascontiguousarray(y0, np.int64), np.ascontiguousarray(fy, dt),
                     np.ascontiguousarray(x0, np.int64), np.ascontiguousarray(fx, dt),
                     np.ascontiguousarray(fill, dt), out)


def warp_nearest(src: np.ndarray, yi, xi, fill) -> np.ndarray:
    """src [N, K, H, W] of any dtype; yi, xi int64 [N, H], [N, W], -1 outside the source."""
    src = np.ascontiguousarray(src)
    out = np.empty_like(src)
    return _nearest(src.size, src, np.ascontiguousarray(yi, np.int64), np.ascontiguousarray(xi, np.int64),
                    src.dtype.type(fill), out)
