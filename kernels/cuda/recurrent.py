"""Recurrent cells, attention over locations, sampling and argmax: the CUDA twin of
kernels/cpu/recurrent.py, with the same functions, arguments and results (device
arrays; see the CPU module's doc for what each computes and keeps).

The matrix products go to the tiled GEMM (gemm.py), the recurrent one writing straight
into the cell's saved activations (row stride 5H or 4H); the gates, the attention's
tanh and the reads are grid-stride kernels over elements. Sampling draws the CPU's
numbers: the same hash of (seed, row) and the same running sums in the same order.
"""
from __future__ import annotations

import math

import numpy as np
from numba import cuda, int32, uint64

from . import empty, flat, kernel, launch, zeros
from .gemm import Operand, _zero, gemm, linear
from .loss import softmax, softmax_backward
from .norm import _mix
from .tensor import reduce_axis

KINDS = {"rnn": 1, "lstm": 4, "gru": 3}
LSTM_BLOCKS = {"ifog": (2, 3), "ifgo": (3, 2)}     # order -> (row block of o, row block of g)


# ---------------------------------------------------------------- products and sums

def _colsum_into(g, out, accumulate):
    R, C = g.shape
    launch(_colsum, C, flat(g), R, C, out, int(accumulate))


@kernel("aiiai")
def _colsum(g, R, C, out, acc):
    """out[c] (+)= sum over rows of g[:, c]: one thread per column (reads coalesce along c)."""
    T = g.dtype.type
    for c in range(cuda.grid(1), C, cuda.gridsize(1)):
        s = T(0)
        for r in range(R):
            s += g[r * C + c]
        out[c] = out[c] + s if acc else s


def matmul_rows(g, w, out=None, add=False):
    """g[R, M] @ w[M, K], written into out when given (added to it with add)."""
    R, M = g.shape
    K = w.shape[1]
    y = empty((R, K), g.dtype) if out is None else out
    if R and K:
        gemm(Operand(g, M, 1), Operand(w, 1, K), Operand(y, K, 1), R, K, M, accumulate=add)
    return y


def weight_grad(g, a, gw=None, gb=None, need_gb=True, accumulate=False):
    """(g.T @ a, column sums of g), written into or (accumulate) added to gw / gb."""
    R, M = g.shape
    K = a.shape[1]
    if accumulate and (gw is None or (need_gb and gb is None)):
        raise ValueError("weight_grad: accumulate needs the gradients to add to")
    gw = empty((M, K), g.dtype) if gw is None else gw
    if R == 0:
        if not accumulate:
            launch(_zero, gw.size, flat(gw))
    elif M and K:
        gemm(Operand(g, 1, M), Operand(a, 1, K), Operand(gw, K, 1), M, K, R, accumulate=accumulate)
    if not need_gb:
        return gw, None
    gb = empty(M, g.dtype) if gb is None else gb
    _colsum_into(g, gb, accumulate)
    return gw, gb


# ---------------------------------------------------------------- the input projection

def project(x, w_ih, b_ih=None):
    return linear(x, w_ih, b_ih)


def project_backward(gxp, x, w_ih, need_gx=True, gw=None, gb=None, accumulate=False):
    gx = matmul_rows(gxp, w_ih) if need_gx else None
    gw, gb = weight_grad(gxp, x, gw, gb, True, accumulate)
    return gx, gw, gb


# ---------------------------------------------------------------- one step from the projected input

@kernel("aa")
def _rnn_gates(hn, xp):
    """hn = tanh(hn + xp): hn holds h @ w_hh.T + b_hh."""
    for i in range(cuda.grid(1), hn.size, cuda.gridsize(1)):
        hn[i] = math.tanh(hn[i] + xp[i])


@kernel("aaa")
def _rnn_bwd(acts, ghn, gxp):
    T = acts.dtype.type
    for i in range(cuda.grid(1), acts.size, cuda.gridsize(1)):
        y = acts[i]
        gxp[i] = ghn[i] * (T(1) - y * y)


@kernel("aaaaaiii")
def _lstm_gates(acts, xp, c, hn, cn, H, bo, bg):
    """acts[r, :4H] holds h @ w_hh.T + b_hh; becomes the gates, acts[r, 4H:] tanh(c')."""
    T = acts.dtype.type
    one = T(1)
    for e in range(cuda.grid(1), hn.size, cuda.gridsize(1)):
        r = e // H
        j = e - r * H
        a = r * 5 * H + j
        x = r * 4 * H + j
        i = one / (one + math.exp(-(acts[a] + xp[x])))
        f = one / (one + math.exp(-(acts[a + H] + xp[x + H])))
        o = one / (one + math.exp(-(acts[a + bo * H] + xp[x + bo * H])))
        g = math.tanh(acts[a + bg * H] + xp[x + bg * H])
        c2 = f * c[e] + i * g
        tc = math.tanh(c2)
        acts[a] = i
        acts[a + H] = f
        acts[a + bo * H] = o
        acts[a + bg * H] = g
        acts[a + 4 * H] = tc
        cn[e] = c2
        hn[e] = o * tc


