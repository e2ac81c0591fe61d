"""RoI features and the detection heads' small layers on the device: the twin of
kernels/cpu/roi.py (torchvision's RoIPool and RoIAlign semantics, R-CNN's crop_resize as
roi_align(size, 1, 1, aligned), SSD's L2Norm, select_class), one thread per output element.

RoI backwards scatter into the feature map with atomic adds, as torchvision's CUDA kernels
do (RoIs overlap, so no thread owns an input cell). A RoI with a negative batch index is
padding (zeros, no gradient); one at or past N gives NaN features, which the runtime's
non-finite check reports (a device kernel cannot raise). select_class's backward is a
gather, deterministic.
"""
from __future__ import annotations

import math

import numpy as np
from numba import cuda

from . import TPB_RED, device, empty, flat, kernel, launch, launch_rows, tree_sum, zeros

FLT_MAX = 3.4028234663852886e38


@device
def _round(a, v):
    """std::round (halves away from zero), exact in the dtype of array a."""
    T = a.dtype.type
    m = abs(v)
    f = int(m)                       # floor, m >= 0
    r = f + 1 if m - T(f) >= T(0.5) else f
    return r if v >= T(0) else -r


@device
def _pool_bin(a, p, bin_size, start, n):
    T = a.dtype.type
    lo = int(math.floor(T(p) * bin_size))
    hi = int(math.ceil(T(p + 1) * bin_size))
    return min(max(lo + start, 0), n), min(max(hi + start, 0), n)


@device
def _where(e, C, PH, PW):
    """Output element e of [R, C, PH, PW] as (r, c, ph, pw)."""
    return e // (PW * PH * C), (e // (PW * PH)) % C, (e // PW) % PH, e % PW


@kernel("aaaliiiiiif")
def _pool_fwd(x, rois, y, arg, N, C, H, W, PH, PW, scale):
    T = x.dtype.type
    for e in range(cuda.grid(1), y.size, cuda.gridsize(1)):
        r, c, ph, pw = _where(e, C, PH, PW)
        b = int(rois[r * 5])
        x0, y0 = _round(rois, rois[r * 5 + 1] * scale), _round(rois, rois[r * 5 + 2] * scale)
        x1, y1 = _round(rois, rois[r * 5 + 3] * scale), _round(rois, rois[r * 5 + 4] * scale)
        h0, h1 = _pool_bin(x, ph, T(max(y1 - y0 + 1, 1)) / T(PH), y0, H)
        w0, w1 = _pool_bin(x, pw, T(max(x1 - x0 + 1, 1)) / T(PW), x0, W)
        empty_ = b < 0 or h1 <= h0 or w1 <= w0
        best = T(0) if empty_ else T(-FLT_MAX)
        at = -1
        if b >= N:
            best = T(np.nan)
        elif not empty_:
            base = (b * C + c) * H * W
            for h in range(h0, h1):
                for w in range(w0, w1):
                    v = x[base + h * W + w]
                    if v > best:
                        best = v
                        at = h * W + w
        y[e] = best
        arg[e] = at


@kernel("alaaiiiiii")
def _pool_bwd(gy, arg, rois, gx, N, C, H, W, PH, PW):
    for e in range(cuda.grid(1), gy.size, cuda.gridsize(1)):
        a = arg[e]
        if a >= 0:
            r, c, ph, pw = _where(e, C, PH, PW)
            b = int(rois[r * 5])
            if 0 <= b < N:
                cuda.atomic.add(gx, (b * C + c) * H * W + a, gy[e])


@device
def _geometry(rois, r, scale, aligned, sampling, PH, PW):
    """(start y, start x, bin h, bin w, grid h, grid w, samples per bin) of RoI r."""
    T = rois.dtype.type
    off = T(0.5) if aligned else T(0)
    sx, sy = rois[r * 5 + 1] * scale - off, rois[r * 5 + 2] * scale - off
    rw, rh = rois[r * 5 + 3] * scale - off - sx, rois[r * 5 + 4] * scale - off - sy
    if not aligned:
        rw, rh = max(rw, T(1)), max(rh, T(1))
    bh, bw = rh / T(PH), rw / T(PW)
    gh = sampling if sampling > 0 else int(math.ceil(rh / T(PH)))
    gw = sampling if sampling > 0 else int(math.ceil(rw / T(PW)))
    return sy, sx, bh, bw, gh, gw, T(max(gh * gw, 1))


@device
def _axis(a, v, n):
    """(low, high, weight of high) of a sample along an axis of n cells; low = -1 off the map."""
    T = a.dtype.type
    if v < T(-1) or v > T(n):
        return -1, -1, T(0)
    v = max(v, T(0))
    lo = int(v)
    if lo >= n - 1:
        return n - 1, n - 1, T(0)
    return lo, lo + 1, v - T(lo)


