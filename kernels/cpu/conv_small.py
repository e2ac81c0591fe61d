"""Convolution for small images with many channels (ResNet's last stages: 2x2 and 1x1
feature maps at 32x32 input, 14x14 and 7x7 at 224x224 and small batches): one GEMM per
kernel tap, over only the pixels where that tap lands inside the image.

With a 3x3 kernel and padding 1, a 1x1 image sees only the centre tap and a 2x2 image
16 of its 36 pixel-tap pairs: im2col's columns there are 8/9 and 5/9 zeros, and a GEMM
multiplies them all. Here tap t gathers its (image, pixel) rows straight from NCHW,
multiplies them by that tap's weight slice w[:, :, kh, kw] and adds the products back.
The threads split GEMM columns (output channels forward and for the weight gradient,
input channels for the data gradient), so no two threads write the same element and
nothing needs a per-thread partial; each thread repacks the weights of its share one
tap at a time, so no full repacked copy of the weight (or of its gradient) ever exists.
"""
import functools

import numpy as np

from . import U, kernel, njit, out_array, prange
from .conv import N_, T_, _gemm


def usable(g) -> bool:
    """One group, and at most 4 output pixels, or a spatial kernel whose weights outweigh
    the output pixels 256:1 (ResNet-50's 14x14 and 7x7 layers at small batches: 2-3x
    faster than im2col there, whose weight transposes dominate). ResNet-18's 4x4 layers
    at batch 64 and 28x28 ones at batch 1 ran faster with im2col."""
    return g.G == 1 and (g.OH * g.OW <= 4 or
                         (g.KH * g.KW > 1 and g.N * g.OH * g.OW * 256 <= g.O * g.C * g.KH * g.KW))


@functools.lru_cache(maxsize=256)
def taps(H, W, KH, KW, OH, OW, sh, sw, ph, pw, dh, dw):
    """(ids, starts, outs, ins): the taps kh*KW + kw that land inside the image for some
    output pixel; tap i's (output pixel, input pixel) pairs are outs/ins[starts[i]:starts[i+1]]."""
    ids, starts, outs, ins = [], [0], [], []
    for kh in range(KH):
        for kw in range(KW):
            for oh in range(OH):
                ih = oh * sh - ph + kh * dh
                for ow in range(OW):
                    iw = ow * sw - pw + kw * dw
                    if 0 <= ih < H and 0 <= iw < W:
                        outs.append(oh * OW + ow)
                        ins.append(ih * W + iw)
            if len(outs) > starts[-1]:
                ids.append(kh * KW + kw)
                starts.append(len(outs))
    return tuple(np.array(a, np.int64) for a in (ids, starts, outs, ins))


@njit
def _gather(src, n, pix, starts, dst):
    """dst[N*s + n*(e-s) + j-s, :] = src[n, :, pix[j]] for each tap's pairs s <= j < e:
    rows tap by tap, then image by image (src is [N, channels, pixels])."""
    N, K, P = src.shape
    sf, df = src.reshape(-1), dst.reshape(-1)
    for t in range(starts.size - 1):
        s, e = starts[t], starts[t + 1]
        for j in range(s, e):
            r = N * s + n * (e - s) + j - s
            for k in range(K):
                df[U(r * K + k)] = sf[U((n * K + k) * P + pix[j])]


@njit
def _scatter(prod, N, s, e, pix, k0, k1, dst):
    """The adjoint of _gather for one tap's pairs s <= j < e and channels k0:k1:
    dst[n, k, pix[j]] += prod[N*s + n*(e-s) + j-s, k] (prod flat, rows of K = dst's
    channels; dst is [N, K, pixels])."""
    K, P = dst.shape[1], dst.shape[2]
    df = dst.reshape(-1)
    for n in range(N):
        for j in range(s, e):
            r = (N * s + n * (e - s) + j - s) * K
            for k in range(k0, k1):
                df[U((n * K + k) * P + pix[j])] += prod[U(r + k)]


@njit
def _slice(w, k, o0, o1, c0, c1, dst):
    """dst[o - o0, c - c0] = w[o, c, k]: one tap's weights for a thread's share."""
    for o in range(o0, o1):
        for c in range(c0, c1):
            dst[U((o - o0) * (c1 - c0) + c - c0)] = w[o, c, k]


def _fwd(x, w, b, y, ids, starts, outs, ins, T, a, prod, wts):
    """y[N, O, Q] = conv(x[N, C, P]) + b (w as [O, C, KH*KW]), tap by tap; thread k owns
    output channels o0:o1 and repacks only their weights, a tap at a time.
    Workspace (see forward): a[rows, C] gathered inputs, prod[rows * O], wts[T, ...]."""
    N, C = x.shape[0], x.shape[1]
    O, Q = y.shape[1], y.shape[2]
    for n in prange(N):
        _gather(x, n, ins, starts, a)
    af, yf = a.reshape(-1), y.reshape(-1)
    for k in prange(T):
        o0, o1 = k * O // T, (k + 1) * O // T
        wt = wts[k]
        for n in range(N):
            for o in range(o0, o1):
                for q in range(Q):
                    yf[U((n * O + o) * Q + q)] = b[o]
        for t in range(ids.size):
            s, e = starts[t], starts[t + 1]
            _slice(w, ids[t], o0, o1, 0, C, wt)
            # prod[rows of t, o0:o1] = a[rows of t] @ w[o0:o1, :, tap]^T
            _gemm(N * (e - s), o1 - o0, C, af[N * s * C:], C, N_, wt, C, T_, prod[N * s * O + o0:], 0.0, O)
            _scatter(prod, N, s, e, outs, o0, o1, y)
    return y


