"""Pooling, unpooling and upsampling on NCHW planes, one thread per output element.

Backwards are gathers wherever the windows are known (each input element sums the
outputs that read it), so they need no atomics and are deterministic; only the
bilinear backward scatters with atomic adds.
"""
from __future__ import annotations

import numpy as np
from numba import cuda

from ..geometry import pool_geom as _geom, pool_out_size  # noqa: F401 (re-exported)
from . import device, empty, flat, kernel, launch, pair, zeros
from .tensor import broadcast_axis, reduce_axis




@device
def _lo(o, s, p, k, n):
    """First input index of output o's window, clipped."""
    return max(o * s - p, 0)


@device
def _hi(o, s, p, k, n):
    return min(o * s - p + k, n)


@device
def _count(o, s, p, k, n):
    """Window length within the padded input (count_include_pad)."""
    return min(o * s - p + k, n + p) - (o * s - p)


@device
def _first_out(i, s, p, k):
    """Smallest output whose window [o*s - p, o*s - p + k) contains input i."""
    t = i + p - k + 1
    return 0 if t <= 0 else (t + s - 1) // s


@device
def _window(e, H, W, OH, OW, kh, kw, sh, sw, ph, pw):
    """Output element e of [P, OH, OW] as (plane, oh, ow) and its clipped input window
    rows [h0, h1) and columns [w0, w1)."""
    ow = e % OW
    oh = (e // OW) % OH
    return (e // (OW * OH), oh, ow, _lo(oh, sh, ph, kh, H), _hi(oh, sh, ph, kh, H),
            _lo(ow, sw, pw, kw, W), _hi(ow, sw, pw, kw, W))


@kernel("alaiiiiiiiiiii")
def _max_fwd(x, idx, y, P, H, W, OH, OW, kh, kw, sh, sw, ph, pw):
    T = x.dtype.type
    for e in range(cuda.grid(1), P * OH * OW, cuda.gridsize(1)):
        q, oh, ow, h0, h1, w0, w1 = _window(e, H, W, OH, OW, kh, kw, sh, sw, ph, pw)
        best = T(-np.inf)
        arg = h0 * W + w0
        for ih in range(h0, h1):
            for iw in range(w0, w1):
                v = x[(q * H + ih) * W + iw]
                if v > best or v != v:   # NaN wins, as in torch
                    best = v
                    arg = ih * W + iw
        y[e] = best
        idx[e] = arg


@kernel("alaiiiiiiiiiii")
def _max_bwd(gy, idx, gx, P, H, W, OH, OW, kh, kw, sh, sw, ph, pw):
    """gx[q, ih, iw] = sum of gy over the windows whose switch chose (ih, iw)."""
    T = gy.dtype.type
    for e in range(cuda.grid(1), P * H * W, cuda.gridsize(1)):
        iw = e % W
        ih = (e // W) % H
        q = e // (W * H)
        me = ih * W + iw
        acc = T(0)
        for oh in range(_first_out(ih, sh, ph, kh), min(OH, (ih + ph) // sh + 1)):
            for ow in range(_first_out(iw, sw, pw, kw), min(OW, (iw + pw) // sw + 1)):
                o = (q * OH + oh) * OW + ow
                if idx[o] == me:
                    acc += gy[o]
        gx[e] = acc


@kernel("alaiii")
def _unpool(x, idx, y, P, L, OL):
    """y[q, idx[q, i]] = x[q, i] (y zeroed)."""
    for e in range(cuda.grid(1), P * L, cuda.gridsize(1)):
        y[(e // L) * OL + idx[e]] = x[e]


@kernel("alaiii")
def _unpool_bwd(gy, idx, gx, P, L, OL):
    for e in range(cuda.grid(1), P * L, cuda.gridsize(1)):
        gx[e] = gy[(e // L) * OL + idx[e]]


@kernel("aaiiiiiiiiiiii")
def _avg_fwd(x, y, P, H, W, OH, OW, kh, kw, sh, sw, ph, pw, include_pad):
    T = x.dtype.type
    for e in range(cuda.grid(1), P * OH * OW, cuda.gridsize(1)):
        q, oh, ow, h0, h1, w0, w1 = _window(e, H, W, OH, OW, kh, kw, sh, sw, ph, pw)
        n = _count(oh, sh, ph, kh, H) * _count(ow, sw, pw, kw, W) if include_pad else (h1 - h0) * (w1 - w0)
        acc = T(0)
        for ih in range(h0, h1):
            for iw in range(w0, w1):
                acc += x[(q * H + ih) * W + iw]
        y[e] = acc / T(n)


@kernel("aaiiiiiiiiiiii")
def _avg_bwd(gy, gx, P, H, W, OH, OW, kh, kw, sh, sw, ph, pw, include_pad):
    T = gy.dtype.type
    for e in range(cuda.grid(1), P * H * W, cuda.gridsize(1)):
        iw = e % W
        ih = (e // W) % H
        q = e // (W * H)
        acc = T(0)
        for oh in range(_first_out(ih, sh, ph, kh), min(OH, (ih + ph) // sh + 1)):
            for ow in range(_first_out(iw, sw, pw, kw), min(OW, (iw + pw) // sw + 1)):
                if include_pad:
                    n = _count(oh, sh, ph, kh, H) * _count(ow, sw, pw, kw, W)
                else:
                    n = (_hi(oh, sh, ph, kh, H) - _lo(oh, sh, ph, kh, H)) * \
                        (_hi(ow, sw, pw, kw, W) - _lo(ow, sw, pw, kw, W))
                acc += gy[(q * OH + oh) * OW + ow] / T(n)
        gx[e] = acc


def _planes(x):
    return x.shape[0] * x.shape[1], x.shape[2], x.shape[3]


def maxpool2d(x, kernel_size, stride=None, pad=0, ceil_mode=False):
    """(y, switches): switches are int64 flat indices ih*W+iw within each input plane."""
    k, s, p, OH, OW = _geom(x.shape, kernel_size, stride, pad, ceil_mode)
    P, H, W = _planes(x)
    y = empty(x.shape[:2] + (OH, OW), x.dtype)
    idx = empty(y.shape, np.int64)
    launch(_max_fwd, y.size, flat(x), flat(idx), flat(y), P, H, W, OH, OW, *k, *s, *p)
    return y, idx


def maxpool2d_backward(gy, switches, xshape, kernel_size, stride=None, pad=0, ceil_mode=False):
    k, s, p, OH, OW = _geom(xshape, kernel_size, stride, pad, ceil_mode)
    gx = empty(xshape, gy.dtype)
    launch(_max_bwd, gx.size, flat(gy), flat(switches), flat(gx), *_planes(gx), OH, OW, *k, *s, *p)
    return gx


def global_maxpool2d(x):
    return maxpool2d(x, x.shape[2:], 1, 0)


def max_unpool2d(x, switches, kernel_size, stride=None, pad=0, output_size=None):
    k, s, p = pair(kernel_size), pair(stride if stride is not None else kernel_size), pair(pad)
    if output_size is None:
        output_size = tuple((n - 1) * s_ - 2 * p_ + k_ for n, s_, p_, k_ in zip(x.shape[2:], s, p, k))
    OH, OW = output_size[-2:]
    y = zeros(x.shape[:2] + (OH, OW), x.dtype)
    P, H, W = _planes(x)
    launch(_unpool, x.size, flat(x), flat(switches), flat(y), P, H * W, OH * OW)
    return y


def max_unpool2d_backward(gy, switches):
    gx = empty(switches.shape, gy.dtype)
    P, H, W = _planes(gx)
    launch(_unpool_bwd, gx.size, flat(gy), flat(switches), flat(gx), P, H * W, gy.shape[2] * gy.shape[3])
    return gx


def avgpool2d(x, kernel_size, stride=None, pad=0, ceil_mode=False, count_include_pad=True):
    k, s, p, OH, OW = _geom(x.shape, kernel_size, stride, pad, ceil_mode)
    y = empty(x.shape[:2] + (OH, OW), x.dtype)
    launch(_avg_fwd, y.size, flat(x), flat(y), *_planes(x), OH, OW, *k, *s, *p, int(count_include_pad))
    return y


def avgpool2d_backward(gy, xshape, kernel_size, stride=None, pad=0, ceil_mode=False, count_include_pad=True):
    k, s, p, OH, OW = _geom(xshape, kernel_size, stride, pad, ceil_mode)
    gx = empty(xshape, gy.dtype)
    launch(_avg_bwd, gx.size, flat(gy), flat(gx), *_planes(gx), OH, OW, *k, *s, *p, int(count_include_pad))
    return gx


def global_avgpool2d(x):
    """[N, C, H, W] -> [N, C, 1, 1]: a shared-memory mean per plane."""
    P, H, W = _planes(x)
    return reduce_axis(x.reshape(P, H * W), 1, mean=True).reshape(x.shape[:2] + (1, 1))


def global_avgpool2d_backward(gy, xshape):
    P = xshape[0] * xshape[1]
    return broadcast_axis(gy.reshape(P), (P, xshape[2] * xshape[3]), 1,
                          1.0 / (xshape[2] * xshape[3])).reshape(xshape)


# ---------------------------------------------------------------- adaptive average pooling
# torch's cells: output i covers [floor(i*n/out), ceil((i+1)*n/out)).

@kernel("aaiiiii")
def _adaptive_fwd(x, y, P, H, W, OH, OW):
    T = x.dtype.type
    for e in range(cuda.grid(1), P * OH * OW, cuda.gridsize(1)):
        j = e % OW
        i = (e // OW) % OH
        q = e // (OW * OH)
        r0, r1 = i * H // OH, -(-(i + 1) * H // OH)
        c0, c1 = j * W // OW, -(-(j + 1) * W // OW)
        acc = T(0)
        for ih in range(r0, r1):
            for iw in range(c0, c1):
                acc += x[(q * H + ih) * W + iw]
        y[e] = acc / T((r1 - r0) * (c1 - c0))


@kernel("aaiiiii")
def _adaptive_bwd(gy, gx, P, H, W, OH, OW):
    T = gy.dtype.type
    for e in range(cuda.grid(1), P * H * W, cuda.gridsize(1)):
        iw = e % W
        ih = (e // W) % H
        q = e // (W * H)
        acc = T(0)
        for i in range(max(0, ih * OH // H - 1), min(OH, (ih + 1) * OH // H + 2)):
            r0, r1 = i * H // OH, -(-(i + 1) * H // OH)
            if r0 <= ih < r1:
                for j in range(max(0, iw * OW // W - 1), min(OW, (iw + 1) * OW // W + 2)):
                    c0, c1 = j * W // OW, -(-(j + 1) * W // OW)
                    if c0 <= iw < c1:
                        acc += gy[(q * OH + i) * OW + j] / T((r1 - r0) * (c1 - c0))
        gx[e] = acc


def adaptive_avgpool2d(x, size):
    OH, OW = pair(size)
    y = empty(x.shape[:2] + (OH, OW), x.dtype)
    launch(_adaptive_fwd, y.size, flat(x), flat(y), *_planes(x), OH, OW)
    return y


def adaptive_avgpool2d_backward(gy, xshape):
    gx = empty(xshape, gy.dtype)
    launch(_adaptive_bwd, gx.size, flat(gy), flat(gx), *_planes(gx), gy.shape[2], gy.shape[3])
    return gx


# ---------------------------------------------------------------- upsampling

@kernel("aaiiiiii")
def _nearest(x, y, P, H, W, sh, sw, adjoint):
    """y[oh, ow] = x[oh // sh, ow // sw]; adjoint: x[ih, iw] = sum of its sh x sw block of y."""
    T = x.dtype.type
    OH, OW = H * sh, W * sw
    if adjoint:
        for e in range(cuda.grid(1), P * H * W, cuda.gridsize(1)):
            iw = e % W
            ih = (e // W) % H
            q = e // (W * H)
            acc = T(0)
            for a in range(sh):
                for b in range(sw):
                    acc += y[(q * OH + ih * sh + a) * OW + iw * sw + b]
            x[e] = acc
    else:
        for e in range(cuda.grid(1), P * OH * OW, cuda.gridsize(1)):
            ow = e % OW
            oh = (e // OW) % OH
            q = e // (OW * OH)
            y[e] = x[(q * H + oh // sh) * W + ow // sw]


@kernel("aaiiiiiffi")
def _bilinear(x, y, P, H, W, OH, OW, rh, rw, adjoint):
    """torch bilinear, align_corners=False; adjoint scatters y into x (zeroed) by atomic adds."""
    T = x.dtype.type
    half = T(0.5)
    one = T(1)
    zero = T(0)
    for e in range(cuda.grid(1), P * OH * OW, cuda.gridsize(1)):
        ow = e % OW
        oh = (e // OW) % OH
        q = e // (OW * OH)
        sy = max(rh * (T(oh) + half) - half, zero)
        h0 = int(sy)
        h1 = h0 + 1 if h0 < H - 1 else h0
        ly = sy - T(h0)
        sx = max(rw * (T(ow) + half) - half, zero)
        w0 = int(sx)
        w1 = w0 + 1 if w0 < W - 1 else w0
        lx = sx - T(w0)
        a, b, c, d = (one - ly) * (one - lx), (one - ly) * lx, ly * (one - lx), ly * lx
        base = q * H * W
        if adjoint:
            g = y[e]
            cuda.atomic.add(x, base + h0 * W + w0, a * g)
            cuda.atomic.add(x, base + h0 * W + w1, b * g)
            cuda.atomic.add(x, base + h1 * W + w0, c * g)
            cuda.atomic.add(x, base + h1 * W + w1, d * g)
        else:
            y[e] = (a * x[base + h0 * W + w0] + b * x[base + h0 * W + w1]
                    + c * x[base + h1 * W + w0] + d * x[base + h1 * W + w1])


def upsample_nearest2d(x, scale):
    sh, sw = pair(scale)
    y = empty(x.shape[:2] + (x.shape[2] * sh, x.shape[3] * sw), x.dtype)
    launch(_nearest, y.size, flat(x), flat(y), *_planes(x), sh, sw, 0)
    return y


def upsample_nearest2d_backward(gy, scale):
    sh, sw = pair(scale)
    gx = empty(gy.shape[:2] + (gy.shape[2] // sh, gy.shape[3] // sw), gy.dtype)
    launch(_nearest, gx.size, flat(gx), flat(gy), *_planes(gx), sh, sw, 1)
    return gx


def _ratios(scale_factor, dtype):
    f = pair(scale_factor) if not isinstance(scale_factor, float) else (scale_factor, scale_factor)
    return np.dtype(dtype).type(1.0 / f[0]), np.dtype(dtype).type(1.0 / f[1])


def upsample_bilinear2d(x, scale_factor):
    """F.interpolate(mode='bilinear', align_corners=False, scale_factor=...)."""
    sf = float(scale_factor)
    OH, OW = int(x.shape[2] * sf), int(x.shape[3] * sf)
    y = empty(x.shape[:2] + (OH, OW), x.dtype)
    launch(_bilinear, y.size, flat(x), flat(y), *_planes(x), OH, OW, *_ratios(sf, x.dtype), 0)
    return y


def upsample_bilinear2d_backward(gy, xshape, scale_factor):
    gx = zeros(xshape, gy.dtype)
    launch(_bilinear, gy.size, flat(gx), flat(gy), *_planes(gx), gy.shape[2], gy.shape[3],
           *_ratios(float(scale_factor), gy.dtype), 1)
    return gx


@kernel("aaiiiii")
def _nails(x, y, P, H, W, s, adjoint):
    """y = x on every s-th row and column, zero elsewhere; adjoint: x = y there."""
    T = x.dtype.type
    OH, OW = H * s, W * s
    if adjoint:
        for e in range(cuda.grid(1), P * H * W, cuda.gridsize(1)):
            x[e] = y[((e // (H * W)) * OH + (e // W) % H * s) * OW + e % W * s]
    else:
        for e in range(cuda.grid(1), P * OH * OW, cuda.gridsize(1)):
            ow = e % OW
            oh = (e // OW) % OH
            v = T(0)
            if oh % s == 0 and ow % s == 0:
                v = x[((e // (OW * OH)) * H + oh // s) * W + ow // s]
            y[e] = v


def bed_of_nails(x, s):
    y = empty(x.shape[:2] + (x.shape[2] * s, x.shape[3] * s), x.dtype)
    launch(_nails, y.size, flat(x), flat(y), *_planes(x), s, 0)
    return y


def bed_of_nails_backward(gy, s):
    gx = empty(gy.shape[:2] + (gy.shape[2] // s, gy.shape[3] // s), gy.dtype)
    launch(_nails, gx.size, flat(gx), flat(gy), *_planes(gx), s, 1)
    return gx
