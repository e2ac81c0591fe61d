"""Convolution for small images with many channels (ResNet's last stages at 32x32 input:
2x2 and 1x1 feature maps with 256-512 channels).

There the weights outweigh the activations, so the general path's weight transposes,
per-thread weight-gradient partials and their sums cost more than the arithmetic. Here
the columns are laid out [pixel, (c, kh, kw)], matching the weight's own [O, C*KH*KW]
layout: every GEMM reads the weight (and writes its gradient) in place, with BLAS's
transpose flags instead of copies, and the two threads split the GEMMs' rows.
"""
import numpy as np
from numba import prange

from . import kernel, njit
from .conv import _gemm

N_, T_ = np.int8(78), np.int8(84)


def usable(g) -> bool:
    """Small-image layers whose weights dominate: one group, fewer pixel rows than channels x 4."""
    return g.G == 1 and g.N * g.OH * g.OW <= 4 * g.O and g.OH * g.OW <= 64


@njit
def _cols(x, cols, n, KH, KW, OH, OW, sh, sw, ph, pw, dh, dw, to_cols):
    """cols[(oh, ow), (c, kh, kw)] <-> x[n, c, ...] for one image (zero padding); with
    to_cols False, add the columns back into x (col2im)."""
    C, H, W = x.shape[1], x.shape[2], x.shape[3]
    K = C * KH * KW
    zero = x.dtype.type(0)
    for oh in range(OH):
        for ow in range(OW):
            row = (n * OH + oh) * OW + ow
            for c in range(C):
                for kh in range(KH):
                    ih = oh * sh - ph + kh * dh
                    for kw in range(KW):
                        iw = ow * sw - pw + kw * dw
                        j = row * K + (c * KH + kh) * KW + kw
                        inside = 0 <= ih < H and 0 <= iw < W
                        if to_cols:
                            cols[j] = x[n, c, ih, iw] if inside else zero
                        elif inside:
                            x[n, c, ih, iw] += cols[j]


def _fwd(x, w, b, y, KH, KW, OH, OW, sh, sw, ph, pw, dh, dw, T):
    N, O = x.shape[0], w.shape[0]
    K, L = w.shape[1], OH * OW
    cols = np.empty(N * L * K, x.dtype)
    yt = np.empty(N * L * O, x.dtype)
    for n in prange(N):
        _cols(x, cols, n, KH, KW, OH, OW, sh, sw, ph, pw, dh, dw, True)
    wf = w.reshape(-1)
    for t in prange(T):          # y^T[rows, O] = cols[rows, K] @ w[O, K]^T, rows split
        r0, r1 = t * N * L // T, (t + 1) * N * L // T
        if r1 > r0:
            _gemm(r1 - r0, O, K, cols[r0 * K:], K, N_, wf, K, T_, yt[r0 * O:], 0.0)
    for n in prange(N):
        for o in range(O):
            for l in range(L):
                y[n, o, l] = yt[(n * L + l) * O + o] + b[o]
    return y


def _bwd(x, w, gy, gx, gw, KH, KW, OH, OW, sh, sw, ph, pw, dh, dw, T, need_gx, need_gw):
    N, O = gy.shape[0], w.shape[0]
    K, L = w.shape[1], OH * OW
    gyt = np.empty(N * L * O, gy.dtype)
    for n in prange(N):
        for o in range(O):
            for l in range(L):
                gyt[(n * L + l) * O + o] = gy[n, o, l]
    cols = np.empty(N * L * K, gy.dtype)
    wf, gwf = w.reshape(-1), gw.reshape(-1)
    if need_gw:
        for n in prange(N):
            _cols(x, cols, n, KH, KW, OH, OW, sh, sw, ph, pw, dh, dw, True)
        for t in prange(T):      # gw[O, K] = gy^T[rows, O]^T @ cols[rows, K], O split
            o0, o1 = t * O // T, (t + 1) * O // T
            if o1 > o0:
                _gemm(o1 - o0, K, N * L, gyt[o0:], O, T_, cols, K, N_, gwf[o0 * K:], 0.0)
    if need_gx:
        for t in prange(T):      # gcols[rows, K] = gy^T[rows, O] @ w[O, K], rows split
            r0, r1 = t * N * L // T, (t + 1) * N * L // T
            if r1 > r0:
                _gemm(r1 - r0, K, O, gyt[r0 * O:], O, N_, wf, K, N_, cols[r0 * K:], 0.0)
        gx[:] = gx.dtype.type(0)
        for n in prange(N):
            _cols(gx, cols, n, KH, KW, OH, OW, sh, sw, ph, pw, dh, dw, False)
    return gx


_fwd = kernel(_fwd)
_bwd = kernel(_bwd)


def forward(x, w, b, g):
    y = np.empty((g.N, g.O, g.OH * g.OW), x.dtype)
    fn, T = _fwd.pick(g.work)
    fn(x, w.reshape(g.O, -1), b, y, *g.args(), max(1, min(T, g.N * g.OH * g.OW)))
    return y.reshape(g.N, g.O, g.OH, g.OW)


def backward(x, xshape, w, gy, g, need_gx, need_gw):
    gy = np.ascontiguousarray(gy, dtype=w.dtype).reshape(g.N, g.O, g.OH * g.OW)
    gx = np.empty(xshape if need_gx else (1, 1, 1, 1), w.dtype)
    gw = np.empty(w.shape if need_gw else (1,), w.dtype)
    if not need_gw:
        x = np.zeros((1, 1, 1, 1), w.dtype)
    fn, T = _bwd.pick(g.work)
    fn(x, w.reshape(g.O, -1), gy, gx, gw, *g.args(), max(1, T), need_gx, need_gw)
    return (gx if need_gx else None), (gw if need_gw else None)
