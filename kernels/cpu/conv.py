"""2-D convolution and transposed convolution via im2col + BLAS GEMM.

Threads split the batch (prange); each runs serial sgemm/dgemm through
np.dot on an im2col block of B images x R output rows: several images when
the spatial size is small (so GEMMs are wide enough), a band of rows when it
is large (so the block stays in L2).
"""
import numpy as np
from numba import prange

from . import as_float, kernel, njit, pair

# Each GEMM gets an im2col block of about this many bytes (half the 1 MiB L2)
# and between MIN_COLS and MAX_COLS columns; whole-image blocks across the
# 2 threads otherwise round-trip through L3 and made the parallel conv
# slower than the serial one.
BLOCK_BYTES, MIN_COLS, MAX_COLS = 512 << 10, 256, 1024


def out_size(n, k, s, p, d):
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


@njit
def _valid(off, s, n, on):
    """Range [lo, hi) of outputs o with 0 <= o*s + off < n."""
    lo = 0 if off >= 0 else (-off + s - 1) // s
    hi = 0 if n - 1 - off < 0 else (n - 1 - off) // s + 1
    lo = min(lo, on)
    hi = max(min(hi, on), lo)
    return lo, hi


@njit
def _run(dst, d, src, s, n, step, add):
    """dst[d + i] = src[s + i*step] + add for i < n, on flat arrays.
    Unsigned indices: Numba then emits no negative-index wraparound, which
    otherwise blocks vectorisation of these copies (measured 6x)."""
    u = np.uint64
    for i in range(n):
        dst[u(d + i)] = src[u(s + i * step)] + add


