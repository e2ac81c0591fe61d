"""Pooling, unpooling and upsampling on NCHW, one image plane per prange task.

Each backward is the adjoint of its forward: the same traversal run with
`adjoint=True` (gather <-> scatter-add), so the index arithmetic exists once.
"""
import numpy as np

from ..geometry import pool_geom as _geom, pool_out_size  # noqa: F401 (re-exported)
from . import U, as_float, kernel, njit, out_array, pair, prange


@njit
def _window(o, s, p, k, n):
    """Clipped input window [a, b) of output o, and its length within the padded input."""
    a = o * s - p
    b = min(a + k, n + p)
    padded = b - a
    return max(a, 0), min(b, n), padded


def _max_fwd(x, y, idx, kh, kw, sh, sw, ph, pw):
    P, H, W = x.shape
    OH, OW = y.shape[1], y.shape[2]
    xf, yf, idf = x.reshape(-1), y.reshape(-1), idx.reshape(-1)
    for q in prange(P):
        xq, yq = q * H * W, q * OH * OW
        for oh in range(OH):
            h0, h1, _ = _window(oh, sh, ph, kh, H)
            for ow in range(OW):
                w0, w1, _ = _window(ow, sw, pw, kw, W)
                best = -np.inf
                arg = h0 * W + w0
                for ih in range(h0, h1):
                    for iw in range(w0, w1):
                        v = xf[U(xq + ih * W + iw)]
                        if v > best or v != v:  # NaN wins, as in torch
                            best = v
                            arg = ih * W + iw
                yf[U(yq + oh * OW + ow)] = best
                idf[U(yq + oh * OW + ow)] = arg
    return y


def _switch(src, idx, dst, mode):
    """Route values through argmax switches, per plane.
    mode 0: dst[idx[i]] += src[i] (maxpool backward)
    mode 1: dst[idx[i]] = src[i]  (max_unpool forward)
    mode 2: dst[i] = src[idx[i]]  (max_unpool backward)"""
    P = idx.shape[0]
    for q in prange(P):
        for i in range(idx.shape[1]):
            j = idx[q, i]
            if mode == 0:
                dst[q, j] += src[q, i]
            elif mode == 1:
                dst[q, j] = src[q, i]
            else:
                dst[q, i] = src[q, j]
    return dst


def _avg(x, y, kh, kw, sh, sw, ph, pw, count_include_pad, adjoint):
    """y = avgpool(x); adjoint: x += avgpool^T(y) (x pre-zeroed)."""
    P, H, W = x.shape
    OH, OW = y.shape[1], y.shape[2]
    for q in prange(P):
        for oh in range(OH):
            h0, h1, hp = _window(oh, sh, ph, kh, H)
            for ow in range(OW):
                w0, w1, wp = _window(ow, sw, pw, kw, W)
                n = hp * wp if count_include_pad else (h1 - h0) * (w1 - w0)
                inv = x.dtype.type(1) / x.dtype.type(n)
                if adjoint:
                    g = y[q, oh, ow] * inv
                    for ih in range(h0, h1):
                        for iw in range(w0, w1):
                            x[q, ih, iw] += g
                else:
                    acc = x.dtype.type(0)
                    for ih in range(h0, h1):
                        for iw in range(w0, w1):
                            acc += x[q, ih, iw]
                    y[q, oh, ow] = acc * inv
    return x