@kernel("aaaiiiiiifiii")
def _align(x, rois, y, N, C, H, W, PH, PW, scale, sampling, aligned, adjoint):
    """y = roi_align(x); adjoint: x += the adjoint of y (atomically; x zeroed)."""
    T = x.dtype.type
    for e in range(cuda.grid(1), y.size, cuda.gridsize(1)):
        r, c, ph, pw = _where(e, C, PH, PW)
        b = int(rois[r * 5])
        if b < 0 or b >= N:
            if not adjoint:
                y[e] = T(0) if b < 0 else T(np.nan)
            continue
        sy, sx, bh, bw, gh, gw, count = _geometry(rois, r, scale, aligned, sampling, PH, PW)
        base = (b * C + c) * H * W
        g = y[e] / count if adjoint else T(0)
        acc = T(0)
        for iy in range(gh):
            yl, yh, ly = _axis(x, sy + T(ph) * bh + (T(iy) + T(0.5)) * bh / T(gh), H)
            for ix in range(gw):
                xl, xh, lx = _axis(x, sx + T(pw) * bw + (T(ix) + T(0.5)) * bw / T(gw), W)
                if yl < 0 or xl < 0:
                    continue
                hy, hx = T(1) - ly, T(1) - lx
                if adjoint:
                    cuda.atomic.add(x, base + yl * W + xl, hy * hx * g)
                    cuda.atomic.add(x, base + yl * W + xh, hy * lx * g)
                    cuda.atomic.add(x, base + yh * W + xl, ly * hx * g)
                    cuda.atomic.add(x, base + yh * W + xh, ly * lx * g)
                else:
                    acc += (hy * hx * x[base + yl * W + xl] + hy * lx * x[base + yl * W + xh]
                            + ly * hx * x[base + yh * W + xl] + ly * lx * x[base + yh * W + xh])
        if not adjoint:
            y[e] = acc / count


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def roi_pool(x, rois, out, scale):
    """(y [R, C, oh, ow], argmax i64 [R, C, oh, ow]): torchvision.ops.roi_pool."""
    N, C, H, W = x.shape
    oh, ow = _pair(out)
    shape = (rois.shape[0], C, oh, ow)
    y, arg = empty(shape, x.dtype), empty(shape, np.int64)
    launch(_pool_fwd, y.size, flat(x), flat(rois), flat(y), flat(arg), N, C, H, W, oh, ow,
           np.dtype(x.dtype).type(scale))
    return y, arg


def roi_pool_backward(gy, argmax, rois, xshape):
    N, C, H, W = xshape
    gx = zeros(tuple(xshape), gy.dtype)
    launch(_pool_bwd, gy.size, flat(gy), flat(argmax), flat(rois), flat(gx), N, C, H, W, gy.shape[2], gy.shape[3])
    return gx


def roi_align(x, rois, out, scale, sampling, aligned):
    """torchvision.ops.roi_align: [N, C, H, W], [R, 5] -> [R, C, oh, ow]."""
    N, C, H, W = x.shape
    oh, ow = _pair(out)
    y = empty((rois.shape[0], C, oh, ow), x.dtype)
    launch(_align, y.size, flat(x), flat(rois), flat(y), N, C, H, W, oh, ow, np.dtype(x.dtype).type(scale),
           int(sampling), int(bool(aligned)), 0)
    return y


def roi_align_backward(gy, rois, xshape, scale, sampling, aligned):
    N, C, H, W = xshape
    gx = zeros(tuple(xshape), gy.dtype)
    launch(_align, gy.size, flat(gx), flat(rois), flat(gy), N, C, H, W, gy.shape[2], gy.shape[3],
           np.dtype(gy.dtype).type(scale), int(sampling), int(bool(aligned)), 1)
    return gx


def crop_resize(x, rois, size):
    """R-CNN's warp: roi_align(size, scale 1, sampling 1, aligned) (see kernels/cpu/roi.py)."""
    return roi_align(x, rois, size, 1.0, 1, True)


def crop_resize_backward(gy, rois, xshape):
    return roi_align_backward(gy, rois, xshape, 1.0, 1, True)


# ---------------------------------------------------------------- SSD's L2Norm on [N, C, L]

@kernel("aaiif")
def _l2_inv(x, inv, C, L, eps):
    """inv[n, l] = 1 / sqrt(sum_c x[n, c, l]^2 + eps), one thread per position."""
    T = x.dtype.type
    for p in range(cuda.grid(1), inv.size, cuda.gridsize(1)):
        n, l = p // L, p % L
        acc = eps
        for c in range(C):
            v = x[(n * C + c) * L + l]
            acc += v * v
        inv[p] = T(1) / math.sqrt(acc)


