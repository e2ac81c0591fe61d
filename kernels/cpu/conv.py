"""2-D convolution and transposed convolution via pixel-major im2col + BLAS GEMM.

Threads (prange) split the work into blocks of B images x R output rows (the
forward, and a backward without gx, split the row bands of an image too; with gx a
thread takes whole images, so with fewer images than threads a stride-1 backward
runs gx as a forward conv and gw as a band-split pass) and, per block:
  1. copies the B images into a zero-bordered NHWC buffer, so that every
     im2col run is a contiguous copy (of KW*C floats with dilation 1 and one
     group, else of C) with no bounds checks;
  2. builds cols[P, KH*KW*C], one row per output pixel (P = B*R*OW);
  3. runs serial sgemm cols @ Wt[KH*KW*C, O] -> out[P, O]. The pixel count
     is GEMM's long M dimension: OpenBLAS ran this faster than the
     transposed W[O, CKK] @ cols[CKK, P]. For stride-1 layers
     cols spans kj only and each ki is a row-shifted view of it (see _fwd);
  4. transposes out into NCHW y, adding the bias.
The backward rebuilds cols for gw += cols^T @ gy^T, and scatter-adds the
gradient columns gy^T @ W into a padded NHWC buffer (col2im) for gx.

1x1 layers with no padding (ResNet shortcuts) skip all of that: in NCHW they are
plain GEMMs w @ x[n] (_fwd1/_bwd1). Stride 1 reads x and writes y in place; a
strided one gathers only the pixels it samples, where the NHWC copy transposed
the whole input. With fewer
images than threads, the threads split each image's channels instead.
"""
import functools

import numpy as np

from ..geometry import ConvShape, out_size, transpose_conv_shape  # noqa: F401 (out_size re-exported)
from . import as_float, conv_small, kernel, njit, out_array, pair, prange
from .gemm import N_, T_, gemm, strided_add
from .scratch import SCRATCH

# Pixels (GEMM rows) per block: as fast as larger blocks, with the columns inside a core's
# L2 and less per-thread workspace at the step's peak memory.
# Per-tap GEMMs (K = KW*C) only pay off on images of >= TAPS_MIN pixels.
ROWS, ROWS_BWD = 256, 128
TAPS_MIN = 256
# 1x1 layers (NCHW GEMMs, no im2col): pixels per GEMM.
ROWS1 = 256


@njit
def _tile(dst, d, ldd, src, s, lds, i0, i1, j0, j1, bias):
    u = np.uint64  # no negative-index wraparound checks: they block vectorisation
    for j in range(j0, j1):
        bj = bias[j]
        for i in range(i0, i1):
            dst[u(d + j * ldd + i)] = src[u(s + i * lds + j)] + bj


@njit
def _transpose(dst, d, ldd, src, s, lds, rows, cols, bias):
    """dst[d + j*ldd + i] = src[s + i*lds + j] + bias[j] for i < rows, j < cols, on
    flat arrays, in small tiles that sweep the side with the long stride last:
    a sweep across 64 rows 4 KiB apart (NCHW planes of 32x32) evicts each cache
    line before its second half is written."""
    if ldd > lds:
        for j0 in range(0, cols, 8):
            for i0 in range(0, rows, 16):
                _tile(dst, d, ldd, src, s, lds, i0, min(i0 + 16, rows), j0, min(j0 + 8, cols), bias)
    else:
        for i0 in range(0, rows, 8):
            for j0 in range(0, cols, 8):
                _tile(dst, d, ldd, src, s, lds, i0, min(i0 + 8, rows), j0, min(j0 + 8, cols), bias)