def _bwd(x, w, gy, gx, gw, ids, starts, outs, ins, T, need_gx, need_gw, g, a, prod, tmps):
    """gx[N, C, P] (zeroed by the caller) and gw[O, C, KH*KW]: thread k owns input
    channels c0:c1 of gx and output channels o0:o1 of gw. Workspace (see backward):
    g[rows, O] gathered gradients, a[rows, C] inputs, prod[rows * C], tmps[T, ...]."""
    N, O = gy.shape[0], gy.shape[1]
    C = w.shape[1]
    for n in prange(N):
        _gather(gy, n, outs, starts, g)
    if need_gw:
        for n in prange(N):
            _gather(x, n, ins, starts, a)
    gf, af, gwf = g.reshape(-1), a.reshape(-1), gw.reshape(-1)
    KK = gw.shape[2]
    zero = gy.dtype.type(0)
    for k in prange(T):
        o0, o1 = k * O // T, (k + 1) * O // T
        c0, c1 = k * C // T, (k + 1) * C // T
        tmp = tmps[k]
        if need_gw and ids.size < gw.shape[2]:     # taps that never land inside the image
            gw[o0:o1, :, :] = zero
        for t in range(ids.size):
            s, e = starts[t], starts[t + 1]
            m = N * (e - s)
            if need_gw:     # gw[o0:o1, :, tap] = g[rows of t, o0:o1]^T @ a[rows of t]
                _gemm(o1 - o0, C, m, gf[N * s * O + o0:], O, T_, af[N * s * C:], C, N_, tmp, 0.0, C)
                for o in range(o0, o1):
                    for c in range(C):
                        gwf[U((o * C + c) * KK + ids[t])] = tmp[U((o - o0) * C + c)]
            if need_gx:     # prod[rows of t, c0:c1] = g[rows of t] @ w[:, c0:c1, tap]
                _slice(w, ids[t], 0, O, c0, c1, tmp)
                _gemm(m, c1 - c0, O, gf[N * s * O:], O, N_, tmp, c1 - c0, N_, prod[N * s * C + c0:], 0.0, C)
                _scatter(prod, N, s, e, ins, c0, c1, gx)
    return gx


_fwd = kernel(_fwd)
_bwd = kernel(_bwd)


def _taps(g):
    return taps(g.H, g.W, g.KH, g.KW, g.OH, g.OW, *g.s, *g.p, *g.d)


def _threads(k, g):
    fn, T = k.pick(g.work)
    return fn, max(1, min(T, g.O, g.C))


def forward(x, w, b, g, y, s):
    """Into y[N, O, OH*OW], with workspace from scratch s."""
    ids, starts, outs, ins = _taps(g)
    fn, T = _threads(_fwd, g)
    rows, dt = g.N * int(starts[-1]), x.dtype
    fn(x.reshape(g.N, g.C, -1), w.reshape(g.O, g.C, -1), b, y, ids, starts, outs, ins, T,
       s.take((rows, g.C), dt), s.take(rows * g.O, dt), s.take((T, (g.O // T + 1) * g.C), dt))


def backward(x, xshape, w, gy, g, need_gx, need_gw, gw_out, gx_out, s):
    """(gx, gw) into gx_out / gw_out where given, with workspace from scratch s."""
    ids, starts, outs, ins = _taps(g)
    gy = np.ascontiguousarray(gy, dtype=w.dtype).reshape(g.N, g.O, g.OH * g.OW)
    gx = out_array(gx_out, (g.N, g.C, g.H * g.W), w.dtype, zero=True) if need_gx else np.zeros((1, 1, 1), w.dtype)
    gw = np.empty(w.shape if need_gw else (1, 1, 1, 1), w.dtype) if gw_out is None else gw_out
    xr = x.reshape(g.N, g.C, -1) if need_gw else np.zeros((1, 1, 1), w.dtype)
    fn, T = _threads(_bwd, g)
    gw3 = gw.reshape(g.O, g.C, -1) if need_gw else gw.reshape(1, 1, 1)
    rows, dt, O, C = g.N * int(starts[-1]), w.dtype, g.O, g.C
    tmp = max((O // T + 1) * C if need_gw else 0, O * (C // T + 1) if need_gx else 0)
    fn(xr, w.reshape(O, C, -1), gy, gx, gw3, ids, starts, outs, ins, T, need_gx, need_gw,
       s.take((rows, O), dt), s.take((rows if need_gw else 0, C), dt), s.take(rows * C if need_gx else 0, dt),
       s.take((T, tmp), dt))
    return (gx.reshape(xshape) if need_gx else None), (gw if need_gw else None)
