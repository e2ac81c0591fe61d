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

One or two images of more than 4 pixels (ResNet-50's 14x14 and 7x7 layers at batch 1) have most
of their pixel-tap pairs inside: there skipping taps saves little, and repacking the
weights tap by tap (strided reads of all of them) cost more than the GEMMs. Those run
as y[n] = w[O, C*KH*KW] @ cols(x[n]) with the weights in their own layout (_fwd_nat,
_bwd_nat), which is faster there.
"""
import functools

import numpy as np

from . import U, kernel, njit, out_array, prange
from .gemm import N_, T_, gemm, strided_add


def usable(g) -> bool:
    """One group, and at most 4 output pixels, or a spatial kernel whose weights outweigh
    the output pixels 256:1 (ResNet-50's 14x14 and 7x7 layers at small batches: faster
    than im2col there, whose weight transposes dominate). ResNet-18's 4x4 layers
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
            gemm(N * (e - s), o1 - o0, C, af[N * s * C:], C, N_, wt, C, T_, prod[N * s * O + o0:], 0.0, O)
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
                gemm(o1 - o0, C, m, gf[N * s * O + o0:], O, T_, af[N * s * C:], C, N_, tmp, 0.0, C)
                for o in range(o0, o1):
                    for c in range(C):
                        gwf[U((o * C + c) * KK + ids[t])] = tmp[U((o - o0) * C + c)]
            if need_gx:     # prod[rows of t, c0:c1] = g[rows of t] @ w[:, c0:c1, tap]
                _slice(w, ids[t], 0, O, c0, c1, tmp)
                gemm(m, c1 - c0, O, gf[N * s * O:], O, N_, tmp, c1 - c0, N_, prod[N * s * C + c0:], 0.0, C)
                _scatter(prod, N, s, e, ins, c0, c1, gx)
    return gx


@njit
def _cols(x, n, c0, c1, KH, KW, sh, sw, ph, pw, dh, dw, OH, OW, cols, to_cols):
    """cols[(c*KH + kh)*KW + kw, oh*OW + ow] = x[n, c, oh*sh - ph + kh*dh, ow*sw - pw + kw*dw]
    (0 outside the image) for channels c0:c1; to_cols False: the adjoint, added into x.
    Each tap's columns inside the image, ow in [lo, hi), are found once: no test per element."""
    C, H, W = x.shape[1], x.shape[2], x.shape[3]
    P = OH * OW
    zero = x.dtype.type(0)
    xf, cf = x.reshape(-1), cols.reshape(-1)
    for kw in range(KW):
        off = kw * dw - pw                      # iw = ow*sw + off
        lo = (-off + sw - 1) // sw if off < 0 else 0
        hi = min(OW, (W - 1 - off) // sw + 1) if W - 1 - off >= 0 else 0
        lo = min(lo, hi)
        for c in range(c0, c1):
            for kh in range(KH):
                r = ((c * KH + kh) * KW + kw) * P
                for oh in range(OH):
                    ih = oh * sh - ph + kh * dh
                    d = r + oh * OW
                    if 0 <= ih < H:
                        base = ((n * C + c) * H + ih) * W + off
                        if to_cols:
                            for ow in range(lo):
                                cf[U(d + ow)] = zero
                            for ow in range(lo, hi):
                                cf[U(d + ow)] = xf[U(base + ow * sw)]
                            for ow in range(hi, OW):
                                cf[U(d + ow)] = zero
                        else:
                            for ow in range(lo, hi):
                                xf[U(base + ow * sw)] += cf[U(d + ow)]
                    elif to_cols:
                        for ow in range(OW):
                            cf[U(d + ow)] = zero


def _fwd_nat(x, w, b, y, KH, KW, sh, sw, ph, pw, dh, dw, OH, OW, T, cols):
    """y[n] = w[O, C*KH*KW] @ cols(x[n]) + b, image by image: the threads build the
    columns of their input channels, then multiply their output channels' rows of w."""
    N, C = x.shape[0], x.shape[1]
    O, CKK = w.shape
    P = OH * OW
    yf, wf = y.reshape(-1), w.reshape(-1)
    for n in range(N):
        for t in prange(T):
            _cols(x, n, t * C // T, (t + 1) * C // T, KH, KW, sh, sw, ph, pw, dh, dw, OH, OW, cols, True)
        for t in prange(T):
            o0, o1 = t * O // T, (t + 1) * O // T
            gemm(o1 - o0, P, CKK, wf[o0 * CKK:], CKK, N_, cols, P, N_, yf[(n * O + o0) * P:], 0.0)
            for o in range(o0, o1):
                strided_add(yf, (n * O + o) * P, yf, (n * O + o) * P, P, 1, b[o])
    return y


def _bwd_nat(x, w, gy, gx, gw, KH, KW, sh, sw, ph, pw, dh, dw, OH, OW, T, need_gx, need_gw, cols):
    """gw[O, C*KH*KW] = sum over n of gy[n] @ cols(x[n])^T (thread t: its output channels'
    rows), and gx[n] (zeroed by the caller) += the columns w^T @ gy[n], put back into the
    image (thread t: all rows of its input channels, so no two threads add to one pixel)."""
    N = gy.shape[0]
    O, CKK = w.shape
    P, KK = OH * OW, KH * KW
    C = CKK // KK
    gyf, wf, gwf = gy.reshape(-1), w.reshape(-1), gw.reshape(-1)
    for n in range(N):
        if need_gw:
            for t in prange(T):
                _cols(x, n, t * C // T, (t + 1) * C // T, KH, KW, sh, sw, ph, pw, dh, dw, OH, OW, cols, True)
            for t in prange(T):
                o0, o1 = t * O // T, (t + 1) * O // T
                gemm(o1 - o0, CKK, P, gyf[(n * O + o0) * P:], P, N_, cols, P, T_, gwf[o0 * CKK:],
                      0.0 if n == 0 else 1.0)
        if need_gx:
            for t in prange(T):
                c0, c1 = t * C // T, (t + 1) * C // T
                gemm((c1 - c0) * KK, P, O, wf[c0 * KK:], CKK, T_, gyf[n * O * P:], P, N_,
                      cols.reshape(-1)[c0 * KK * P:], 0.0)
                _cols(gx, n, c0, c1, KH, KW, sh, sw, ph, pw, dh, dw, OH, OW, cols, False)
    return gx


_fwd = kernel(_fwd)
_bwd = kernel(_bwd)
_fwd_nat = kernel(_fwd_nat)
_bwd_nat = kernel(_bwd_nat)


def _taps(g):
    return taps(g.H, g.W, g.KH, g.KW, g.OH, g.OW, *g.s, *g.p, *g.d)


def _threads(k, g):
    fn, T = k.pick(g.work)
    return fn, max(1, min(T, g.O, g.C))


def _natural(g) -> bool:
    """w @ cols in the weights' layout (see the module doc): images of more than 4 pixels,
    one or two at a time. With more images the tap GEMMs batch them and win; at 1-2 the
    natural path does."""
    return g.OH * g.OW > 4 and g.N <= 2


def _geom(g):
    return (g.KH, g.KW, *g.s, *g.p, *g.d, g.OH, g.OW)


def forward(x, w, b, g, y, s):
    """Into y[N, O, OH*OW], with workspace from scratch s."""
    if _natural(g):
        fn, T = _threads(_fwd_nat, g)
        fn(x, w.reshape(g.O, -1), b, y, *_geom(g), T, s.take(g.C * g.KH * g.KW * g.OH * g.OW, x.dtype))
        return
    ids, starts, outs, ins = _taps(g)
    fn, T = _threads(_fwd, g)
    rows, dt = g.N * int(starts[-1]), x.dtype
    fn(x.reshape(g.N, g.C, -1), w.reshape(g.O, g.C, -1), b, y, ids, starts, outs, ins, T,
       s.take((rows, g.C), dt), s.take(rows * g.O, dt), s.take((T, (g.O // T + 1) * g.C), dt))


def backward(x, xshape, w, gy, g, need_gx, need_gw, gw_out, gx_out, s):
    """(gx, gw) into gx_out / gw_out where given, with workspace from scratch s."""
    gy = np.ascontiguousarray(gy, dtype=w.dtype).reshape(g.N, g.O, g.OH * g.OW)
    if _natural(g):
        gx = out_array(gx_out, xshape, w.dtype, zero=True) if need_gx else np.zeros((1, 1, 1, 1), w.dtype)
        gw = np.empty(w.shape if need_gw else (1, 1, 1, 1), w.dtype) if gw_out is None else gw_out
        xr = x if need_gw else np.zeros((1, 1, 1, 1), w.dtype)
        fn, T = _threads(_bwd_nat, g)
        fn(xr, w.reshape(g.O, -1), gy, gx, gw.reshape(gw.shape[0], -1), *_geom(g), T, need_gx, need_gw,
           s.take(g.C * g.KH * g.KW * g.OH * g.OW, w.dtype))
        return (gx if need_gx else None), (gw if need_gw else None)
    ids, starts, outs, ins = _taps(g)
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
