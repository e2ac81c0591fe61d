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

Tiles: a block of 16 x 16 threads computes a BM x BN tile of C (128 or 64 each:
one kernel per shape, the host picks by M, N and how many blocks it gets), each
thread an RM x RN register tile (8 or 4 each) made of 4 x 4 pieces 64 apart: rows
64a + 4ty + (0..3), columns 64b + 4tx + (0..3), so each piece's operands are one
16-byte shared load. K goes 8 at a time through two shared buffers: the next tile
is read from global memory into registers while the current one is multiplied,
so one barrier per tile suffices. No 64-bit division in the loop: each thread
loads one k row of the tile and keeps that k's offset as a running sum.
"""
from __future__ import annotations

import math
import os

import numpy as np
from numba import cuda

from . import TPB, device, empty, flat, kernel, launch, pair, zeros

BK = 8                 # K per tile
TX = TY = 16           # threads per block
LW = 32                # a thread loads elements m, m + LW, ... of its tile row (TX * TY = BK * LW)
PAD = 4                # shared rows padded by 4 floats: conflict-free tile stores, rows stay 16-byte aligned
# Shared tiles are 16-byte aligned for _ld4's vector loads (the simulator takes no alignment).
SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
ALIGN = None if SIM else 16
COLS_BYTES = 256 << 20   # im2col buffer per call; more images are done in chunks


if SIM:
    def _ld4(a, i):
        return a[i], a[i + 1], a[i + 2], a[i + 3]
else:
    from llvmlite import ir
    from numba import types
    from numba.cuda.extending import intrinsic

    @intrinsic
    def _ld4(typingctx, a, i):
        """a[i:i+4] as one vector load (ld.shared.v4.f32 from a shared array); i*itemsize
        must be a multiple of 16. LLVM's vectoriser fused only some of these loads."""
        sig = types.UniTuple(a.dtype, 4)(a, i)

        def codegen(context, builder, sig, args):
            arr = context.make_array(sig.args[0])(context, builder, args[0])
            vec = ir.VectorType(context.get_value_type(sig.args[0].dtype), 4)
            ptr = builder.bitcast(builder.gep(arr.data, [args[1]]), vec.as_pointer())
            v = builder.load(ptr, align=16)
            return context.make_tuple(builder, sig.return_type,
                                      [builder.extract_element(v, ir.Constant(ir.IntType(32), e)) for e in range(4)])
        return sig, codegen