@njit
def _nhwc(x, n0, nb, xp, ph, pw, to_nhwc, i0, i1):
    """xp[b, ph+i, pw+j, c] <-> x[n0+b, c, i, j] for rows i0 <= i < i1; xp's zero border
    is never written."""
    C, H, W = x.shape[1], x.shape[2], x.shape[3]
    Hp, Wp = xp.shape[1], xp.shape[2]
    xf, pf = x.reshape(-1), xp.reshape(-1)
    zero = np.zeros(max(C, W), x.dtype)
    for b in range(nb):
        for i in range(max(i0, 0), min(i1, H)):
            s = (n0 + b) * C * H * W + i * W
            d = ((b * Hp + ph + i) * Wp + pw) * C
            if to_nhwc:
                _transpose(pf, d, C, xf, s, H * W, C, W, zero)
            else:
                _transpose(xf, s, H * W, pf, d, C, W, C, zero)


@njit
def _rows(t, T, items, nband, grp, R, OH, sh, ph, KH, dh):
    """The input rows [i0, i1) that thread t's bands of image group grp read (its items
    are t*items//T .. (t+1)*items//T; item grp*nband + j is band j, rows j*R ...): with
    fewer images than threads each thread converts only those, not the whole image."""
    b0 = max(t * items // T, grp * nband) - grp * nband
    b1 = min((t + 1) * items // T, (grp + 1) * nband) - grp * nband
    return b0 * R * sh - ph, (min(OH, b1 * R) - 1) * sh - ph + (KH - 1) * dh + 1


@njit
def _im2col(xp, cols, nb, c0, Cg, oh0, noh, OW, KH, KW, sh, sw, dh, dw, to_cols):
    """cols[(b*noh + oh)*OW + ow, (ki*KW + kj)*Cg + c] <-> xp[b, (oh0+oh)*sh + ki*dh, ow*sw + kj*dw, c0+c].
    to_cols: gather xp into cols; else scatter-add cols into xp (col2im, the adjoint)."""
    Hp, Wp, C = xp.shape[1], xp.shape[2], xp.shape[3]
    xf, cf = xp.reshape(-1), cols.reshape(-1)
    CKK = KH * KW * Cg
    u = np.uint64
    # With dilation 1 and one group, a row's KW taps are adjacent in xp as in cols: one
    # run of KW*C per row instead of KW runs of C (the RGB stem's runs of 3)
    runs, run = (1, KW * Cg) if dw * C == Cg else (KW, Cg)
    for b in range(nb):
        for oh in range(noh):
            for ow in range(OW):
                d = ((b * noh + oh) * OW + ow) * CKK
                for ki in range(KH):
                    s = ((b * Hp + (oh0 + oh) * sh + ki * dh) * Wp + ow * sw) * C + c0
                    for kj in range(runs):
                        if to_cols:
                            for i in range(run):
                                cf[u(d + i)] = xf[u(s + i)]
                        else:
                            for i in range(run):
                                xf[u(s + i)] += cf[u(d + i)]
                        s += dw * C
                        d += run


def _fwd(x, wt, b, y, KH, KW, OH, OW, sh, sw, ph, pw, dh, dw, B, R, T, nt, xps, colbufs, outfs):
    """y[N, O, OH*OW] = conv(x) + b, with wt[G, KH*KW*C/G, O/G].
    nt = 1: full im2col, one GEMM with K = KH*KW*C/G.
    nt = KH (stride 1, B = 1): im2col over kj only, on the R + (KH-1)*dh input
    rows of the band; tap ki is then the row-shifted sub-matrix of that buffer,
    one GEMM each with K = KW*C/G accumulating (beta=1): a third of the copying."""
    N, C, H, W = x.shape
    G, CKK, Og = wt.shape
    Cg = C // G
    OHW = OH * OW
    kh, K = KH // nt, CKK // nt     # im2col taps per row, and their columns
    ext = (nt - 1) * dh             # extra input rows of a band
    yf, wf = y.reshape(-1), wt.reshape(-1)
    # per-thread buffers (_Geom.buffers): xps[T, B, H+2ph, W+2pw, C] zeroed,
    # colbufs[T, B*(R+ext)*OW*K], outfs[T, B*R*OW*Og]
    # work items are (group of B images, band of R rows): threads split the bands too,
    # so a batch smaller than the thread count still uses every thread
    nband = -(-OH // R)
    items = -(-N // B) * nband
    for t in prange(T):
        xp, colbuf, outf = xps[t], colbufs[t], outfs[t]
        have = -1                   # the image group now in xp
        for it in range(t * items // T, (t + 1) * items // T):
            grp, oh0 = it // nband, it % nband * R
            n0 = grp * B
            nb = min(B, N - n0)
            if grp != have:
                i0, i1 = _rows(t, T, items, nband, grp, R, OH, sh, ph, KH, dh)
                _nhwc(x, n0, nb, xp, ph, pw, True, i0, i1)
                have = grp
            noh = min(R, OH - oh0)
            L = noh * OW
            for g in range(G):
                _im2col(xp, colbuf, nb, g * Cg, Cg, oh0, noh + ext, OW, kh, KW, sh, sw, dh, dw, True)
                for k in range(nt):
                    gemm(nb * L, Og, K, colbuf[k * dh * OW * K:], K, N_,
                          wf[(g * CKK + k * K) * Og:], Og, N_, outf, 0.0 if k == 0 else 1.0)
                for bi in range(nb):
                    _transpose(yf, ((n0 + bi) * G + g) * Og * OHW + oh0 * OW, OHW,
                               outf, bi * L * Og, Og, L, Og, b[g * Og:])
    return y


def _bwd(x, wk, gy, gx, gw, H, W, KH, KW, OH, OW, sh, sw, ph, pw, dh, dw, B, R, T, nt, need_gx, need_gw,
         xps, gxps, colbufs, gytfs):
    """gx[N, C, H, W] and per-thread partial gw[T, G, KH*KW*C/G, O/G], from
    wk[G, O/G, KH*KW*C/G]; nt as in _fwd. gw accumulates straight into gw[t]
    (beta=1); gx's columns are col2im-added into a padded NHWC buffer."""
    N = gy.shape[0]
    G, Og, CKK = wk.shape
    Cg = CKK // (KH * KW)
    C, O = G * Cg, G * Og
    OHW = OH * OW
    kh, K = KH // nt, CKK // nt
    ext = (nt - 1) * dh
    gyf, wf = gy.reshape(-1), wk.reshape(-1)
    zero = gy.dtype.type(0)
    zeros = np.zeros(R * OW, gy.dtype)
    # per-thread buffers as in _fwd; gxps like xps, each only where needed
    # work items as in _fwd, but with gx a thread takes whole image groups: col2im's
    # halo rows cross bands, and gxp holds the whole group
    nband = -(-OH // R)
    per = 1 if need_gx else nband          # items per image group
    items = -(-N // B) * per
    for t in prange(T):
        xp, gxp, colbuf, gytf = xps[t], gxps[t], colbufs[t], gytfs[t]
        gwf = gw[t].reshape(-1)
        have = -1                           # the image group now in xp
        for it in range(t * items // T, (t + 1) * items // T):
            grp = it // per
            n0 = grp * B
            nb = min(B, N - n0)
            if need_gw and grp != have:
                i0, i1 = (0, H) if need_gx else _rows(t, T, items, nband, grp, R, OH, sh, ph, KH, dh)
                _nhwc(x, n0, nb, xp, ph, pw, True, i0, i1)
                have = grp
            if need_gx:
                gxp[:nb] = zero
            band0 = it % per * (nband // per)
            for oh0 in range(band0 * R, min(OH, (band0 + nband // per) * R), R):
                noh = min(R, OH - oh0)
                L = noh * OW
                for g in range(G):
                    for bi in range(nb):
                        _transpose(gytf, bi * L * Og, Og,
                                   gyf, ((n0 + bi) * O + g * Og) * OHW + oh0 * OW, OHW, Og, L, zeros)
                    if need_gw:
                        _im2col(xp, colbuf, nb, g * Cg, Cg, oh0, noh + ext, OW, kh, KW, sh, sw, dh, dw, True)
                        for k in range(nt):
                            gemm(K, Og, nb * L, colbuf[k * dh * OW * K:], K, T_,
                                  gytf, Og, N_, gwf[(g * CKK + k * K) * Og:], 1.0)
                    if need_gx:
                        if nt > 1:  # the taps' row ranges overlap: accumulate
                            colbuf[:(noh + ext) * OW * K] = zero
                        for k in range(nt):
                            gemm(nb * L, K, Og, gytf, Og, N_, wf[g * Og * CKK + k * K:], CKK, N_,
                                  colbuf[k * dh * OW * K:], 0.0 if nt == 1 else 1.0)
                        _im2col(gxp, colbuf, nb, g * Cg, Cg, oh0, noh + ext, OW, kh, KW, sh, sw, dh, dw, False)
            if need_gx:
                _nhwc(gx, n0, nb, gxp, ph, pw, False, 0, H)
    return gx


@njit
def _pick(x, n0, nb, c0, Cg, sh, sw, OH, OW, cols, to_cols):
    """cols[c, b*OH*OW + oh*OW + ow] <-> x[n0+b, c0+c, oh*sh, ow*sw]: the im2col of a 1x1
    conv, in NCHW order, reading only the pixels a strided layer samples (set, not add)."""
    C, H, W = x.shape[1], x.shape[2], x.shape[3]
    xf, cf = x.reshape(-1), cols.reshape(-1)
    L = OH * OW
    u = np.uint64
    for c in range(Cg):
        for b in range(nb):
            for oh in range(OH):
                s = ((n0 + b) * C + c0 + c) * H * W + oh * sh * W
                d = (c * nb + b) * L + oh * OW
                if to_cols:
                    for ow in range(OW):
                        cf[u(d + ow)] = xf[u(s + ow * sw)]
                else:
                    for ow in range(OW):
                        xf[u(s + ow * sw)] = cf[u(d + ow)]


def _fwd1(x, w, b, y, sh, sw, OH, OW, B, S, T, colss, outfs):
    """1x1 conv, pad 0, in NCHW: y[n, g] = w[g] @ x[n, g, ::sh, ::sw] (w[G, O/G, C/G]).
    Stride 1 with B = 1 needs no copy at all: the GEMM reads x and writes y in place.
    Work items are (group of B images, slice s < S of the output channels): S > 1 when
    there are fewer images than threads (then B = 1), so batch 1 uses every thread."""
    N, C, H, W = x.shape
    G, Og, Cg = w.shape
    L = OH * OW
    direct = sh == 1 and sw == 1 and B == 1
    yf, wf, xf = y.reshape(-1), w.reshape(-1), x.reshape(-1)
    items = -(-N // B) * S
    # per-thread buffers: colss[T, Cg*B*L] (none if direct), outfs[T, Og*B*L] (none if B == 1)
    for t in prange(T):
        cols, outf = colss[t], outfs[t]
        for it in range(t * items // T, (t + 1) * items // T):
            n0, s = it // S * B, it % S
            nb = min(B, N - n0)
            o0, o1 = s * Og // S, (s + 1) * Og // S
            for g in range(G):
                yo = (n0 * G + g) * Og * L
                if direct:
                    gemm(o1 - o0, L, Cg, wf[(g * Og + o0) * Cg:], Cg, N_, xf[(n0 * C + g * Cg) * H * W:], L, N_,
                          yf[yo + o0 * L:], 0.0)
                else:
                    _pick(x, n0, nb, g * Cg, Cg, sh, sw, OH, OW, cols, True)
                    gemm(o1 - o0, nb * L, Cg, wf[(g * Og + o0) * Cg:], Cg, N_, cols, nb * L, N_,
                          yf[yo + o0 * L:] if nb == 1 else outf[o0 * nb * L:], 0.0)
                for bi in range(nb):
                    for o in range(o0, o1):
                        d = ((n0 + bi) * G + g) * Og * L + o * L
                        if nb == 1:
                            strided_add(yf, d, yf, d, L, 1, b[g * Og + o])
                        else:
                            strided_add(yf, d, outf, (o * nb + bi) * L, L, 1, b[g * Og + o])
    return y


def _bwd1(x, w, gy, gx, gw, H, W, sh, sw, OH, OW, B, S, T, need_gx, need_gw, colss, gybs):
    """Backward of _fwd1: gw[t, g] += gy[n, g] @ cols^T, gx[n, g, ::sh, ::sw] = w[g]^T @ gy[n, g]
    (gx pre-zeroed when strided). One image: gy is read in place, no copy. Items as in
    _fwd1: slice s takes rows s/S of gw (output channels) and of gx (input channels);
    gw may hold one array for all threads (then each slice's items must stay on one thread).
    With one image each row of gw is written once: = rather than +=, so gw need not be
    zeroed first (at batch 1, zeroing was a large share of the pass)."""
    N = gy.shape[0]
    G, Og, Cg = w.shape
    C, O = G * Cg, G * Og
    L = OH * OW
    direct = sh == 1 and sw == 1 and B == 1
    gyf, wf, gxf = gy.reshape(-1), w.reshape(-1), gx.reshape(-1)
    zero = gy.dtype.type(0)
    items = -(-N // B) * S
    acc = 0.0 if N == 1 else 1.0
    # per-thread buffers as in _fwd1 (gybs like outfs)
    for t in prange(T):
        cols, gyb = colss[t], gybs[t]
        gwf = gw[min(np.int64(t), gw.shape[0] - 1)].reshape(-1)    # one shared gw: disjoint rows
        for it in range(t * items // T, (t + 1) * items // T):
            n0, s = it // S * B, it % S
            nb = min(B, N - n0)
            P = nb * L
            o0, o1 = s * Og // S, (s + 1) * Og // S
            c0, c1 = s * Cg // S, (s + 1) * Cg // S
            for g in range(G):
                go = (n0 * O + g * Og) * L
                if nb > 1:      # (then S == 1)
                    for bi in range(nb):
                        for o in range(Og):
                            strided_add(gyb, (o * nb + bi) * L, gyf, ((n0 + bi) * O + g * Og + o) * L, L, 1, zero)
                gya = gyf[go:] if nb == 1 else gyb
                xo = (n0 * C + g * Cg) * H * W
                if need_gw and o1 > o0:
                    if direct:
                        gemm(o1 - o0, Cg, P, gya[o0 * P:], P, N_, x.reshape(-1)[xo:], P, T_,
                              gwf[(g * Og + o0) * Cg:], acc)
                    else:
                        _pick(x, n0, nb, g * Cg, Cg, sh, sw, OH, OW, cols, True)
                        gemm(o1 - o0, Cg, P, gya[o0 * P:], P, N_, cols, P, T_, gwf[(g * Og + o0) * Cg:], acc)
                if need_gx and c1 > c0:
                    if direct:
                        gemm(c1 - c0, P, Og, wf[g * Og * Cg + c0:], Cg, T_, gya, P, N_, gxf[xo + c0 * P:], 0.0)
                    else:
                        gemm(c1 - c0, P, Og, wf[g * Og * Cg + c0:], Cg, T_, gya, P, N_, cols[c0 * P:], 0.0)
                        _pick(gx, n0, nb, g * Cg + c0, c1 - c0, sh, sw, OH, OW, cols[c0 * P:], False)
    return gx


_fwd = kernel(_fwd)
_bwd = kernel(_bwd)
_fwd1 = kernel(_fwd1)
_bwd1 = kernel(_bwd1)


@functools.lru_cache(maxsize=None)
def _balanced_rows(OH, R0, T):
    """Rows per band, at most R0, that share OH rows out most evenly among T threads
    taking consecutive bands; ties go to larger bands (fewer, larger GEMMs)."""
    def worst(R):
        nb = -(-OH // R)
        return max(min(OH, (t + 1) * nb // T * R) - min(OH, t * nb // T * R) for t in range(T))
    return min(range(1, R0 + 1), key=lambda R: (worst(R), -R))


class _Geom(ConvShape):
    """Shapes and attributes of one conv, plus the blocking decision."""

    def __init__(self, xshape, wshape, stride, pad, dilation, groups):
        super().__init__(xshape, wshape, stride, pad, dilation, groups)
        Cg = self.C // self.G
        self.work = self.N * self.O * self.OH * self.OW * Cg * self.KH * self.KW
        self.pointwise = self.KH == self.KW == 1 and self.p == (0, 0)

    def split(self, k, need_gx=True):
        """(kernel, T, B, R, nt): each GEMM covers B images x R output rows, about
        ROWS pixels; nt = KH taps (see _fwd) for stride-1 images of >= TAPS_MIN pixels
        whose taps are wide enough (K = KW*C/G >= 64) for an efficient GEMM."""
        fn, threads = k.pick(self.work)
        T = max(1, min(threads, self.N))
        ohw = self.OH * self.OW
        rows = ROWS_BWD if k is _bwd else ROWS
        if self.s[0] == 1 and self.KH > 1 and ohw >= TAPS_MIN and self.KW * self.C // self.G >= 64:
            B, R, nt = 1, max(1, rows // self.OW), self.KH
        elif ohw >= rows:
            B, R, nt = 1, max(1, rows // self.OW), 1
        else:
            B, R, nt = min(-(-rows // ohw), -(-self.N // T)), self.OH, 1
        if (k is _fwd or not need_gx) and self.N < threads and B == 1:
            # one image's row bands are all the threads' items: share them out evenly
            # (28 rows in bands of 9 gave 2 threads 18 and 10)
            R = _balanced_rows(self.OH, R, threads // self.N)
        if k is _fwd or not need_gx:   # (image group, row band) items
            T = max(1, min(threads, -(-self.N // B) * -(-self.OH // R)))
        return fn, T, B, R, nt

    def split1(self, k):
        """(kernel, T, B, S) for _fwd1 / _bwd1: GEMMs of B images (about ROWS1 pixels);
        with fewer images than threads, S slices of each image's channels instead."""
        fn, threads = k.pick(self.work)
        if self.N < threads:
            S = -(-threads // self.N)
            return fn, threads, 1, S
        T = max(1, min(threads, self.N))
        return fn, T, min(-(-ROWS1 // (self.OH * self.OW)), -(-self.N // T)), 1

    def args(self):
        return (self.KH, self.KW, self.OH, self.OW, *self.s, *self.p, *self.d)

    def gx_as_conv(self) -> bool:
        """Whether the data gradient runs as a forward conv (see _backward): stride 1,
        padding at most the kernel's reach, and images of at most 4x4 (on 8x8 it was no
        faster) or fewer images than threads (_bwd gives each thread whole images; the
        forward conv and a weight-gradient-only pass split the row bands)."""
        return (self.s == (1, 1) and self.KH * self.KW > 1
                and (self.OH * self.OW <= 16 or self.N < _bwd.pick(self.work)[1])
                and all(p <= d * (k - 1) for p, d, k in zip(self.p, self.d, (self.KH, self.KW))))

    def w5(self, w):
        """w as [G, O/G, C/G, KH, KW]."""
        return w.reshape(self.G, self.O // self.G, self.C // self.G, self.KH, self.KW)

    def wt(self, w, s):
        """[G, KH*KW*C/G, O/G]: the forward GEMM's right operand (in scratch s)."""
        G, Og, Cg = self.G, self.O // self.G, self.C // self.G
        a = s.take((G, self.KH, self.KW, Cg, Og), w.dtype)
        np.copyto(a, self.w5(w).transpose(0, 3, 4, 2, 1))
        return a.reshape(G, -1, Og)

    def wk(self, w, s):
        """[G, O/G, KH*KW*C/G]: the backward-data GEMM's right operand (in scratch s)."""
        G, Og, Cg = self.G, self.O // self.G, self.C // self.G
        a = s.take((G, Og, self.KH, self.KW, Cg), w.dtype)
        np.copyto(a, self.w5(w).transpose(0, 1, 3, 4, 2))
        return a.reshape(G, Og, -1)

    def buffers(self, s, B, R, T, nt, dtype, image, gimage):
        """_fwd's / _bwd's per-thread buffers in scratch s: (xps, gxps, colbufs, outfs);
        the padded image buffers only where needed (image / gimage)."""
        pad = (T, B, self.H + 2 * self.p[0], self.W + 2 * self.p[1], self.C)
        one = (T, 1, 1, 1, 1)
        K = self.C // self.G * self.KH * self.KW // nt
        ext = (nt - 1) * self.d[0]
        xps = s.take(pad if image else one, dtype, zero=True)
        gxps = s.take(pad if gimage else one, dtype, zero=True)
        cols = s.take((T, B * (R + ext) * self.OW * K), dtype)
        outs = s.take((T, B * R * self.OW * (self.O // self.G)), dtype)
        return xps, gxps, cols, outs

    def buffers1(self, s, B, T, dtype):
        """_fwd1's / _bwd1's per-thread buffers in scratch s: (colss, outfs)."""
        L = self.OH * self.OW
        direct = self.s == (1, 1) and B == 1
        return (s.take((T, 0 if direct else self.C // self.G * B * L), dtype),
                s.take((T, 0 if B == 1 else self.O // self.G * B * L), dtype))


def conv2d(x, w, b=None, stride=1, pad=0, dilation=1, groups=1, out=None):
    """y[N, O, OH, OW] = cross-correlation of x[N, C, H, W] with w[O, C/groups, KH, KW] (+ b[O]);
    out: an array of y's size to write y into."""
    x = as_float(x)
    w = np.ascontiguousarray(w, dtype=x.dtype)
    g = _Geom(x.shape, w.shape, stride, pad, dilation, groups)
    b = np.zeros(g.O, x.dtype) if b is None else np.ascontiguousarray(b, dtype=x.dtype)
    y = out_array(out, (g.N, g.O, g.OH * g.OW), x.dtype)
    with SCRATCH.frame() as s:
        if conv_small.usable(g):
            conv_small.forward(x, w, b, g, y, s)
        elif g.pointwise:
            fn, T, B, S = g.split1(_fwd1)
            fn(x, w.reshape(g.G, g.O // g.G, -1), b, y, *g.s, g.OH, g.OW, B, S, T, *g.buffers1(s, B, T, x.dtype))
        else:
            fn, T, B, R, nt = g.split(_fwd)
            xps, _, cols, outs = g.buffers(s, B, R, T, nt, x.dtype, True, False)
            fn(x, g.wt(w, s), b, y, *g.args(), B, R, T, nt, xps, cols, outs)
    return y.reshape(g.N, g.O, g.OH, g.OW)


def _backward(x, xshape, w, gy, g, need_gx, need_gw, gw_out=None, gx_out=None):
    """(gx, gw); gw is written into gw_out when given (a gradient buffer kept across steps),
    gx into gx_out."""
    with SCRATCH.frame() as s:
        return _backward_in(x, xshape, w, gy, g, need_gx, need_gw, gw_out, gx_out, s)


def _backward_in(x, xshape, w, gy, g, need_gx, need_gw, gw_out, gx_out, s):
    if conv_small.usable(g):
        return conv_small.backward(x, xshape, w, gy, g, need_gx, need_gw, gw_out, gx_out, s)
    gy = np.ascontiguousarray(gy, dtype=w.dtype).reshape(g.N, g.O, g.OH * g.OW)
    Cg = g.C // g.G
    if g.pointwise:
        fn, T, B, S = g.split1(_bwd1)
        gx = out_array(gx_out, xshape, w.dtype, zero=g.s != (1, 1)) if need_gx else np.empty((1, 1, 1, 1), w.dtype)
        if not need_gw:
            x = np.zeros((1, 1, 1, 1), w.dtype)
        part = (g.G, g.O // g.G, Cg)
        gw = (np.empty(w.shape, w.dtype) if gw_out is None else gw_out) if need_gw else None
        # one image in S slices: the threads write disjoint rows of gw, so straight into it
        # (per-thread partials of ResNet-50's 2048x512 layers cost more than their GEMMs)
        shared = need_gw and S > 1 and g.N == 1
        if shared:
            gwp = gw.reshape(1, *part)      # one image: written, not added to (_bwd1)
        else:
            gwp = s.take((T if need_gw else 1, *part), w.dtype, zero=g.N > 1)
        fn(x, w.reshape(part), gy, gx, gwp, g.H, g.W, *g.s, g.OH, g.OW, B, S, T, need_gx, need_gw,
           *g.buffers1(s, B, T, w.dtype))
        if need_gw and not shared:
            np.sum(gwp, axis=0, out=gw.reshape(part))
        return (gx if need_gx else None), gw
    if need_gx and g.gx_as_conv():
        # gx is the correlation of gy with the flipped, transposed kernel: a forward conv
        # whose GEMM has K = KH*KW*O, where the backward's has K = O (64-128 on ResNet's
        # small images) and scatters its columns back (col2im)
        G, Og, Cg = g.G, g.O // g.G, g.C // g.G
        with s.frame():     # the flipped kernel's scratch is free again for the gw pass
            wf = s.take((g.C, Og, g.KH, g.KW), w.dtype)
            np.copyto(wf.reshape(G, Cg, Og, g.KH, g.KW), g.w5(w)[..., ::-1, ::-1].transpose(0, 2, 1, 3, 4))
            pad = (g.d[0] * (g.KH - 1) - g.p[0], g.d[1] * (g.KW - 1) - g.p[1])
            gx = conv2d(gy.reshape(g.N, g.O, g.OH, g.OW), wf, None, 1, pad, g.d, G, gx_out).reshape(xshape)
        if not need_gw:
            return gx, None
        return gx, _backward_in(x, xshape, w, gy, g, False, True, gw_out, None, s)[1]
    fn, T, B, R, nt = g.split(_bwd, need_gx)
    gx = out_array(gx_out, xshape, w.dtype) if need_gx else np.empty((1, 1, 1, 1), w.dtype)
    if not need_gw:
        x = np.zeros((1, 1, 1, 1), w.dtype)
    gwp = s.take((T if need_gw else 1, g.G, g.KH * g.KW * Cg, g.O // g.G), w.dtype, zero=True)
    fn(x, g.wk(w, s), gy, gx, gwp, g.H, g.W, *g.args(), B, R, T, nt, need_gx, need_gw,
       *g.buffers(s, B, R, T, nt, w.dtype, need_gw, need_gx))
    gw = None
    if need_gw:  # [G, KH, KW, Cg, Og] -> [G, Og, Cg, KH, KW]
        for t in range(1, gwp.shape[0]):     # the threads' partials, summed into the first
            gwp[0] += gwp[t]
        gw5 = gwp[0].reshape(g.G, g.KH, g.KW, Cg, g.O // g.G)
        gw = np.empty(w.shape, w.dtype) if gw_out is None else gw_out
        np.copyto(gw.reshape(g.G, g.O // g.G, Cg, g.KH, g.KW), gw5.transpose(0, 4, 3, 1, 2))
    return (gx if need_gx else None), gw


def conv2d_backward(x, w, gy, stride=1, pad=0, dilation=1, groups=1, need_gx=True, need_gw=True, gw_out=None,
                    need_gb=True, gx_out=None):
    """(gx, gw, gb) for conv2d; gx / gw / gb are None when not requested. gw_out / gx_out:
    arrays of w's / x's size to write gw / gx into (the caller's buffers) instead of new ones."""
    x = as_float(x)
    w = np.ascontiguousarray(w, dtype=x.dtype)
    g = _Geom(x.shape, w.shape, stride, pad, dilation, groups)
    gx, gw = _backward(x, x.shape, w, gy, g, need_gx, need_gw, gw_out, gx_out)
    return gx, gw, (np.asarray(gy, dtype=x.dtype).sum(axis=(0, 2, 3)) if need_gb else None)


def _transpose_geom(x, w, stride, pad, output_padding, dilation, groups):
    """The conv whose backward-data is this transposed conv: its input is our output."""
    yshape = transpose_conv_shape(x.shape, w.shape, stride, pad, output_padding, dilation, groups)
    g = _Geom(yshape, w.shape, stride, pad, dilation, groups)
    if (g.OH, g.OW) != tuple(x.shape[2:]):
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