@kernel("aaaaiaaiii")
def _lstm_bwd(acts, c, ghn, gcn, has_gc, gxp, gc, H, bo, bg):
    T = acts.dtype.type
    one = T(1)
    for e in range(cuda.grid(1), c.size, cuda.gridsize(1)):
        r = e // H
        j = e - r * H
        a = r * 5 * H + j
        x = r * 4 * H + j
        i = acts[a]
        f = acts[a + H]
        o = acts[a + bo * H]
        g = acts[a + bg * H]
        tc = acts[a + 4 * H]
        gh = ghn[e]
        dc = gh * o * (one - tc * tc)
        if has_gc:
            dc += gcn[e]
        gxp[x] = dc * g * i * (one - i)
        gxp[x + H] = dc * c[e] * f * (one - f)
        gxp[x + bo * H] = gh * tc * o * (one - o)
        gxp[x + bg * H] = dc * i * (one - g * g)
        gc[e] = dc * f


@kernel("aaaai")
def _gru_gates(acts, xp, h, hn, H):
    """acts[r, :3H] holds h @ w_hh.T + b_hh; becomes r, z, n, and acts[r, 3H:] w_hn h + b_hn."""
    T = acts.dtype.type
    one = T(1)
    for e in range(cuda.grid(1), hn.size, cuda.gridsize(1)):
        r = e // H
        j = e - r * H
        a = r * 4 * H + j
        x = r * 3 * H + j
        rr = one / (one + math.exp(-(acts[a] + xp[x])))
        z = one / (one + math.exp(-(acts[a + H] + xp[x + H])))
        hpn = acts[a + 2 * H]
        n = math.tanh(xp[x + 2 * H] + rr * hpn)
        acts[a] = rr
        acts[a + H] = z
        acts[a + 2 * H] = n
        acts[a + 3 * H] = hpn
        hn[e] = (one - z) * n + z * h[e]


@kernel("aaaaaai")
def _gru_bwd(acts, h, ghn, gxp, ghp, gh, H):
    T = acts.dtype.type
    one = T(1)
    for e in range(cuda.grid(1), h.size, cuda.gridsize(1)):
        r = e // H
        j = e - r * H
        a = r * 4 * H + j
        x = r * 3 * H + j
        rr = acts[a]
        z = acts[a + H]
        n = acts[a + 2 * H]
        hpn = acts[a + 3 * H]
        g = ghn[e]
        dn = g * (one - z) * (one - n * n)
        dr = dn * hpn * rr * (one - rr)
        dz = g * (h[e] - n) * z * (one - z)
        gxp[x] = dr
        gxp[x + H] = dz
        gxp[x + 2 * H] = dn
        ghp[x] = dr
        ghp[x + H] = dz
        ghp[x + 2 * H] = dn * rr
        gh[e] = g * z


def _gates(kind, w_hh):
    G = KINDS[kind]
    H = w_hh.shape[1]
    if w_hh.shape[0] != G * H:
        raise ValueError(f"{kind}: w_hh has {w_hh.shape[0]} rows, expected {G} x {H}")
    return G, H


def cell_step(kind, xp, h, c, w_hh, b_hh=None, order="ifog"):
    """(h', c' or None, acts): one step from the projected input xp [N, G*H]."""
    G, H = _gates(kind, w_hh)
    N = h.shape[0]
    W = {"rnn": H, "lstm": 5 * H, "gru": 4 * H}[kind]
    hn = empty((N, H), xp.dtype)
    acts = hn if kind == "rnn" else empty((N, W), xp.dtype)
    if N and H:
        gemm(Operand(h, H, 1), Operand(w_hh, H, 1), Operand(acts, W, 1), N, G * H, H,
             bias=b_hh, bias_mode=0 if b_hh is None else 2)
    if kind == "rnn":
        launch(_rnn_gates, hn.size, flat(hn), flat(xp))
        return hn, None, hn
    if kind == "lstm":
        cn = empty((N, H), xp.dtype)
        launch(_lstm_gates, hn.size, flat(acts), flat(xp), flat(c), flat(hn), flat(cn), H, *LSTM_BLOCKS[order])
        return hn, cn, acts
    launch(_gru_gates, hn.size, flat(acts), flat(xp), flat(h), flat(hn), H)
    return hn, None, acts