def _nearest(x, y, sh, sw, adjoint):
    """y[oh, ow] = x[oh // sh, ow // sw]; adjoint sums y blocks into x (pre-zeroed)."""
    P, OH, OW = y.shape
    for q in prange(P):
        for oh in range(OH):
            for ow in range(OW):
                if adjoint:
                    x[q, oh // sh, ow // sw] += y[q, oh, ow]
                else:
                    y[q, oh, ow] = x[q, oh // sh, ow // sw]
    return x


def _bilinear(x, y, rh, rw, adjoint):
    """torch bilinear, align_corners=False; adjoint scatters y into x (pre-zeroed)."""
    P, H, W = x.shape
    OH, OW = y.shape[1], y.shape[2]
    half = x.dtype.type(0.5)
    one = x.dtype.type(1)
    zero = x.dtype.type(0)
    for q in prange(P):
        for oh in range(OH):
            sy = max(rh * (oh + half) - half, zero)
            h0 = int(sy)
            h1 = h0 + 1 if h0 < H - 1 else h0
            ly = sy - h0
            for ow in range(OW):
                sx = max(rw * (ow + half) - half, zero)
                w0 = int(sx)
                w1 = w0 + 1 if w0 < W - 1 else w0
                lx = sx - w0
                a, b, c, d = (one - ly) * (one - lx), (one - ly) * lx, ly * (one - lx), ly * lx
                if adjoint:
                    g = y[q, oh, ow]
                    x[q, h0, w0] += a * g
                    x[q, h0, w1] += b * g
                    x[q, h1, w0] += c * g
                    x[q, h1, w1] += d * g
                else:
                    y[q, oh, ow] = (a * x[q, h0, w0] + b * x[q, h0, w1]
                                    + c * x[q, h1, w0] + d * x[q, h1, w1])
    return x


_max_fwd = kernel(_max_fwd)
_switch = kernel(_switch)
_avg = kernel(_avg)
_nearest = kernel(_nearest)
_bilinear = kernel(_bilinear)


def _planes(a):
    a = as_float(a)
    return a, a.reshape(-1, a.shape[-2], a.shape[-1])


def maxpool2d(x, kernel_size, stride=None, pad=0, ceil_mode=False, out=None):
    """(y, switches): switches are int32 flat indices ih*W+iw within each input plane
    (half of int64's memory: the stem's switches are saved through the whole step).
    out: an array of y's shape to write y into."""
    x, x3 = _planes(x)
    k, s, p, OH, OW = _geom(x.shape, kernel_size, stride, pad, ceil_mode)
    y = out_array(out, x.shape[:2] + (OH, OW), x.dtype)
    idx = np.empty(y.shape, np.int32)
    _max_fwd(x.size, x3, y.reshape(-1, OH, OW), idx.reshape(-1, OH, OW), *k, *s, *p)
    return y, idx


def maxpool2d_backward(gy, switches, xshape, out=None):
    gy = as_float(gy)
    gx = out_array(out, xshape, gy.dtype, zero=True)
    P = xshape[0] * xshape[1]
    _switch(gy.size, gy.reshape(P, -1), switches.reshape(P, -1), gx.reshape(P, -1), 0)
    return gx


def max_unpool2d(x, switches, kernel_size, stride=None, pad=0, output_size=None):
    """torch max_unpool2d: x[N, C, H, W] placed at `switches` in a zero [.., OH, OW] plane."""
    x = as_float(x)
    k, s, p = pair(kernel_size), pair(stride if stride is not None else kernel_size), pair(pad)
    if output_size is None:
        output_size = tuple((n - 1) * s_ - 2 * p_ + k_ for n, s_, p_, k_ in zip(x.shape[2:], s, p, k))
    OH, OW = output_size[-2:]
    y = np.zeros(x.shape[:2] + (OH, OW), x.dtype)
    P = x.shape[0] * x.shape[1]
    idx = np.ascontiguousarray(switches).reshape(P, -1)
    if idx.size and (idx.min() < 0 or idx.max() >= OH * OW):
        raise ValueError("max_unpool2d: switch index outside the output plane")
    _switch(y.size, x.reshape(P, -1), idx, y.reshape(P, -1), 1)
    return y


def max_unpool2d_backward(gy, switches):
    gy = as_float(gy)
    P = gy.shape[0] * gy.shape[1]
    gx = np.empty(switches.shape, gy.dtype)
    _switch(gx.size, gy.reshape(P, -1), np.ascontiguousarray(switches).reshape(P, -1),
            gx.reshape(P, -1), 2)
    return gx


def avgpool2d(x, kernel_size, stride=None, pad=0, ceil_mode=False, count_include_pad=True):
    x, x3 = _planes(x)
    k, s, p, OH, OW = _geom(x.shape, kernel_size, stride, pad, ceil_mode)
    y = np.empty(x.shape[:2] + (OH, OW), x.dtype)
    _avg(x.size, x3, y.reshape(-1, OH, OW), *k, *s, *p, count_include_pad, False)
    return y


def avgpool2d_backward(gy, xshape, kernel_size, stride=None, pad=0, ceil_mode=False,
                       count_include_pad=True):
    gy, gy3 = _planes(gy)
    k, s, p, OH, OW = _geom(xshape, kernel_size, stride, pad, ceil_mode)
    gx = np.zeros(xshape, gy.dtype)
    _avg(gx.size, gx.reshape(-1, xshape[2], xshape[3]), gy3, *k, *s, *p, count_include_pad, True)
    return gx


def global_avgpool2d(x):
    """[N, C, H, W] -> [N, C, 1, 1] mean over the plane."""
    x = as_float(x)
    return avgpool2d(x, x.shape[2:], 1, 0)


def global_avgpool2d_backward(gy, xshape):
    return avgpool2d_backward(gy, xshape, xshape[2:], 1, 0)


def upsample_nearest2d(x, scale):
    """Nearest upsampling by integer factors scale=(sh, sw) (or one int)."""
    x, x3 = _planes(x)
    sh, sw = pair(scale)
    y = np.empty(x.shape[:2] + (x.shape[2] * sh, x.shape[3] * sw), x.dtype)
    _nearest(y.size, x3, y.reshape(-1, y.shape[2], y.shape[3]), sh, sw, False)
    return y


def upsample_nearest2d_backward(gy, scale):
    gy, gy3 = _planes(gy)
    sh, sw = pair(scale)
    gx = np.zeros(gy.shape[:2] + (gy.shape[2] // sh, gy.shape[3] // sw), gy.dtype)
    _nearest(gy.size, gx.reshape(-1, gx.shape[2], gx.shape[3]), gy3, sh, sw, True)
    return gx


def _ratios(in_hw, out_hw, scale_factor, dtype):
    # torch uses 1/scale_factor when a factor is given, else in/out.
    if scale_factor is not None:
        f = scale_factor if isinstance(scale_factor, (tuple, list)) else (scale_factor,) * 2
        return dtype.type(1.0 / f[0]), dtype.type(1.0 / f[1])
    return dtype.type(in_hw[0] / out_hw[0]), dtype.type(in_hw[1] / out_hw[1])


def upsample_bilinear2d(x, size=None, scale_factor=None):
    """F.interpolate(mode='bilinear', align_corners=False) with `size` or `scale_factor`."""
    x, x3 = _planes(x)
    if size is None:
        sf = scale_factor if isinstance(scale_factor, (tuple, list)) else (scale_factor,) * 2
        size = (int(x.shape[2] * sf[0]), int(x.shape[3] * sf[1]))
    rh, rw = _ratios(x.shape[2:], size, scale_factor, x.dtype)
    y = np.empty(x.shape[:2] + tuple(size), x.dtype)
    _bilinear(y.size, x3, y.reshape(-1, size[0], size[1]), rh, rw, False)
    return y


def upsample_bilinear2d_backward(gy, xshape, scale_factor=None):
    gy, gy3 = _planes(gy)
    rh, rw = _ratios(xshape[2:], gy.shape[2:], scale_factor, gy.dtype)
    gx = np.zeros(xshape, gy.dtype)
    _bilinear(gy.size, gx.reshape(-1, xshape[2], xshape[3]), gy3, rh, rw, True)
    return gx