@njit
def _im2col(x, cols, n0, nb, c0, oh0, noh, KH, KW, OW, sh, sw, ph, pw, dh, dw, to_cols):
    """cols[(c*KH+ki)*KW+kj, (b*noh + oh-oh0)*OW + ow] <-> x[n0+b, c0+c, ih, iw]
    for output rows oh0 <= oh < oh0+noh.

    to_cols: gather x into cols (zero padding); else scatter-add cols into x
    (col2im, the adjoint), which is the conv backward-data.
    """
    C, H, W = x.shape[1], x.shape[2], x.shape[3]
    xf = x.reshape(-1)
    cf = cols.reshape(-1)
    CKK, ncol = cols.shape
    zero = cols.dtype.type(0)
    u = np.uint64
    for r in range(CKK):
        c = r // (KH * KW)
        ki = (r // KW) % KH
        kj = r % KW
        lo, hi = _valid(kj * dw - pw, sw, W, OW)
        for b in range(nb):
            plane = ((n0 + b) * C + c0 + c) * H * W
            for oh in range(oh0, oh0 + noh):
                ih = oh * sh - ph + ki * dh
                d = r * ncol + (b * noh + oh - oh0) * OW
                inside = 0 <= ih < H
                s = plane + ih * W + lo * sw - pw + kj * dw  # >= 0 whenever used
                if to_cols:
                    if not inside:
                        cf[d:d + OW] = zero
                        continue
                    for ow in range(lo):
                        cf[u(d + ow)] = zero
                    _run(cf, d + lo, xf, s, hi - lo, sw, zero)
                    for ow in range(hi, OW):
                        cf[u(d + ow)] = zero
                elif inside:
                    for i in range(hi - lo):
                        xf[u(s + i * sw)] += cf[u(d + lo + i)]


def _fwd(x, wg, b, y, KH, KW, OH, OW, sh, sw, ph, pw, dh, dw, B, R, T):
    """y[N, O, OH*OW] = conv(x) + b, with wg[G, O/G, C/G*KH*KW].
    Each GEMM covers B images x R output rows, sized so its im2col block stays in L2."""
    N, C = x.shape[0], x.shape[1]
    G, Og, CKK = wg.shape
    O = G * Og
    Cg = C // G
    OHW = OH * OW
    yf = y.reshape(-1)
    for t in prange(T):
        colbuf = np.empty(CKK * B * R * OW, x.dtype)
        outf = np.empty(Og * B * R * OW, x.dtype)
        n_lo, n_hi = t * N // T, (t + 1) * N // T
        for n0 in range(n_lo, n_hi, B):
            nb = min(B, n_hi - n0)
            for oh0 in range(0, OH, R):
                noh = min(R, OH - oh0)
                L = noh * OW
                cols = colbuf[:CKK * nb * L].reshape(CKK, nb * L)
                for g in range(G):
                    _im2col(x, cols, n0, nb, g * Cg, oh0, noh, KH, KW, OW, sh, sw, ph, pw, dh, dw, True)
                    np.dot(wg[g], cols, outf[:Og * nb * L].reshape(Og, nb * L))
                    for bi in range(nb):
                        for o in range(Og):
                            _run(yf, ((n0 + bi) * O + g * Og + o) * OHW + oh0 * OW, outf,
                                 (o * nb + bi) * L, L, 1, b[g * Og + o])
    return y


def _bwd(x, wg, gy, gx, gw, KH, KW, OH, OW, sh, sw, ph, pw, dh, dw, B, R, T, need_gx, need_gw):
    """gx[N, C, H, W] (pre-zeroed) and per-thread partial gw[T, G, O/G, CKK]."""
    N, C = gx.shape[0], gx.shape[1]
    G, Og, CKK = wg.shape
    O = G * Og
    Cg = C // G
    OHW = OH * OW
    gyf = gy.reshape(-1)
    zero = gy.dtype.type(0)
    for t in prange(T):
        colbuf = np.empty(CKK * B * R * OW, gy.dtype)
        gybf = np.empty(Og * B * R * OW, gy.dtype)
        gwt = np.empty((Og, CKK), gy.dtype)
        n_lo, n_hi = t * N // T, (t + 1) * N // T
        for n0 in range(n_lo, n_hi, B):
            nb = min(B, n_hi - n0)
            for oh0 in range(0, OH, R):
                noh = min(R, OH - oh0)
                L = noh * OW
                cols = colbuf[:CKK * nb * L].reshape(CKK, nb * L)
                gyb = gybf[:Og * nb * L].reshape(Og, nb * L)
                for g in range(G):
                    for bi in range(nb):
                        for o in range(Og):
                            _run(gybf, (o * nb + bi) * L, gyf, ((n0 + bi) * O + g * Og + o) * OHW + oh0 * OW,
                                 L, 1, zero)
                    if need_gw:
                        _im2col(x, cols, n0, nb, g * Cg, oh0, noh, KH, KW, OW, sh, sw, ph, pw, dh, dw, True)
                        np.dot(gyb, cols.T, gwt)
                        gw[t, g] += gwt
                    if need_gx:
                        np.dot(wg[g].T, gyb, cols)
                        _im2col(gx, cols, n0, nb, g * Cg, oh0, noh, KH, KW, OW, sh, sw, ph, pw, dh, dw, False)
    return gx


_fwd = kernel(_fwd)
_bwd = kernel(_bwd)


class _Geom:
    """Shapes and attributes of one conv, plus the batching decision."""

    def __init__(self, xshape, wshape, stride, pad, dilation, groups):
        self.N, self.C, self.H, self.W = xshape
        self.O, Cg, self.KH, self.KW = wshape
        self.G = int(groups)
        if self.C != Cg * self.G or self.O % self.G:
            raise ValueError(f"conv2d: x channels {self.C}, weight {wshape}, groups {groups}")
        self.s, self.p, self.d = pair(stride), pair(pad), pair(dilation)
        self.OH = out_size(self.H, self.KH, self.s[0], self.p[0], self.d[0])
        self.OW = out_size(self.W, self.KW, self.s[1], self.p[1], self.d[1])
        if self.OH <= 0 or self.OW <= 0:
            raise ValueError("conv2d: output would be empty")
        self.work = self.N * self.O * self.OH * self.OW * Cg * self.KH * self.KW

    def split(self, k):
        """(kernel, T, B, R): each GEMM covers B images x R output rows."""
        fn, T = k.pick(self.work)
        T = max(1, min(T, self.N))  # the batch is the only parallel axis
        ckk = self.C // self.G * self.KH * self.KW
        cols = min(MAX_COLS, max(MIN_COLS, BLOCK_BYTES // (4 * ckk)))  # float32 bytes
        ohw = self.OH * self.OW
        if ohw >= cols:
            return fn, T, 1, max(1, cols // self.OW)
        B = min(-(-cols // ohw), max(1, -(-self.N // T)))
        return fn, T, B, self.OH

    def args(self):
        return (self.KH, self.KW, self.OH, self.OW, *self.s, *self.p, *self.d)

    def wg(self, w):
        return np.ascontiguousarray(w).reshape(self.G, self.O // self.G, -1)


def conv2d(x, w, b=None, stride=1, pad=0, dilation=1, groups=1):
    """y[N, O, OH, OW] = cross-correlation of x[N, C, H, W] with w[O, C/groups, KH, KW] (+ b[O])."""
    x = as_float(x)
    w = np.ascontiguousarray(w, dtype=x.dtype)
    g = _Geom(x.shape, w.shape, stride, pad, dilation, groups)
    b = np.zeros(g.O, x.dtype) if b is None else np.ascontiguousarray(b, dtype=x.dtype)
    y = np.empty((g.N, g.O, g.OH * g.OW), x.dtype)
    fn, T, B, R = g.split(_fwd)
    fn(x, g.wg(w), b, y, *g.args(), B, R, T)
    return y.reshape(g.N, g.O, g.OH, g.OW)


def _backward(x, xshape, w, gy, g, need_gx, need_gw):
    gy = np.ascontiguousarray(gy, dtype=w.dtype).reshape(g.N, g.O, g.OH * g.OW)
    fn, T, B, R = g.split(_bwd)
    gx = np.zeros(xshape, w.dtype) if need_gx else np.zeros((g.N, g.C, 1, 1), w.dtype)
    gwp = np.zeros((T if need_gw else 1, g.G, g.O // g.G, w[0].size), w.dtype)
    fn(x, g.wg(w), gy, gx, gwp, *g.args(), B, R, T, need_gx, need_gw)
    gw = gwp.sum(axis=0).reshape(w.shape) if need_gw else None
    return (gx if need_gx else None), gw


def conv2d_backward(x, w, gy, stride=1, pad=0, dilation=1, groups=1, need_gx=True, need_gw=True):
    """(gx, gw, gb) for conv2d; gx / gw are None when not requested."""
    x = as_float(x)
    w = np.ascontiguousarray(w, dtype=x.dtype)
    g = _Geom(x.shape, w.shape, stride, pad, dilation, groups)
    gx, gw = _backward(x, x.shape, w, gy, g, need_gx, need_gw)
    return gx, gw, np.asarray(gy, dtype=x.dtype).sum(axis=(0, 2, 3))


def _transpose_geom(x, w, stride, pad, output_padding, dilation, groups):
    """The conv whose backward-data is this transposed conv: its input is our output."""
    N, Cin, H, W = x.shape
    G = int(groups)
    s, p, d, op = pair(stride), pair(pad), pair(dilation), pair(output_padding)
    OH = (H - 1) * s[0] - 2 * p[0] + d[0] * (w.shape[2] - 1) + op[0] + 1
    OW = (W - 1) * s[1] - 2 * p[1] + d[1] * (w.shape[3] - 1) + op[1] + 1
    yshape = (N, w.shape[1] * G, OH, OW)
    g = _Geom(yshape, w.shape, s, p, d, G)
    if (g.OH, g.OW) != (H, W) or op[0] >= max(s[0], d[0]) or op[1] >= max(s[1], d[1]):
        raise ValueError("conv_transpose2d: inconsistent output_padding/stride")
    return g, yshape


def conv_transpose2d(x, w, b=None, stride=1, pad=0, output_padding=0, dilation=1, groups=1):
    """torch.nn.functional.conv_transpose2d: x[N, Cin, H, W], w[Cin, Cout/groups, KH, KW]."""
    x = as_float(x)
    w = np.ascontiguousarray(w, dtype=x.dtype)
    g, yshape = _transpose_geom(x, w, stride, pad, output_padding, dilation, groups)
    y, _ = _backward(x[:0], yshape, w, x, g, True, False)
    if b is not None:
        y += np.asarray(b, dtype=x.dtype).reshape(1, -1, 1, 1)
    return y


def conv_transpose2d_backward(x, w, gy, stride=1, pad=0, output_padding=0, dilation=1,
                              groups=1, need_gx=True, need_gw=True):
    """(gx, gw, gb) for conv_transpose2d: gx is a plain conv of gy, gw a conv weight-grad."""
    x = as_float(x)
    w = np.ascontiguousarray(w, dtype=x.dtype)
    gy = np.ascontiguousarray(gy, dtype=x.dtype)
    g, _ = _transpose_geom(x, w, stride, pad, output_padding, dilation, groups)
    gx = conv2d(gy, w, None, g.s, g.p, g.d, g.G) if need_gx else None
    gw = _backward(gy, gy.shape, w, x, g, False, True)[1] if need_gw else None
    return gx, gw, gy.sum(axis=(0, 2, 3))