def cell_step_grads(kind, acts, ghn, gcn, h, c, w_hh, order="ifog"):
    """(gxp, ghp, gh, gc or None) of cell_step without its weight gradients (ghp: the
    recurrent pre-activation's gradient, gxp itself but for gru)."""
    G, H = _gates(kind, w_hh)
    N = h.shape[0]
    dt = acts.dtype
    gxp = empty((N, G * H), dt)
    ghp, gc = gxp, None
    if kind == "rnn":
        launch(_rnn_bwd, acts.size, flat(acts), flat(ghn), flat(gxp))
    elif kind == "lstm":
        gc = empty((N, H), dt)
        has = gcn is not None
        launch(_lstm_bwd, N * H, flat(acts), flat(c), flat(ghn), flat(gcn if has else ghn), int(has), flat(gxp),
               flat(gc), H, *LSTM_BLOCKS[order])
    if kind == "gru":
        ghp, gh = empty((N, G * H), dt), empty((N, H), dt)
        launch(_gru_bwd, N * H, flat(acts), flat(h), flat(ghn), flat(gxp), flat(ghp), flat(gh), H)
        matmul_rows(ghp, w_hh, gh, add=True)
    else:
        gh = matmul_rows(ghp, w_hh)
    return gxp, ghp, gh, gc


def cell_step_backward(kind, acts, ghn, gcn, h, c, w_hh, order="ifog", gw_hh=None, gb_hh=None,
                       accumulate=False, need_gb=True):
    """(gxp, gh, gc or None, gw_hh, gb_hh) of cell_step."""
    gxp, ghp, gh, gc = cell_step_grads(kind, acts, ghn, gcn, h, c, w_hh, order)
    gw, gb = weight_grad(ghp, h, gw_hh, gb_hh, need_gb, accumulate)
    return gxp, gh, gc, gw, gb


def cell_forward(kind, x, h, c, w_ih, w_hh, b_ih=None, b_hh=None, order="ifog"):
    return cell_step(kind, project(x, w_ih, b_ih), h, c, w_hh, b_hh, order)


def cell_backward(kind, acts, ghn, gcn, x, h, c, w_ih, w_hh, order="ifog", need_gx=True, gw_ih=None,
                  gw_hh=None):
    gxp, gh, gc, gwh, gbh = cell_step_backward(kind, acts, ghn, gcn, h, c, w_hh, order, gw_hh)
    gx, gwi, gbi = project_backward(gxp, x, w_ih, need_gx, gw_ih)
    return gx, gh, gc, gwi, gwh, gbi, gbh


# ---------------------------------------------------------------- attention over locations

