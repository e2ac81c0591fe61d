"""Tiled shared-memory GEMM, and convolution / linear layers built on it.

One GEMM kernel serves every product: each operand is addressed through strides,
so transposes, channel groups and batches are offsets, not copies. Its K index may
be split in two (k = outer * kdiv + inner, each with its own stride): that lets the
weight gradient sum over images and pixels in one product, reading gy[N, O, HW]
and the im2col columns where they lie.

Convolution is im2col + GEMM (1x1 stride-1 convolutions use x itself as the
columns): forward y[n, g] = W[g] @ cols[n, g]; data gradient
cols = W[g]^T @ gy[n, g] then col2im, a gather (no atomics); weight gradient
gW[g] = gy[:, g] @ cols[:, g]^T, split over K across blocks when M x N is too
small to fill the device (partial products meet by atomic add).

Tiles: a block of 16 x 16 threads computes a 64 x 64 tile of C, each thread a
4 x 4 register tile (rows ty + 16r, columns tx + 16c, so stores coalesce and
shared-memory reads do not conflict), stepping through K 16 at a time.
"""
from __future__ import annotations

import math

import numpy as np
from numba import cuda

from . import TPB, device, empty, flat, kernel, launch, pair, zeros

BM = BN = 64
BK = 16
TX = TY = 16
RM = BM // TY   # 4 rows of C per thread
RN = BN // TX   # 4 columns of C per thread
COLS_BYTES = 256 << 20   # im2col buffer per call; more images are done in chunks