@kernel("aaaaii")
def _l2_fwd(x, w, inv, y, C, L):
    for e in range(cuda.grid(1), y.size, cuda.gridsize(1)):
        y[e] = x[e] * inv[e // (L * C) * L + e % L] * w[(e // L) % C]


@kernel("aaaaaii")
def _l2_dot(gy, x, w, inv, dot, C, L):
    """dot[n, l] = sum_c gy * w * x * inv: the gradient's projection on the unit vector."""
    T = x.dtype.type
    for p in range(cuda.grid(1), dot.size, cuda.gridsize(1)):
        n, l = p // L, p % L
        acc = T(0)
        for c in range(C):
            i = (n * C + c) * L + l
            acc += gy[i] * w[c] * x[i]
        dot[p] = acc * inv[p]


@kernel("aaaaaaii")
def _l2_gx(gy, x, w, inv, dot, gx, C, L):
    for e in range(cuda.grid(1), gx.size, cuda.gridsize(1)):
        p = e // (L * C) * L + e % L
        gx[e] = (gy[e] * w[(e // L) % C] - x[e] * inv[p] * dot[p]) * inv[p]


@kernel("aaaaiii")
def _l2_gw(gy, x, inv, gw, N, C, L):
    """gw[c] = sum over n, l of gy * x * inv: one block per channel, a tree in shared memory."""
    T = x.dtype.type
    sh = cuda.shared.array(TPB_RED, x.dtype)
    t = cuda.threadIdx.x
    for c in range(cuda.blockIdx.x, C, cuda.gridDim.x):
        acc = T(0)
        for j in range(t, N * L, TPB_RED):
            n = j // L
            i = (n * C + c) * L + j - n * L
            acc += gy[i] * x[i] * inv[j]
        sh[t] = acc
        tree_sum(sh, t)
        if t == 0:
            gw[c] = sh[0]
        cuda.syncthreads()


def _inv_norm(x, eps):
    N, C, H, W = x.shape
    inv = empty((N, H * W), x.dtype)
    launch(_l2_inv, inv.size, flat(x), flat(inv), C, H * W, np.dtype(x.dtype).type(eps))
    return inv


def l2norm(x, weight, eps):
    """y[n, c] = x[n, c] / sqrt(sum_c x[n, c]^2 + eps) * weight[c]."""
    N, C, H, W = x.shape
    y = empty(x.shape, x.dtype)
    launch(_l2_fwd, y.size, flat(x), flat(weight), flat(_inv_norm(x, eps)), flat(y), C, H * W)
    return y


def l2norm_backward(gy, x, weight, eps, need_gx=True):
    """(gx or None, gweight)."""
    N, C, H, W = x.shape
    inv = _inv_norm(x, eps)
    gx = None
    if need_gx:
        dot = empty(inv.shape, x.dtype)
        launch(_l2_dot, dot.size, flat(gy), flat(x), flat(weight), flat(inv), flat(dot), C, H * W)
        gx = empty(x.shape, x.dtype)
        launch(_l2_gx, gx.size, flat(gy), flat(x), flat(weight), flat(inv), flat(dot), flat(gx), C, H * W)
    gw = empty((C,), x.dtype)
    launch_rows(_l2_gw, C, flat(gy), flat(x), flat(inv), gw, N, C, H * W)
    return gx, gw


# ---------------------------------------------------------------- select_class on [R, K, M]

@kernel("alaii")
def _select(x, labels, y, K, M):
    """y[r, m] = x[r, labels[r], m]; 0 for label -1 (ignored), NaN for one outside [0, K)."""
    T = x.dtype.type
    for e in range(cuda.grid(1), y.size, cuda.gridsize(1)):
        r = e // M
        k = labels[r]
        if 0 <= k < K:
            y[e] = x[(r * K + k) * M + e - r * M]
        else:
            y[e] = T(0) if k == -1 else T(np.nan)


@kernel("alaii")
def _select_bwd(gy, labels, gx, K, M):
    """gx[r, k, m] = gy[r, m] where k is row r's label, else 0: a gather."""
    T = gy.dtype.type
    for e in range(cuda.grid(1), gx.size, cuda.gridsize(1)):
        r = e // (M * K)
        gx[e] = gy[r * M + e % M] if labels[r] == (e // M) % K else T(0)


def select_class(x, labels):
    R, K = x.shape[0], x.shape[1]
    M = x.size // max(R * K, 1)
    y = empty((R,) + tuple(x.shape[2:]), x.dtype)
    launch(_select, y.size, flat(x), flat(labels), flat(y), K, M)
    return y


def select_class_backward(gy, labels, classes):
    R = gy.shape[0]
    M = gy.size // max(R, 1)
    gx = empty((R, classes) + tuple(gy.shape[1:]), gy.dtype)
    launch(_select_bwd, gx.size, flat(gy), flat(labels), flat(gx), classes, M)
    return gx