@kernel("aaii")
def _att_tanh(u, pq, L, A):
    """u[n*L + l, k] = tanh(u + pq[n, k]): u holds W_feat f_l, pq W_query q + b."""
    for i in range(cuda.grid(1), u.size, cuda.gridsize(1)):
        r = i // A
        k = i - r * A
        u[i] = math.tanh(u[i] + pq[(r // L) * A + k])


@kernel("aaaai")
def _att_gpre(ge, ws, u, gpre, A):
    T = u.dtype.type
    for i in range(cuda.grid(1), u.size, cuda.gridsize(1)):
        r = i // A
        v = u[i]
        gpre[i] = ge[r] * ws[i - r * A] * (T(1) - v * v)


def attention_scores(feats, query, w_feat, w_query, bias, w_score):
    N, L, D = feats.shape
    A = w_feat.shape[0]
    pq = linear(query, w_query, bias)
    u = empty((N * L, A), feats.dtype)
    e = empty((N, L), feats.dtype)
    if N * L and A:
        gemm(Operand(feats, D, 1), Operand(w_feat, D, 1), Operand(u, A, 1), N * L, A, D)
        launch(_att_tanh, u.size, flat(u), flat(pq), L, A)
        gemm(Operand(u, A, 1), Operand(w_score, A, 1), Operand(e, 1, 1), N * L, 1, A)
    return softmax(e, 1), u


def attention_scores_backward(gweights, weights, u, feats, query, w_feat, w_query, w_score,
                              need_gfeats=True, need_gquery=True):
    N, L, D = feats.shape
    A = u.shape[1]
    ge = softmax_backward(gweights, weights, 1)
    gpre = empty((N * L, A), u.dtype)
    launch(_att_gpre, u.size, flat(ge), flat(w_score), flat(u), flat(gpre), A)
    gpq = reduce_axis(gpre.reshape((N, L, A)), 1)
    gf = matmul_rows(gpre, w_feat).reshape((N, L, D)) if need_gfeats else None
    gq = matmul_rows(gpq, w_query) if need_gquery else None
    gwf, gb = weight_grad(gpre, feats.reshape((N * L, D)))
    gwq, _ = weight_grad(gpq, query, need_gb=False)
    gws, _ = weight_grad(ge.reshape((N * L, 1)), u, need_gb=False)
    return gf, gq, gwf, gwq, gb, gws


# ---------------------------------------------------------------- soft and hard reads

@kernel("aaaii")
def _wsum(f, w, y, L, D):
    T = f.dtype.type
    for i in range(cuda.grid(1), y.size, cuda.gridsize(1)):
        n = i // D
        d = i - n * D
        s = T(0)
        for l in range(L):
            s += w[n * L + l] * f[(n * L + l) * D + d]
        y[i] = s


@kernel("aaaii")
def _wsum_gf(gy, w, gf, L, D):
    for i in range(cuda.grid(1), gf.size, cuda.gridsize(1)):
        r = i // D
        gf[i] = w[r] * gy[(r // L) * D + i - r * D]


@kernel("aaaii")
def _wsum_gw(gy, f, gw, L, D):
    T = f.dtype.type
    for r in range(cuda.grid(1), gw.size, cuda.gridsize(1)):
        n = r // L
        s = T(0)
        for d in range(D):
            s += f[r * D + d] * gy[n * D + d]
        gw[r] = s


def weighted_sum(feats, weights):
    N, L, D = feats.shape
    y = empty((N, D), feats.dtype)
    launch(_wsum, y.size, flat(feats), flat(weights), flat(y), L, D)
    return y


def weighted_sum_backward(gy, feats, weights):
    N, L, D = feats.shape
    gf, gw = empty(feats.shape, feats.dtype), empty((N, L), feats.dtype)
    launch(_wsum_gf, gf.size, flat(gy), flat(weights), flat(gf), L, D)
    launch(_wsum_gw, gw.size, flat(gy), flat(feats), flat(gw), L, D)
    return gf, gw


@kernel("alaii")
def _gather(f, ix, y, L, D):
    """y[n] = f[n, ix[n]]; NaN for an index outside [0, L) (the runtime's non-finite
    check then names the node: a device kernel cannot raise)."""
    T = f.dtype.type
    for i in range(cuda.grid(1), y.size, cuda.gridsize(1)):
        n = i // D
        k = ix[n]
        y[i] = f[(n * L + k) * D + i - n * D] if 0 <= k < L else T(np.nan)


@kernel("alaii")
def _gather_bwd(gy, ix, gf, L, D):
    for i in range(cuda.grid(1), gy.size, cuda.gridsize(1)):
        n = i // D
        k = ix[n]
        if 0 <= k < L:
            gf[(n * L + k) * D + i - n * D] = gy[i]


def gather_location(feats, index):
    N, L, D = feats.shape
    y = empty((N, D), feats.dtype)
    launch(_gather, y.size, flat(feats), flat(index), flat(y), L, D)
    return y


def gather_location_backward(gy, index, L):
    N, D = gy.shape
    gf = zeros((N, L, D), gy.dtype)
    launch(_gather_bwd, gy.size, flat(gy), flat(index), flat(gf), L, D)
    return gf


# ---------------------------------------------------------------- discrete choices

@kernel("auli")
def _sample(w, seed, out, L):
    """One thread per row: the CPU's draw (kernels/cpu/recurrent.py), step for step."""
    T = w.dtype.type
    zero = T(0)
    base = _mix(seed)
    for n in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        z = _mix(base + uint64(n))
        u = T(int32(z >> uint64(40))) * T(2.0 ** -24)
        tot = zero
        for l in range(L):
            v = w[n * L + l]
            if v > zero:
                tot += v
        pick = -1
        if tot > zero and tot < T(np.inf):
            thr = u * tot
            cum = zero
            for l in range(L):
                v = w[n * L + l]
                if v > zero:
                    cum += v
                    pick = l
                    if cum > thr:
                        break
        out[n] = pick


def sample_categorical(weights, seed):
    N, L = weights.shape
    out = empty(N, np.int64)
    launch(_sample, N, flat(weights), np.uint64(seed % 2 ** 64), out, L)
    return out


@kernel("alii")
def _argmax(x, out, K, I):
    """out[o, i] = the first k of the largest x[o, k, i]; a NaN is the largest."""
    for e in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        o = e // I
        base = o * K * I + e - o * I
        best = x[base]
        pick = 0
        if best == best:
            for k in range(1, K):
                v = x[base + k * I]
                if v > best or v != v:
                    best = v
                    pick = k
                    if v != v:
                        break
        out[e] = pick


def argmax(x, axis=-1):
    axis %= x.ndim
    O, K, I = math.prod(x.shape[:axis]), x.shape[axis], math.prod(x.shape[axis + 1:])
    out = empty(x.shape[:axis] + x.shape[axis + 1:], np.int64)
    if K:
        launch(_argmax, out.size, flat(x), flat(out), K, I)
    return out
