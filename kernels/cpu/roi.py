"""RoI features and the detection heads' small layers, NCHW, forward and backward.

A RoI is a row (batch index, x1, y1, x2, y2) of rois [R, 5], in image pixels; `scale`
maps them onto the feature map. The semantics are torchvision's C++ kernels
(torchvision/csrc/ops/cpu/roi_pool_kernel.cpp, roi_align_kernel.cpp), step for step in the
feature map's dtype:

- roi_pool: the RoI's corners rounded (half away from zero) to cells, at least 1x1; bin
  (ph, pw) covers rows [floor(ph*bh), ceil((ph+1)*bh)) of it, clipped to the map; its max,
  0 for an empty bin. The argmax (index in the H*W plane, -1 when empty) routes the
  gradient back.
- roi_align: no rounding; bin (ph, pw) averages sampling x sampling bilinear samples at
  the centres of a regular grid (sampling <= 0: ceil(roi side / out) per RoI, torchvision's
  adaptive mode); aligned shifts the RoI by half a cell. A sample more than one cell off
  the map counts 0; one within that margin is clamped to the edge.
- crop_resize: R-CNN's warp, defined as roi_align(out=size, scale=1, sampling=1,
  aligned=True): one bilinear sample at the centre of each output pixel of the box, i.e.
  the box resized like F.interpolate(mode="bilinear", align_corners=False) resizes an
  image (exactly that, when the box is the whole image).

A RoI whose batch index is negative is padding: zero features, no gradient. One at or past
N raises IndexError. Backward scatters run in parallel over channels, so no two threads
add into the same plane (CUDA uses atomics instead).
"""
import math

import numpy as np

from . import as_float, kernel, njit, out_array, prange

def exact(fn):
    return njit(fn, exact=True)


FLT_MAX = 3.4028234663852886e38   # roi_pool's "nothing seen yet", -FLT_MAX in every dtype as in torchvision


@exact
def _round(v):
    """std::round, halves away from zero; exact in v's dtype (v + 0.5 may round up)."""
    T = type(v)
    a = abs(v)
    f = int(a)                       # floor, a >= 0
    r = f + 1 if a - T(f) >= T(0.5) else f
    return r if v >= 0 else -r


@exact
def _pool_bin(p, bin_size, start, n):
    """Rows [lo, hi) of bin p of a RoI starting at cell `start`, clipped to [0, n)."""
    T = type(bin_size)
    lo = int(math.floor(T(p) * bin_size))
    hi = int(math.ceil(T(p + 1) * bin_size))
    return min(max(lo + start, 0), n), min(max(hi + start, 0), n)


def _pool_fwd(x, rois, y, arg, scale):
    N, C, H, W = x.shape
    R, _, PH, PW = y.shape
    T = x.dtype.type
    for r in prange(R):
        b = int(rois[r, 0])
        x0, y0 = _round(rois[r, 1] * scale), _round(rois[r, 2] * scale)
        x1, y1 = _round(rois[r, 3] * scale), _round(rois[r, 4] * scale)
        bh = T(max(y1 - y0 + 1, 1)) / T(PH)        # malformed RoIs are forced to 1x1
        bw = T(max(x1 - x0 + 1, 1)) / T(PW)
        for ph in range(PH):
            h0, h1 = _pool_bin(ph, bh, y0, H)
            for pw in range(PW):
                w0, w1 = _pool_bin(pw, bw, x0, W)
                empty = b < 0 or h1 <= h0 or w1 <= w0
                for c in range(C):
                    best = T(0) if empty else T(-FLT_MAX)
                    at = -1
                    if not empty:
                        for h in range(h0, h1):
                            for w in range(w0, w1):
                                if x[b, c, h, w] > best:
                                    best = x[b, c, h, w]
                                    at = h * W + w
                    y[r, c, ph, pw] = best
                    arg[r, c, ph, pw] = at
    return y