def _make_gemm(BM, BN, name):
    """The GEMM kernel for one block tile, BM x BN (64 or 128 each)."""
    RM, RN = BM // TY, BN // TX     # C elements per thread, rows x columns (4 or 8)
    LA, LB = BM // LW, BN // LW     # elements of the A and B tiles each thread loads per K tile
    WA, WB = BM + PAD, BN + PAD     # shared row lengths
    SA, SB = 2 * BK * WA, 2 * BK * WB

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
        As = cuda.shared.array(SA, A.dtype, ALIGN)  # [2, BK, WA]: two buffers
        Bs = cuda.shared.array(SB, A.dtype, ALIGN)
        acc = cuda.local.array((RM, RN), A.dtype)   # all local arrays are unrolled into registers
        af = cuda.local.array(RM, A.dtype)
        bf = cuda.local.array(RN, A.dtype)
        ra = cuda.local.array(LA, A.dtype)          # the next tile, loaded while this one is used
        rb = cuda.local.array(LB, A.dtype)
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

        # Tile loads: a thread loads row ta (a k) of the A tile, elements ma + LW*l. The
        # threads of a warp run along k where k is contiguous in memory, else along m, so
        # global reads coalesce either way.
        if a_ks == 1 and a_rs != 1:
            ta, ma = tid % BK, tid // BK
        else:
            ta, ma = tid // LW, tid % LW
        if b_ks == 1 and b_cs != 1:
            tb, mb = tid % BK, tid // BK
        else:
            tb, mb = tid // LW, tid % LW
        # The thread's k advances by BK per tile. Its offset along K, split as
        # (k // kdiv, k % kdiv), is a running sum with k % kdiv beside it: one division
        # here, then per tile an add and a wrap (a loop: kdiv may be below BK).
        ka = k_lo + ta
        kb = k_lo + tb
        qa = ka // a_kdiv
        qb = kb // b_kdiv
        ua = ka - qa * a_kdiv
        ub = kb - qb * b_kdiv
        ma += i0
        mb += j0
        pa = a_off + z1 * a_z1 + z2 * a_z2 + ma * a_rs + qa * a_kbs + ua * a_ks
        pb = b_off + z1 * b_z1 + z2 * b_z2 + mb * b_cs + qb * b_kbs + ub * b_ks
        wa = a_kbs - a_kdiv * a_ks      # offset change when k % kdiv wraps to 0
        wb = b_kbs - b_kdiv * b_ks
        sa = LW * a_rs                  # offset between a thread's elements
        sb = LW * b_cs

        for r in range(RM):
            for c in range(RN):
                acc[r, c] = T(0)
        for l in range(LA):
            ra[l] = A[pa + l * sa] if ka < k_hi and ma + l * LW < M else T(0)
        for l in range(LB):
            rb[l] = B[pb + l * sb] if kb < k_hi and mb + l * LW < N else T(0)

        for t in range((k_hi - k_lo + BK - 1) // BK):
            p = t % 2
            for l in range(LA):
                As[(p * BK + ta) * WA + ma - i0 + l * LW] = ra[l]
            for l in range(LB):
                Bs[(p * BK + tb) * WB + mb - j0 + l * LW] = rb[l]
            # Buffer p is complete; buffer 1 - p was last read before this barrier too.
            cuda.syncthreads()
            # Start the next tile's global loads; they land while this tile is multiplied.
            ka += BK
            kb += BK
            ua += BK
            ub += BK
            pa += BK * a_ks
            pb += BK * b_ks
            while ua >= a_kdiv:
                ua -= a_kdiv
                pa += wa
            while ub >= b_kdiv:
                ub -= b_kdiv
                pb += wb
            for l in range(LA):
                ra[l] = A[pa + l * sa] if ka < k_hi and ma + l * LW < M else T(0)
            for l in range(LB):
                rb[l] = B[pb + l * sb] if kb < k_hi and mb + l * LW < N else T(0)
            for kk in range(BK):
                for g in range(RM // 4):
                    af[4 * g], af[4 * g + 1], af[4 * g + 2], af[4 * g + 3] = \
                        _ld4(As, (p * BK + kk) * WA + g * 64 + ty * 4)
                for g in range(RN // 4):
                    bf[4 * g], bf[4 * g + 1], bf[4 * g + 2], bf[4 * g + 3] = \
                        _ld4(Bs, (p * BK + kk) * WB + g * 64 + tx * 4)
                for r in range(RM):
                    for c in range(RN):
                        acc[r, c] += af[r] * bf[c]

        # Epilogue. Every loop has constant trips and a small body, so all unroll and acc
        # stays in registers (one nest holding all three modes was left rolled, acc on the stack).
        if zs == 0 and bias_mode != 0:
            for r in range(RM):
                i = min(i0 + r // 4 * 64 + ty * 4 + r % 4, M - 1)
                for c in range(RN):
                    j = min(j0 + c // 4 * 64 + tx * 4 + c % 4, N - 1)
                    acc[r, c] += bias[z2 * bias_z2 + i] if bias_mode == 1 else bias[j]
        co = c_off + z1 * c_z1 + z2 * c_z2
        if mode == 0:
            for r in range(RM):
                i = i0 + r // 4 * 64 + ty * 4 + r % 4
                for c in range(RN):
                    j = j0 + c // 4 * 64 + tx * 4 + c % 4
                    if i < M and j < N:
                        C[co + i * c_rs + j * c_cs] = acc[r, c]
        elif mode == 1:
            for r in range(RM):
                i = i0 + r // 4 * 64 + ty * 4 + r % 4
                for c in range(RN):
                    j = j0 + c // 4 * 64 + tx * 4 + c % 4
                    if i < M and j < N:
                        C[co + i * c_rs + j * c_cs] += acc[r, c]
        else:
            for r in range(RM):
                i = i0 + r // 4 * 64 + ty * 4 + r % 4
                for c in range(RN):
                    j = j0 + c // 4 * 64 + tx * 4 + c % 4
                    if i < M and j < N:
                        cuda.atomic.add(C, co + i * c_rs + j * c_cs, acc[r, c])

    _gemm.__name__ = _gemm.__qualname__ = name
    return kernel("aiiiiiii" "aiiiiiii" "aiiiii" "iiiii" "aiii")(_gemm)


# One kernel per block tile; "_gemm" is the large one (the PTX test's float64 control).
GEMMS = {(bm, bn): _make_gemm(bm, bn, "_gemm" if (bm, bn) == (128, 128) else f"_gemm_{bm}x{bn}")
         for bm in (128, 64) for bn in (128, 64)}
_gemm = GEMMS[128, 128]

# Below this many blocks a product splits K across blocks (about two waves of
# 128 x 128 tiles on a 132-SM H100), each slice keeping at least MIN_SLICE of K.
FILL_BLOCKS, MIN_SLICE = 264, 512


def _plan(M, N, K, Z):
    """(BM, BN, S): the block tile and the number of K slices for a product.

    Tiles are 128 on a side where M or N exceeds 64, else 64 (fewer idle threads);
    if even with K split that leaves under half of FILL_BLOCKS blocks, 64 x 64
    tiles make four times as many."""
    def split(bm, bn):
        tiles = math.ceil(M / bm) * math.ceil(N / bn) * Z
        return tiles, max(1, min(math.ceil(FILL_BLOCKS / tiles), K // MIN_SLICE))
    bm, bn = (128 if M > 64 else 64), (128 if N > 64 else 64)
    tiles, S = split(bm, bn)
    if tiles * S < FILL_BLOCKS // 2:
        bm, bn = 64, 64
        tiles, S = split(bm, bn)
    return bm, bn, S


class Operand:
    """A matrix inside a flat array: element (i, k) at off + i*rs + (k//kdiv)*kbs + (k%kdiv)*ks,
    plus z1 * z1s + z2 * z2s for batch z1 and group z2. kdiv=0 means K is not split."""

    def __init__(self, arr, rs, ks, off=0, kdiv=0, kbs=0, z1=0, z2=0):
        self.arr, self.rs, self.ks, self.off, self.kdiv, self.kbs, self.z1, self.z2 = \
            flat(arr), rs, ks, off, kdiv, kbs, z1, z2

    def args(self, K):
        return (self.arr, self.off, self.rs, self.ks, self.kdiv or K, self.kbs, self.z1, self.z2)


def gemm(a: Operand, b: Operand, c: Operand, M, N, K, Z1=1, Z2=1, bias=None, bias_mode=0, bias_z2=0,
         accumulate=False, tile=None):
    """c = a @ b (+ bias), or c += a @ b; batched over Z1 x Z2. For b, `rs` is the
    column stride and `ks` the K stride. Slicing K across blocks needs c zeroed
    first when not accumulating; that is done here (c must then be its whole array).
    `tile` = (BM, BN, S) overrides the plan (tests)."""
    BM, BN, S = tile or _plan(M, N, K, Z1 * Z2)
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
    GEMMS[BM, BN][grid, (TX, TY)](*aa, *bb, c.arr, c.off, c.rs, c.ks, c.z1, c.z2,
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


def conv2d_backward(x, w, gy, stride=1, pad=0, dilation=1, groups=1, need_gx=True, need_gw=True, need_gb=True,
                    gw_out=None, gb_out=None):
    """(gx, gw, gb) for conv2d; each is None when not requested. gw_out / gb_out: where
    to write gw / gb (a model's gradient buffer, runtime/cuda_flat.py)."""
    from .tensor import _given, channel_sum
    g = Geom(x.shape, w.shape, stride, pad, dilation, groups, _dtype_of(x).itemsize)
    gx = _backward_data(gy, w, g, empty(x.shape, x.dtype)) if need_gx else None
    gw = _backward_weight(x, gy, g, _given(gw_out, w.shape, w.dtype)) if need_gw else None
    return gx, gw, channel_sum(gy, out=gb_out) if need_gb else None


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


def linear_backward(x, w, gy, need_gx=True, gw_out=None, gb_out=None):
    """(gx[N, K], gw[M, K], gb[M]); gx is None when not requested. gw_out / gb_out: where
    to write gw / gb."""
    from .tensor import _given, reduce_axis
    N, K = x.shape
    M = w.shape[0]
    gx = None
    if need_gx:
        gx = empty((N, K), x.dtype)
        gemm(Operand(gy, M, 1), Operand(w, 1, K), Operand(gx, K, 1), N, K, M)
    gw = _given(gw_out, (M, K), x.dtype)
    gemm(Operand(gy, 1, M), Operand(x, 1, K), Operand(gw, K, 1), M, K, N)
    return gx, gw, reduce_axis(gy, 0, out=gb_out)