@device
def _k_addr(k, K, kdiv, ks, kbs):
    if kdiv >= K:
        return k * ks
    return (k // kdiv) * kbs + (k % kdiv) * ks


@kernel("aiiiiiii" "aiiiiiii" "aiiiii" "iiiii" "aiii")
def _gemm(A, a_off, a_rs, a_ks, a_kdiv, a_kbs, a_z1, a_z2,
          B, b_off, b_ks, b_cs, b_kdiv, b_kbs, b_z1, b_z2,
          C, c_off, c_rs, c_cs, c_z1, c_z2,
          M, N, K, Z2, S, bias, bias_mode, bias_z2, mode):
    """C[z] (=, += or atomically +=) A[z] @ B[z] (+ bias).

    blockIdx.z = (z1 * Z2 + z2) * S + s: z1 a batch, z2 a channel group, s a slice
    of K (S > 1 only with mode 2). Element (i, k) of A is at
    a_off + z1*a_z1 + z2*a_z2 + i*a_rs + (k // a_kdiv)*a_kbs + (k % a_kdiv)*a_ks; B and C alike.
    mode 0: C = AB (+bias); 1: C += AB; 2: atomic C += AB.
    bias_mode 0: none, 1: bias[z2 * bias_z2 + i] (per row), 2: bias[j] (per column).
    """
    T = A.dtype.type
    As = cuda.shared.array((BK, BM), A.dtype)
    Bs = cuda.shared.array((BK, BN), A.dtype)
    acc = cuda.local.array((RM, RN), A.dtype)
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    tid = ty * TX + tx
    i0 = cuda.blockIdx.y * BM
    j0 = cuda.blockIdx.x * BN
    z = cuda.blockIdx.z
    zs = z % S
    z1 = z // S // Z2
    z2 = z // S % Z2
    kc = ((K + S - 1) // S + BK - 1) // BK * BK     # K per slice, whole tiles
    k_lo = zs * kc
    k_hi = min(K, k_lo + kc)
    ao = a_off + z1 * a_z1 + z2 * a_z2
    bo = b_off + z1 * b_z1 + z2 * b_z2
    co = c_off + z1 * c_z1 + z2 * c_z2
    for r in range(RM):
        for c in range(RN):
            acc[r, c] = T(0)
    for k0 in range(k_lo, k_hi, BK):
        for l in range(BM * BK // (TX * TY)):      # A tile, k fastest
            e = tid + l * TX * TY
            k = k0 + e % BK
            i = i0 + e // BK
            v = T(0)
            if i < M and k < k_hi:
                v = A[ao + i * a_rs + _k_addr(k, K, a_kdiv, a_ks, a_kbs)]
            As[e % BK, e // BK] = v
        for l in range(BN * BK // (TX * TY)):      # B tile, columns fastest
            e = tid + l * TX * TY
            k = k0 + e // BN
            j = j0 + e % BN
            v = T(0)
            if j < N and k < k_hi:
                v = B[bo + _k_addr(k, K, b_kdiv, b_ks, b_kbs) + j * b_cs]
            Bs[e // BN, e % BN] = v
        cuda.syncthreads()
        for kk in range(BK):
            for r in range(RM):
                a = As[kk, ty + TY * r]
                for c in range(RN):
                    acc[r, c] += a * Bs[kk, tx + TX * c]
        cuda.syncthreads()
    for r in range(RM):
        i = i0 + ty + TY * r
        for c in range(RN):
            j = j0 + tx + TX * c
            if i < M and j < N:
                v = acc[r, c]
                if zs == 0:
                    if bias_mode == 1:
                        v += bias[z2 * bias_z2 + i]
                    elif bias_mode == 2:
                        v += bias[j]
                p = co + i * c_rs + j * c_cs
                if mode == 0:
                    C[p] = v
                elif mode == 1:
                    C[p] += v
                else:
                    cuda.atomic.add(C, p, v)


# Below this many output tiles a product splits K across blocks (about two waves
# on a 132-SM H100), each slice keeping at least MIN_SLICE of K.
FILL_BLOCKS, MIN_SLICE = 264, 512


class Operand:
    """A matrix inside a flat array: element (i, k) at off + i*rs + (k//kdiv)*kbs + (k%kdiv)*ks,
    plus z1 * z1s + z2 * z2s for batch z1 and group z2. kdiv=0 means K is not split."""

    def __init__(self, arr, rs, ks, off=0, kdiv=0, kbs=0, z1=0, z2=0):
        self.arr, self.rs, self.ks, self.off, self.kdiv, self.kbs, self.z1, self.z2 = \
            flat(arr), rs, ks, off, kdiv, kbs, z1, z2

    def args(self, K):
        return (self.arr, self.off, self.rs, self.ks, self.kdiv or K, self.kbs, self.z1, self.z2)


def gemm(a: Operand, b: Operand, c: Operand, M, N, K, Z1=1, Z2=1, bias=None, bias_mode=0, bias_z2=0,
         accumulate=False):
    """c = a @ b (+ bias), or c += a @ b; batched over Z1 x Z2. For b, `rs` is the
    column stride and `ks` the K stride. Slicing K across blocks needs c zeroed
    first when not accumulating; that is done here (c must then be its whole array)."""
    tiles = math.ceil(M / BM) * math.ceil(N / BN) * Z1 * Z2
    S = max(1, min(math.ceil(FILL_BLOCKS / tiles), K // MIN_SLICE))
    mode = 1 if accumulate else 0
    if S > 1:
        if not accumulate:
            launch(_zero, c.arr.size, c.arr)
        mode = 2
    if bias is None:
        bias, bias_mode = c.arr[:1], 0
    aa = a.args(K)
    bb = (b.arr, b.off, b.ks, b.rs, b.kdiv or K, b.kbs, b.z1, b.z2)
    grid = (math.ceil(N / BN), math.ceil(M / BM), Z1 * Z2 * S)
    _gemm[grid, (TX, TY)](*aa, *bb, c.arr, c.off, c.rs, c.ks, c.z1, c.z2,
                          M, N, K, Z2, S, flat(bias), bias_mode, bias_z2, mode)


@kernel("a")
def _zero(y):
    T = y.dtype.type
    for i in range(cuda.grid(1), y.size, cuda.gridsize(1)):
        y[i] = T(0)


# ---------------------------------------------------------------- im2col / col2im

@kernel("aaiiiiiiiiiiiiiii")
def _im2col(x, cols, n0, nb, C, H, W, KH, KW, OH, OW, sh, sw, ph, pw, dh, dw):
    """cols[b, (c*KH + ki)*KW + kj, oh*OW + ow] = x[n0 + b, c, ih, iw] (0 outside)."""
    T = x.dtype.type
    L = OH * OW
    R = C * KH * KW
    for e in range(cuda.grid(1), nb * R * L, cuda.gridsize(1)):
        p = e % L
        r = (e // L) % R
        b = e // (L * R)
        c = r // (KH * KW)
        ki = (r // KW) % KH
        kj = r % KW
        ih = (p // OW) * sh - ph + ki * dh
        iw = (p % OW) * sw - pw + kj * dw
        v = T(0)
        if 0 <= ih < H and 0 <= iw < W:
            v = x[(((n0 + b) * C + c) * H + ih) * W + iw]
        cols[e] = v


@kernel("aaiiiiiiiiiiiiiii")
def _col2im(cols, gx, n0, nb, C, H, W, KH, KW, OH, OW, sh, sw, ph, pw, dh, dw):
    """The adjoint of _im2col as a gather: each gx element sums the columns it fed."""
    T = gx.dtype.type
    L = OH * OW
    R = C * KH * KW
    for e in range(cuda.grid(1), nb * C * H * W, cuda.gridsize(1)):
        iw = e % W
        ih = (e // W) % H
        c = (e // (W * H)) % C
        b = e // (W * H * C)
        acc = T(0)
        for ki in range(KH):
            th = ih + ph - ki * dh
            if th < 0 or th % sh != 0 or th // sh >= OH:
                continue
            oh = th // sh
            for kj in range(KW):
                tw = iw + pw - kj * dw
                if tw < 0 or tw % sw != 0 or tw // sw >= OW:
                    continue
                acc += cols[(b * R + (c * KH + ki) * KW + kj) * L + oh * OW + tw // sw]
        gx[(n0 * C) * H * W + e] = acc


# ---------------------------------------------------------------- convolution

from ..geometry import ConvShape, out_size, transpose_conv_shape  # noqa: E402,F401 (out_size re-exported)


class Geom(ConvShape):
    """One convolution: shapes, attributes, and how many images share an im2col buffer."""

    def __init__(self, xshape, wshape, stride, pad, dilation, groups, itemsize):
        super().__init__(xshape, wshape, stride, pad, dilation, groups)
        Cg = self.C // self.G
        self.L = self.OH * self.OW
        self.Og, self.Cg = self.O // self.G, Cg
        self.CKK = Cg * self.KH * self.KW      # K of the forward product, per group
        self.direct = (self.KH, self.KW) == (1, 1) and self.s == (1, 1) and self.p == (0, 0)
        self.nb = max(1, min(self.N, COLS_BYTES // max(1, self.C * self.KH * self.KW * self.L * itemsize)))

    @property
    def yshape(self):
        return (self.N, self.O, self.OH, self.OW)

    def geo(self):
        return (self.C, self.H, self.W, self.KH, self.KW, self.OH, self.OW, *self.s, *self.p, *self.d)

    def chunks(self):
        for n0 in range(0, self.N, self.nb):
            yield n0, min(self.nb, self.N - n0)

    def columns(self, x, n0, nb, buf):
        """The im2col matrix of images n0..n0+nb as (array, offset): x itself when 1x1."""
        if self.direct:
            return flat(x), n0 * self.C * self.L
        launch(_im2col, nb * self.C * self.KH * self.KW * self.L, flat(x), buf, n0, nb, *self.geo())
        return buf, 0

    def buffer(self, dtype):
        return None if self.direct else empty(self.nb * self.C * self.KH * self.KW * self.L, dtype)


def _forward(x, w, b, g: Geom, y):
    """y[n, g] = W[g] @ cols[n, g] (+ b)."""
    buf = g.buffer(x.dtype)
    RK = g.CKK * g.L    # one group's block of columns
    for n0, nb in g.chunks():
        cols, off = g.columns(x, n0, nb, buf)
        gemm(Operand(w, g.CKK, 1, z2=g.Og * g.CKK),
             Operand(cols, 1, g.L, off=off, z1=g.G * RK, z2=RK),
             Operand(y, g.L, 1, off=n0 * g.O * g.L, z1=g.O * g.L, z2=g.Og * g.L),
             g.Og, g.L, g.CKK, nb, g.G, bias=b, bias_mode=0 if b is None else 1, bias_z2=g.Og)
    return y


def _backward_data(gy, w, g: Geom, gx):
    """cols[n, g] = W[g]^T @ gy[n, g], then col2im into gx (written, not accumulated)."""
    buf = empty(g.nb * g.C * g.KH * g.KW * g.L, gy.dtype) if not g.direct else None
    RK = g.CKK * g.L
    for n0, nb in g.chunks():
        if g.direct:
            out, off = flat(gx), n0 * g.C * g.L
        else:
            out, off = buf, 0
        gemm(Operand(w, 1, g.CKK, z2=g.Og * g.CKK),
             Operand(gy, 1, g.L, off=n0 * g.O * g.L, z1=g.O * g.L, z2=g.Og * g.L),
             Operand(out, g.L, 1, off=off, z1=g.G * RK, z2=RK),
             g.CKK, g.L, g.Og, nb, g.G)
        if not g.direct:
            launch(_col2im, nb * g.C * g.H * g.W, buf, flat(gx), n0, nb, *g.geo())
    return gx


def _backward_weight(x, gy, g: Geom, gw):
    """gW[g] = sum over images and pixels of gy[n, g] cols[n, g]^T: K = (image, pixel)."""
    buf = g.buffer(x.dtype)
    RK = g.CKK * g.L
    for i, (n0, nb) in enumerate(g.chunks()):
        cols, off = g.columns(x, n0, nb, buf)
        gemm(Operand(gy, g.L, 1, off=n0 * g.O * g.L, kdiv=g.L, kbs=g.O * g.L, z2=g.Og * g.L),
             Operand(cols, g.L, 1, off=off, kdiv=g.L, kbs=g.G * RK, z2=RK),
             Operand(gw, g.CKK, 1, z2=g.Og * g.CKK),
             g.Og, g.CKK, nb * g.L, 1, g.G, accumulate=i > 0)
    return gw


def _dtype_of(x):
    return np.dtype(x.dtype)


def conv2d(x, w, b=None, stride=1, pad=0, dilation=1, groups=1):
    """y[N, O, OH, OW] = cross-correlation of x[N, C, H, W] with w[O, C/groups, KH, KW] (+ b[O])."""
    g = Geom(x.shape, w.shape, stride, pad, dilation, groups, _dtype_of(x).itemsize)
    return _forward(x, w, b, g, empty(g.yshape, x.dtype))


def conv2d_backward(x, w, gy, stride=1, pad=0, dilation=1, groups=1, need_gx=True, need_gw=True, need_gb=True):
    """(gx, gw, gb) for conv2d; each is None when not requested."""
    from .tensor import channel_sum
    g = Geom(x.shape, w.shape, stride, pad, dilation, groups, _dtype_of(x).itemsize)
    gx = _backward_data(gy, w, g, empty(x.shape, x.dtype)) if need_gx else None
    gw = _backward_weight(x, gy, g, empty(w.shape, w.dtype)) if need_gw else None
    return gx, gw, channel_sum(gy) if need_gb else None


def _transpose_geom(x, w, stride, pad, output_padding, dilation, groups):
    """The conv whose backward-data is this transposed conv: its input is our output."""
    yshape = transpose_conv_shape(x.shape, w.shape, stride, pad, output_padding, dilation, groups)
    g = Geom(yshape, w.shape, stride, pad, dilation, groups, _dtype_of(x).itemsize)
    if (g.OH, g.OW) != tuple(x.shape[2:]):
        raise ValueError("conv_transpose2d: inconsistent output_padding/stride")
    return g


def conv_transpose2d(x, w, b=None, stride=1, pad=0, output_padding=0, dilation=1, groups=1):
    """torch.nn.functional.conv_transpose2d: x[N, Cin, H, W], w[Cin, Cout/groups, KH, KW]."""
    g = _transpose_geom(x, w, stride, pad, output_padding, dilation, groups)
    y = _backward_data(x, w, g, empty((g.N, g.C, g.H, g.W), x.dtype))
    if b is not None:
        launch(_add_channel, y.size, flat(y), flat(b), g.C, g.H * g.W)
    return y


def conv_transpose2d_backward(x, w, gy, stride=1, pad=0, output_padding=0, dilation=1,
                              groups=1, need_gx=True, need_gw=True, need_gb=True):
    """(gx, gw, gb) for conv_transpose2d: gx is a plain conv of gy, gw a conv weight-grad."""
    from .tensor import channel_sum
    g = _transpose_geom(x, w, stride, pad, output_padding, dilation, groups)
    gx = _forward(gy, w, None, g, empty(x.shape, x.dtype)) if need_gx else None
    gw = _backward_weight(gy, x, g, empty(w.shape, w.dtype)) if need_gw else None
    return gx, gw, channel_sum(gy) if need_gb else None


@kernel("aaii")
def _add_channel(y, b, C, L):
    for i in range(cuda.grid(1), y.size, cuda.gridsize(1)):
        y[i] += b[(i // L) % C]


# ---------------------------------------------------------------- linear

def linear(x, w, b=None):
    """y[N, M] = x[N, K] @ w[M, K].T + b[M]."""
    N, K = x.shape
    M = w.shape[0]
    y = empty((N, M), x.dtype)
    gemm(Operand(x, K, 1), Operand(w, K, 1), Operand(y, M, 1), N, M, K,
         bias=b, bias_mode=0 if b is None else 2)
    return y


def linear_backward(x, w, gy, need_gx=True):
    """(gx[N, K], gw[M, K], gb[M]); gx is None when not requested."""
    from .tensor import reduce_axis
    N, K = x.shape
    M = w.shape[0]
    gx = None
    if need_gx:
        gx = empty((N, K), x.dtype)
        gemm(Operand(gy, M, 1), Operand(w, 1, K), Operand(gx, K, 1), N, K, M)
    gw = empty((M, K), x.dtype)
    gemm(Operand(gy, 1, M), Operand(x, 1, K), Operand(gw, K, 1), M, K, N)
    return gx, gw, reduce_axis(gy, 0)