def _pool_bwd(gy, arg, rois, gx):
    N, C, H, W = gx.shape
    R, _, PH, PW = gy.shape
    for c in prange(C):
        for r in range(R):
            b = int(rois[r, 0])
            if b < 0:
                continue
            for ph in range(PH):
                for pw in range(PW):
                    a = arg[r, c, ph, pw]
                    if a >= 0:
                        gx[b, c, a // W, a % W] += gy[r, c, ph, pw]
    return gx


@exact
def _align_geometry(roi, scale, aligned, sampling, PH, PW):
    """(start y, start x, bin h, bin w, grid h, grid w, samples per bin) of one RoI, in its dtype."""
    T = roi.dtype.type
    off = T(0.5) if aligned else T(0)
    sx, sy = roi[1] * scale - off, roi[2] * scale - off
    rw, rh = roi[3] * scale - off - sx, roi[4] * scale - off - sy
    if not aligned:                                 # legacy: malformed RoIs forced to 1x1
        rw, rh = max(rw, T(1)), max(rh, T(1))
    bh, bw = rh / T(PH), rw / T(PW)
    gh = sampling if sampling > 0 else int(math.ceil(rh / T(PH)))
    gw = sampling if sampling > 0 else int(math.ceil(rw / T(PW)))
    return sy, sx, bh, bw, gh, gw, T(max(gh * gw, 1))


@exact
def _axis(v, n):
    """A sample coordinate along an axis of n cells: (low, high, weight of high), or
    low = -1 when the sample lies more than one cell off the map."""
    T = type(v)
    if v < T(-1) or v > T(n):
        return -1, -1, T(0)
    v = max(v, T(0))
    lo = int(v)
    if lo >= n - 1:
        return n - 1, n - 1, T(0)
    return lo, lo + 1, v - T(lo)


def _align_fwd(x, rois, y, scale, sampling, aligned):
    N, C, H, W = x.shape
    R, _, PH, PW = y.shape
    T = x.dtype.type
    for r in prange(R):
        b = int(rois[r, 0])
        sy, sx, bh, bw, gh, gw, count = _align_geometry(rois[r], scale, aligned, sampling, PH, PW)
        for ph in range(PH):
            for pw in range(PW):
                for c in range(C):
                    y[r, c, ph, pw] = T(0)
                if b < 0:
                    continue
                for iy in range(gh):
                    yl, yh, ly = _axis(sy + T(ph) * bh + (T(iy) + T(0.5)) * bh / T(gh), H)
                    for ix in range(gw):
                        xl, xh, lx = _axis(sx + T(pw) * bw + (T(ix) + T(0.5)) * bw / T(gw), W)
                        if yl < 0 or xl < 0:
                            continue
                        hy, hx = T(1) - ly, T(1) - lx
                        w1, w2, w3, w4 = hy * hx, hy * lx, ly * hx, ly * lx
                        for c in range(C):
                            y[r, c, ph, pw] += (w1 * x[b, c, yl, xl] + w2 * x[b, c, yl, xh]
                                                + w3 * x[b, c, yh, xl] + w4 * x[b, c, yh, xh])
                for c in range(C):
                    y[r, c, ph, pw] /= count
    return y


def _align_bwd(gy, rois, gx, scale, sampling, aligned):
    N, C, H, W = gx.shape
    R, _, PH, PW = gy.shape
    T = gx.dtype.type
    for c in prange(C):
        for r in range(R):
            b = int(rois[r, 0])
            if b < 0:
                continue
            sy, sx, bh, bw, gh, gw, count = _align_geometry(rois[r], scale, aligned, sampling, PH, PW)
            for ph in range(PH):
                for pw in range(PW):
                    g = gy[r, c, ph, pw] / count
                    for iy in range(gh):
                        yl, yh, ly = _axis(sy + T(ph) * bh + (T(iy) + T(0.5)) * bh / T(gh), H)
                        for ix in range(gw):
                            xl, xh, lx = _axis(sx + T(pw) * bw + (T(ix) + T(0.5)) * bw / T(gw), W)
                            if yl < 0 or xl < 0:
                                continue
                            hy, hx = T(1) - ly, T(1) - lx
                            gx[b, c, yl, xl] += hy * hx * g
                            gx[b, c, yl, xh] += hy * lx * g
                            gx[b, c, yh, xl] += ly * hx * g
                            gx[b, c, yh, xh] += ly * lx * g
    return gx


# exact: IEEE order, no reciprocals or contraction. Which cells a bin covers and whether a
# sample is off the map are decided by comparisons (floor, ceil, y < -1) that a rounding
# changed by fastmath flips at the boundaries, e.g. 2.5 * 3 / 3 = -1 + a little.
_pool_fwd = kernel(_pool_fwd, exact=True)
_pool_bwd = kernel(_pool_bwd, exact=True)
_align_fwd = kernel(_align_fwd, exact=True)
_align_bwd = kernel(_align_bwd, exact=True)


def _rois(rois, x, N):
    """rois as a contiguous [R, 5] array of x's dtype; batch indices checked."""
    rois = np.ascontiguousarray(rois, dtype=x.dtype)
    if rois.ndim != 2 or rois.shape[1] != 5:
        raise ValueError(f"rois must be [R, 5], got {rois.shape}")
    bad = np.flatnonzero(rois[:, 0] >= N)
    if bad.size:
        raise IndexError(f"RoI {bad[0]} has batch index {rois[bad[0], 0]:g}, but there are {N} images")
    return rois


def roi_pool(x, rois, out, scale):
    """torchvision.ops.roi_pool: (y [R, C, oh, ow], argmax i64 [R, C, oh, ow])."""
    x = as_float(x)
    rois = _rois(rois, x, x.shape[0])
    oh, ow = (out, out) if isinstance(out, int) else out
    shape = (rois.shape[0], x.shape[1], oh, ow)
    y, arg = np.empty(shape, x.dtype), np.empty(shape, np.int64)
    _pool_fwd(y.size, x, rois, y, arg, x.dtype.type(scale))
    return y, arg


def roi_pool_backward(gy, argmax, rois, xshape):
    """gx [N, C, H, W]: each output's gradient added at its argmax."""
    gy = as_float(gy)
    gx = np.zeros(tuple(xshape), gy.dtype)
    _pool_bwd(gy.size, gy, np.ascontiguousarray(argmax, np.int64), _rois(rois, gy, xshape[0]), gx)
    return gx


def roi_align(x, rois, out, scale, sampling, aligned, out_=None):
    """torchvision.ops.roi_align: [N, C, H, W], [R, 5] -> [R, C, oh, ow]."""
    x = as_float(x)
    rois = _rois(rois, x, x.shape[0])
    oh, ow = (out, out) if isinstance(out, int) else out
    y = out_array(out_, (rois.shape[0], x.shape[1], oh, ow), x.dtype)
    _align_fwd(y.size, x, rois, y, x.dtype.type(scale), int(sampling), bool(aligned))
    return y


def roi_align_backward(gy, rois, xshape, scale, sampling, aligned):
    """gx [N, C, H, W]: each output's gradient spread over its samples' four neighbours."""
    gy = as_float(gy)
    gx = np.zeros(tuple(xshape), gy.dtype)
    _align_bwd(gy.size, gy, _rois(rois, gy, xshape[0]), gx, gy.dtype.type(scale), int(sampling), bool(aligned))
    return gx


def crop_resize(x, rois, size):
    """R-CNN's warp of each RoI to size (h, w): roi_align(size, 1, 1, aligned=True)."""
    return roi_align(x, rois, size, 1.0, 1, True)


def crop_resize_backward(gy, rois, xshape):
    return roi_align_backward(gy, rois, xshape, 1.0, 1, True)


# ---------------------------------------------------------------- SSD's L2Norm

def _l2_inv(x, inv, eps):
    """inv[n, h, w] = 1 / sqrt(sum_c x[n, c, h, w]^2 + eps); rows of W contiguous."""
    N, C, H, W = x.shape
    for q in prange(N * H):
        n, h = q // H, q % H
        for w in range(W):
            inv[n, h, w] = eps
        for c in range(C):
            for w in range(W):
                inv[n, h, w] += x[n, c, h, w] * x[n, c, h, w]
        for w in range(W):
            inv[n, h, w] = x.dtype.type(1) / math.sqrt(inv[n, h, w])
    return inv


def _l2_fwd(x, wt, inv, y):
    N, C, H, W = x.shape
    for q in prange(N * H):
        n, h = q // H, q % H
        for c in range(C):
            for w in range(W):
                y[n, c, h, w] = x[n, c, h, w] * inv[n, h, w] * wt[c]
    return y


def _l2_gx(gy, x, wt, inv, gx):
    """gx = (gy*w - u * sum_c gy*w*u) * inv with u = x * inv, per position."""
    N, C, H, W = x.shape
    dot = np.zeros((N, H, W), x.dtype)
    for q in prange(N * H):
        n, h = q // H, q % H
        for c in range(C):
            for w in range(W):
                dot[n, h, w] += gy[n, c, h, w] * wt[c] * x[n, c, h, w] * inv[n, h, w]
        for c in range(C):
            for w in range(W):
                u = x[n, c, h, w] * inv[n, h, w]
                gx[n, c, h, w] = (gy[n, c, h, w] * wt[c] - u * dot[n, h, w]) * inv[n, h, w]
    return gx


def _l2_gw(gy, x, inv, gw):
    N, C, H, W = x.shape
    for c in prange(C):
        acc = x.dtype.type(0)
        for n in range(N):
            for h in range(H):
                for w in range(W):
                    acc += gy[n, c, h, w] * x[n, c, h, w] * inv[n, h, w]
        gw[c] = acc
    return gw


_l2_inv = kernel(_l2_inv)
_l2_fwd = kernel(_l2_fwd)
_l2_gx = kernel(_l2_gx)
_l2_gw = kernel(_l2_gw)


def _inv_norm(x, eps):
    N, C, H, W = x.shape
    inv = np.empty((N, H, W), x.dtype)
    return _l2_inv(x.size, x, inv, x.dtype.type(eps))


def l2norm(x, weight, eps):
    """SSD's L2Norm: y[n, c] = x[n, c] / sqrt(sum_c x[n, c]^2 + eps) * weight[c]."""
    x = as_float(x)
    w = np.ascontiguousarray(weight, x.dtype)
    return _l2_fwd(x.size, x, w, _inv_norm(x, eps), np.empty_like(x))


def l2norm_backward(gy, x, weight, eps, need_gx=True):
    """(gx or None, gweight)."""
    gy, x = as_float(gy), as_float(x)
    w = np.ascontiguousarray(weight, x.dtype)
    inv = _inv_norm(x, eps)
    gx = _l2_gx(x.size, gy, x, w, inv, np.empty_like(x)) if need_gx else None
    return gx, _l2_gw(x.size, gy, x, inv, np.empty(x.shape[1], x.dtype))


# ---------------------------------------------------------------- select_class

def _select(x, labels, y, adjoint):
    """y[r] = x[r, labels[r]] ([R, K, M] -> [R, M]); label -1 (ignored) gives zeros.
    adjoint: x[r, k] = y[r] where k is the label, else 0 (x is the gradient)."""
    R, K, M = x.shape
    zero = x.dtype.type(0)
    for r in prange(R):
        lab = labels[r]
        if adjoint:
            for k in range(K):
                for m in range(M):
                    x[r, k, m] = y[r, m] if k == lab else zero
        else:
            for m in range(M):
                y[r, m] = x[r, lab, m] if lab >= 0 else zero
    return y


_select = kernel(_select)


def _labels(labels, K):
    labels = np.ascontiguousarray(labels, np.int64)
    bad = np.flatnonzero((labels < -1) | (labels >= K))
    if bad.size:
        raise IndexError(f"labels[{bad[0]}] = {labels[bad[0]]} is not a class in [0, {K}) (or -1, ignored)")
    return labels


def select_class(x, labels):
    """x [R, K, ...], labels i64 [R] -> [R, ...]: each row's slice of its class."""
    x = as_float(x)
    R, K = x.shape[:2]
    y = np.empty((R,) + x.shape[2:], x.dtype)
    _select(x.size, x.reshape(R, K, -1), _labels(labels, K), y.reshape(R, -1), False)
    return y


def select_class_backward(gy, labels, classes):
    """gx [R, classes, ...]: gy in each row's labelled class, zero elsewhere."""
    gy = as_float(gy)
    R = gy.shape[0]
    gx = np.empty((R, classes) + gy.shape[1:], gy.dtype)
    _select(gx.size, gx.reshape(R, classes, -1), _labels(labels, classes), gy.reshape(R, -1), True)
    return gx
