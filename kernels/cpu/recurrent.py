"""Recurrent cells, attention over locations, sampling and argmax (Numba, CPU).

Arrays are C-contiguous float32 or float64 (the same dtype throughout a call); H is
the hidden size and G the gate count (KINDS: rnn 1, lstm 4, gru 3). Weights are in
torch's layout: w_ih [G*H, D], w_hh [G*H, H], b_ih and b_hh [G*H] or None (no bias).
`order` is lstm_cell's gate order of the weight rows: "ifog" (the notes') or "ifgo"
(torch's); rnn and gru ignore it.

A cell is split in two so that a time loop can project the input of every step with
one GEMM before the loop (x [N, T, D] seen as [N*T, D] rows) and run only the
recurrent part per step:

  project(x[R, D], w_ih, b_ih) -> xp[R, G*H]                  x @ w_ih.T + b_ih
  project_backward(gxp[R, G*H], x[R, D], w_ih, need_gx=True, gw=None, gb=None,
                   accumulate=False) -> (gx[R, D] or None, gw_ih, gb_ih)

  cell_step(kind, xp[N, G*H], h[N, H], c, w_hh, b_hh, order="ifog") -> (h', c', acts)
      one step from the projected input: the GEMM h @ w_hh.T and the gates in one
      kernel, split over rows. c and c' are None but for lstm. acts is what the
      backward reads (rnn: h' itself; lstm [N, 5H]: the activated gates in the
      weights' row order, then tanh(c'); gru [N, 4H]: r, z, n, then w_hn h + b_hn).
  cell_step_grads(kind, acts, gh', gc' or None, h, c, w_hh, order="ifog")
      -> (gxp, ghp, gh, gc or None): the same without the weight gradients; ghp is the
      gradient of h @ w_hh.T + b_hh (gxp but for gru), for w_hh's gradient of all time
      steps as one weight_grad(ghp rows, h rows) after the loop.
  transposed_weights(w_hh list): a context in which cell_step_grads forms gh from a
      transposed copy of each w_hh made once (a scan's backward over T steps).
  gate_grads_into(w_hh, out): the next lstm (or rnn) cell_step_grads with w_hh writes
      gxp into out (a time slice of a scan's buffer) instead of a new array.
  cell_step_backward(kind, acts, gh'[N, H], gc' or None, h, c, w_hh, order="ifog",
                     gw_hh=None, gb_hh=None, accumulate=False)
      -> (gxp[N, G*H], gh[N, H], gc or None, gw_hh, gb_hh)
      gxp is the gradient of the projected input (feed it to project_backward, one
      step's rows or all steps' at once). accumulate: add into the given gw_hh and
      gb_hh (summing over time steps) instead of writing them.

  cell_forward(kind, x, h, c, w_ih, w_hh, b_ih, b_hh, order="ifog") -> (h', c', acts)
  cell_backward(kind, acts, gh', gc', x, h, c, w_ih, w_hh, order="ifog", need_gx=True,
                gw_ih=None, gw_hh=None) -> (gx, gh, gc, gw_ih, gw_hh, gb_ih, gb_hh)
      the whole cell (project + cell_step); gw_ih / gw_hh: buffers to write into.

Attention over L locations of feats [N, L, D] (Xu et al. 2015's f_att):

  attention_scores(feats, query[N, Q], w_feat[A, D], w_query[A, Q], bias[A], w_score[1, A])
      -> (weights[N, L], u[N*L, A])      u = tanh(W_feat f_l + W_query q + b), kept for:
  attention_scores_backward(gweights, weights, u, feats, query, w_feat, w_query, w_score,
                            need_gfeats=True, need_gquery=True)
      -> (gfeats, gquery, gw_feat, gw_query, gbias, gw_score)
  weighted_sum(feats, weights[N, L]) -> [N, D];  weighted_sum_backward(gy, feats, weights)
      -> (gfeats, gweights)
  gather_location(feats, index i64[N]) -> [N, D];  gather_location_backward(gy, index, L)
      -> gfeats; an index outside [0, L) raises IndexError (the binding locates it).

Discrete choices (no gradient):

  sample_categorical(weights[N, L], seed) -> i64[N]
      inverse CDF: row n draws u = (top 24 bits of splitmix64(splitmix64(seed) + n)) / 2**24
      (dropout's counter hash, rand.py) and picks the first l whose running sum of the
      positive weights exceeds u * their total, summed in the weights' dtype in IEEE
      order; so a seed draws the same indices on every run and on CUDA. Non-positive
      (and NaN) weights are never drawn; a row with no positive finite total gives -1.
  argmax(x, axis) -> i64: the first largest entry (a NaN counts as the largest, as in
      numpy and torch).
"""
from contextlib import contextmanager

import numpy as np

from . import Kernel, kernel, njit, prange
from .dense import linear
from .gemm import N_, T_, gemm as _gemm
from .rand import mix
from .vmath import vsigmoid, vtanh

KINDS = {"rnn": 1, "lstm": 4, "gru": 3}
LSTM_BLOCKS = {"ifog": (2, 3), "ifgo": (3, 2)}     # order -> (row block of o, row block of g)


# ---------------------------------------------------------------- GEMMs split over threads

def _rows_gemm(g, w, y, add, T):
    """y[R, K] = g[R, M] @ w[M, K] (+ y when add): thread t takes a share of the rows,
    or of the columns when there are more of those (then each streams only its part of w)."""
    R, M = g.shape
    K = w.shape[1]
    gf, wf, yf = g.reshape(-1), w.reshape(-1), y.reshape(-1)
    beta = 1.0 if add else 0.0
    for t in prange(T):
        if R >= K:
            r0, r1 = t * R // T, (t + 1) * R // T
            if r1 > r0 and K > 0:
                _gemm(r1 - r0, K, M, gf[r0 * M:], M, N_, wf, K, N_, yf[r0 * K:], beta)
        else:
            k0, k1 = t * K // T, (t + 1) * K // T
            if k1 > k0 and R > 0:
                _gemm(R, k1 - k0, M, gf, M, N_, wf[k0:], K, N_, yf[k0:], beta, K)
    return y


def _wgrad(g, a, gw, gb, accumulate, T):
    """gw[M, K] (+)= g[R, M].T @ a[R, K] and gb[M] (+)= the column sums of g (gb of size
    0: not wanted): thread t takes a share of gw's rows, so no two write one element."""
    R, M = g.shape
    K = a.shape[1]
    u = np.uint64
    gf, af, gwf = g.reshape(-1), a.reshape(-1), gw.reshape(-1)
    beta = 1.0 if accumulate else 0.0
    for t in prange(T):
        m0, m1 = t * M // T, (t + 1) * M // T
        if m1 > m0:
            if R > 0 and K > 0:
                _gemm(m1 - m0, K, R, gf[m0:], M, T_, af, K, N_, gwf[m0 * K:], beta)
            elif not accumulate:
                gw[m0:m1] = 0
            if gb.size:     # rows outer: the inner loop runs along memory (flat, unsigned: vectorised)
                if not accumulate:
                    gb[m0:m1] = 0
                for r in range(R):
                    for m in range(m0, m1):
                        gb[u(m)] += gf[u(r * M + m)]
    return gw


_rows_gemm = kernel(_rows_gemm)
_wgrad = kernel(_wgrad)


def _threads(k: Kernel, size, rows):
    fn, T = k.pick(size)
    return fn, min(T, max(1, rows))


def _f(a, dtype):
    return np.ascontiguousarray(a, dtype=dtype)


def _bias(b, n, dtype):
    return np.zeros(n, dtype) if b is None else _f(b, dtype)


def matmul_rows(g, w, out=None, add=False):
    """g[R, M] @ w[M, K], written into out when given (added to it with add)."""
    g = _f(g, g.dtype)
    w = _f(w, g.dtype)
    y = np.empty((g.shape[0], w.shape[1]), g.dtype) if out is None else out
    fn, T = _threads(_rows_gemm, g.size * w.shape[1], max(g.shape[0], w.shape[1]))
    return fn(g, w, y, add, T)


def weight_grad(g, a, gw=None, gb=None, need_gb=True, accumulate=False):
    """(g.T @ a, column sums of g): written into gw / gb when given, or added to them
    with accumulate (then both must be given)."""
    g, a = _f(g, g.dtype), _f(a, g.dtype)
    M, K = g.shape[1], a.shape[1]
    if accumulate and (gw is None or (need_gb and gb is None)):
        raise ValueError("weight_grad: accumulate needs the gradients to add to")
    gw = np.empty((M, K), g.dtype) if gw is None else gw
    gb = (np.empty(M, g.dtype) if gb is None else gb) if need_gb else np.empty(0, g.dtype)
    fn, T = _threads(_wgrad, g.size * K, M)
    fn(g, a, gw, gb, accumulate, T)
    return gw, (gb if need_gb else None)


# ---------------------------------------------------------------- the input projection

def project(x, w_ih, b_ih=None):
    """xp[R, G*H] = x[R, D] @ w_ih.T + b_ih."""
    return linear(x, w_ih, b_ih)


def project_backward(gxp, x, w_ih, need_gx=True, gw=None, gb=None, accumulate=False):
    """(gx[R, D] or None, gw_ih, gb_ih) of project, given the gradient of its output."""
    dt = gxp.dtype
    x, w_ih = _f(x, dt), _f(w_ih, dt)
    gx = matmul_rows(gxp, w_ih) if need_gx else None
    gw, gb = weight_grad(gxp, x, gw, gb, True, accumulate)
    return gx, gw, gb


# ---------------------------------------------------------------- one step from the projected input

@njit
def _hh_share(t, T, cols):
    """Thread t's columns of the step's GEMM h @ w_hh.T: with a batch of tens of rows, a
    share of the rows would make every thread stream all of w_hh."""
    return t * cols // T, (t + 1) * cols // T


def _hh_grad(gf, gs, wt, gt, gh, add, T):
    """gh[N, H] (+)= g[N, G*H] @ w_hh, formed as wt @ g.T from wt = w_hh.T [H, G*H]
    (transposed_weights) into gt [H, N], then transposed into gh: OpenBLAS packs the
    weight faster as that left operand (1.55 against 2.0 ms at N 64, H 512, one thread;
    bench_rnn.py gemm). Thread t takes a share of wt's rows, so of gh's columns. gf: g
    flat, its rows gs apart."""
    N, H = gh.shape
    K = wt.shape[1]
    u = np.uint64
    wf, tf, hf = wt.reshape(-1), gt.reshape(-1), gh.reshape(-1)
    for t in prange(T):
        h0, h1 = t * H // T, (t + 1) * H // T
        if h1 > h0:
            _gemm(h1 - h0, N, K, wf[h0 * K:], K, N_, gf, gs, T_, tf[h0 * N:], 0.0)
            for j0 in range(h0, h1, 16):    # 16 of gt's rows at a time: its reads stay in L1
                j1 = min(j0 + 16, h1)
                for n in range(N):
                    for j in range(j0, j1):
                        v = tf[u(j * N + n)]
                        hf[u(n * H + j)] = hf[u(n * H + j)] + v if add else v
    return gh


# Below, every loop over a row indexes flat views through np.uint64 (as vmath.py does):
# with signed 2-D indices Numba keeps a negative-index select that stops LLVM vectorising
# (the LSTM backward's loop was all scalar: 3.1 ns a cell). xp is a flat view of the
# projected input whose rows are xs apart (a time slice of [N, T, G*H], not copied).

def _rnn_fwd(xp, xs, h, whh, bhh, hn, gt, T):
    """hn = h @ w_hh.T + xp + b_hh first (_hh_fwd), then tanh a row at a time."""
    N, H = h.shape
    hf, wf, yf = h.reshape(-1), whh.reshape(-1), hn.reshape(-1)
    for t in prange(T):     # split over w_hh's rows, so hn's columns: see _hh_share
        c0, c1 = _hh_share(t, T, 1 * H)
        if c1 > c0:
            _hh_fwd(wf, hf, gt.reshape(-1), yf, H, xp, xs, bhh, c0, c1, N, H, H)
    for t in prange(T):
        n0, n1 = t * N // T, (t + 1) * N // T
        if n1 > n0:
            ki = np.empty(2 * H, np.int32)
            for r in range(n0, n1):
                vtanh(yf, r * H, H, ki)
    return hn


def _rnn_bwd(acts, ghn, gxp, T):
    """gxp = gh' * (1 - h'^2) (the pre-activation's gradient, input and recurrent alike)."""
    N, H = acts.shape
    u = np.uint64
    one = acts.dtype.type(1)
    af, gf, xf = acts.reshape(-1), ghn.reshape(-1), gxp.reshape(-1)
    for t in prange(T):
        for k in range(t * N // T * H, (t + 1) * N // T * H):
            y = af[u(k)]
            xf[u(k)] = gf[u(k)] * (one - y * y)
    return gxp


@njit
def _hh_fwd(wf, hf, gf, af, W, xp, xs, bhh, c0, c1, N, H, a1):
    """acts[:, c0:c1] = (h @ w_hh.T)[:, c0:c1] + xp + b_hh (the adds only in columns
    below a1: gru's n block takes its GEMM alone), the GEMM formed as w_hh[c0:c1] @ h.T
    into gt [G*H, N] and transposed into acts with the adds: OpenBLAS packs the weight
    faster as the left operand (as in _hh_grad: the GEMM 1.53 against 1.67 ms at N 64,
    H 512, one thread; the transposed add costs 0.05 ms)."""
    u = np.uint64
    zero = af.dtype.type(0)
    _gemm(c1 - c0, N, H, wf[c0 * H:], H, N_, hf, H, T_, gf[c0 * N:], 0.0)
    for n in range(N):      # the adds first, along rows (vectorised), then the transposed GEMM
        b, x = n * W, n * xs
        for k in range(c0, c1):
            af[u(b + k)] = xp[u(x + k)] + bhh[u(k)] if k < a1 else zero
    for k0 in range(c0, c1, 16):    # 16 of gt's rows at a time: its reads stay in L1
        k1 = min(k0 + 16, c1)
        for n in range(N):
            for k in range(k0, k1):
                af[u(n * W + k)] += gf[u(k * N + n)]


def _lstm_fwd(xp, xs, h, c, whh, bhh, acts, gt, hn, cn, bo, bg, T):
    """acts[:, :4H] = h @ w_hh.T + xp + b_hh first (_hh_fwd), then the gates a row at a
    time, each activation one vectorised pass (vmath.py)."""
    N, H = h.shape
    W = 5 * H
    u = np.uint64
    hf, wf, af, cf = h.reshape(-1), whh.reshape(-1), acts.reshape(-1), c.reshape(-1)
    hnf, cnf = hn.reshape(-1), cn.reshape(-1)
    oo, og = bo * H, bg * H
    for t in prange(T):     # split over w_hh's rows, so acts' columns: see _hh_share
        c0, c1 = _hh_share(t, T, 4 * H)
        if c1 > c0:
            _hh_fwd(wf, hf, gt.reshape(-1), af, W, xp, xs, bhh, c0, c1, N, H, 4 * H)
    for t in prange(T):
        n0, n1 = t * N // T, (t + 1) * N // T
        if n1 > n0:
            ki = np.empty(4 * H, np.int32)
            for r in range(n0, n1):
                b, s = r * W, r * H
                vsigmoid(af, b, 2 * H, ki)          # i, f
                vsigmoid(af, b + oo, H, ki)         # o
                vtanh(af, b + og, H, ki)            # g
                for j in range(H):
                    c2 = af[u(b + H + j)] * cf[u(s + j)] + af[u(b + j)] * af[u(b + og + j)]
                    cnf[u(s + j)] = c2
                    af[u(b + 4 * H + j)] = c2
                vtanh(af, b + 4 * H, H, ki)         # tanh(c')
                for j in range(H):
                    hnf[u(s + j)] = af[u(b + oo + j)] * af[u(b + 4 * H + j)]
    return hn


def _lstm_bwd(acts, c, ghn, gcn, has_gc, xf, xs, gc, bo, bg, T):
    """xf: gxp flat, its rows xs apart (a time slice of a scan's buffer: gate_grads_into)."""
    N, H = c.shape
    u = np.uint64
    one = acts.dtype.type(1)
    af, cf, gf, gcf = acts.reshape(-1), c.reshape(-1), ghn.reshape(-1), gcn.reshape(-1)
    ocf = gc.reshape(-1)
    oo, og = bo * H, bg * H
    for t in prange(T):
        for r in range(t * N // T, (t + 1) * N // T):
            a, x, s = r * 5 * H, r * xs, r * H
            for j in range(H):
                i, f = af[u(a + j)], af[u(a + H + j)]
                o, g, tc = af[u(a + oo + j)], af[u(a + og + j)], af[u(a + 4 * H + j)]
                gh = gf[u(s + j)]
                dc = gh * o * (one - tc * tc)
                if has_gc:
                    dc += gcf[u(s + j)]
                xf[u(x + j)] = dc * g * i * (one - i)
                xf[u(x + H + j)] = dc * cf[u(s + j)] * f * (one - f)
                xf[u(x + oo + j)] = gh * tc * o * (one - o)
                xf[u(x + og + j)] = dc * i * (one - g * g)
                ocf[u(s + j)] = dc * f
    return xf


def _gru_fwd(xp, xs, h, whh, bhh, acts, gt, hn, T):
    """acts[:, :3H] = h @ w_hh.T (+ xp + b_hh in r and z) first (_hh_fwd), then r, z, n
    there and w_hn h + b_hn in acts[:, 3H:]."""
    N, H = h.shape
    one = acts.dtype.type(1)
    W = 4 * H
    u = np.uint64
    hf, wf, af, hnf = h.reshape(-1), whh.reshape(-1), acts.reshape(-1), hn.reshape(-1)
    for t in prange(T):     # split over w_hh's rows, so acts' columns: see _hh_share
        c0, c1 = _hh_share(t, T, 3 * H)
        if c1 > c0:
            _hh_fwd(wf, hf, gt.reshape(-1), af, W, xp, xs, bhh, c0, c1, N, H, 2 * H)
    for t in prange(T):
        n0, n1 = t * N // T, (t + 1) * N // T
        if n1 > n0:
            ki = np.empty(4 * H, np.int32)
            for r in range(n0, n1):
                b, x, s = r * W, r * xs, r * H
                vsigmoid(af, b, 2 * H, ki)          # r, z
                for j in range(H):
                    hpn = af[u(b + 2 * H + j)] + bhh[u(2 * H + j)]
                    af[u(b + 3 * H + j)] = hpn
                    af[u(b + 2 * H + j)] = xp[u(x + 2 * H + j)] + af[u(b + j)] * hpn
                vtanh(af, b + 2 * H, H, ki)         # n
                for j in range(H):
                    z = af[u(b + H + j)]
                    hnf[u(s + j)] = (one - z) * af[u(b + 2 * H + j)] + z * hf[u(s + j)]
    return hn


def _gru_bwd(acts, h, ghn, gxp, ghp, gh, T):
    """gxp (input side) and ghp (recurrent side) differ only in the n block: r * dn_pre.
    gh gets the direct term z * gh'; the caller adds ghp @ w_hh."""
    N, H = h.shape
    u = np.uint64
    one = acts.dtype.type(1)
    af, hf, gf = acts.reshape(-1), h.reshape(-1), ghn.reshape(-1)
    xf, pf, ohf = gxp.reshape(-1), ghp.reshape(-1), gh.reshape(-1)
    for t in prange(T):
        for r in range(t * N // T, (t + 1) * N // T):
            a, x, s = r * 4 * H, r * 3 * H, r * H
            for j in range(H):
                rr, z = af[u(a + j)], af[u(a + H + j)]
                n, hpn = af[u(a + 2 * H + j)], af[u(a + 3 * H + j)]
                g = gf[u(s + j)]
                dn = g * (one - z) * (one - n * n)
                dr = dn * hpn * rr * (one - rr)
                dz = g * (hf[u(s + j)] - n) * z * (one - z)
                xf[u(x + j)], xf[u(x + H + j)], xf[u(x + 2 * H + j)] = dr, dz, dn
                pf[u(x + j)], pf[u(x + H + j)], pf[u(x + 2 * H + j)] = dr, dz, dn * rr
                ohf[u(s + j)] = g * z
    return gxp


_hh_grad = kernel(_hh_grad)
_rnn_fwd, _rnn_bwd = kernel(_rnn_fwd), kernel(_rnn_bwd)
_lstm_fwd, _lstm_bwd = kernel(_lstm_fwd), kernel(_lstm_bwd)
_gru_fwd, _gru_bwd = kernel(_gru_fwd), kernel(_gru_bwd)


def _gates(kind, w_hh):
    G = KINDS[kind]
    H = w_hh.shape[1]
    if w_hh.shape[0] != G * H:
        raise ValueError(f"{kind}: w_hh has {w_hh.shape[0]} rows, expected {G} x {H}")
    return G, H


def _row_view(a, dt):
    """(flat view of a [R, K] from its first element, the distance between its rows): a
    time slice x[:, t] of [N, T, K] is read in place; any other layout is copied first."""
    isz = np.dtype(dt).itemsize
    if a.dtype != dt or a.ndim != 2 or a.shape[0] == 0 or a.strides[1] != isz or a.strides[0] % isz \
            or a.strides[0] < a.shape[1] * isz:
        a = np.ascontiguousarray(a, dt)
    if a.flags.c_contiguous:
        return a.reshape(-1), a.shape[1]
    xs = a.strides[0] // isz
    return np.lib.stride_tricks.as_strided(a, ((a.shape[0] - 1) * xs + a.shape[1],), (isz,)), xs


def cell_step(kind, xp, h, c, w_hh, b_hh=None, order="ifog"):
    """(h', c' or None, acts): one step from the projected input xp [N, G*H] (its rows
    contiguous; a time slice of [N, T, G*H] is read without a copy)."""
    dt = xp.dtype
    G, H = _gates(kind, w_hh)
    (xp, xs), h, w_hh, b_hh = _row_view(xp, dt), _f(h, dt), _f(w_hh, dt), _bias(b_hh, G * H, dt)
    N = h.shape[0]
    hn = np.empty((N, H), dt)
    size = N * G * H * (H + 8)
    if kind == "rnn":
        fn, T = _threads(_rnn_fwd, size, N)
        fn(xp, xs, h, w_hh, b_hh, hn, np.empty((H, N), dt), T)
        return hn, None, hn
    if kind == "lstm":
        acts, cn = np.empty((N, 5 * H), dt), np.empty((N, H), dt)
        fn, T = _threads(_lstm_fwd, size, N)
        fn(xp, xs, h, _f(c, dt), w_hh, b_hh, acts, np.empty((4 * H, N), dt), hn, cn, *LSTM_BLOCKS[order], T)
        return hn, cn, acts
    acts = np.empty((N, 4 * H), dt)
    fn, T = _threads(_gru_fwd, size, N)
    fn(xp, xs, h, w_hh, b_hh, acts, np.empty((3 * H, N), dt), hn, T)
    return hn, None, acts


_WT: dict = {}     # id(w_hh) -> (w_hh, w_hh.T contiguous) while transposed_weights is open


def _transpose(a, out, T):
    """out = a.T for a [M, K], in 32 x 32 tiles (a tile's rows of both stay in L1), thread
    t taking a share of a's row tiles: np.ascontiguousarray(w.T) of the char LSTM's
    [2048, 512] w_hh took 3.8 ms a training step."""
    M, K = a.shape
    u = np.uint64
    af, of = a.reshape(-1), out.reshape(-1)
    nb = (M + 31) // 32
    for t in prange(T):
        for b in range(t * nb // T, (t + 1) * nb // T):
            m0, m1 = b * 32, min(b * 32 + 32, M)
            for k0 in range(0, K, 32):
                for k in range(k0, min(k0 + 32, K)):
                    for m in range(m0, m1):
                        of[u(k * M + m)] = af[u(m * K + k)]
    return out


_transpose = kernel(_transpose)


def transposed(a):
    """a.T of a 2-D array, C-contiguous."""
    out = np.empty((a.shape[1], a.shape[0]), a.dtype)
    fn, T = _threads(_transpose, a.size, max(1, a.shape[0] // 32))
    return fn(np.ascontiguousarray(a), out, T)


@contextmanager
def transposed_weights(ws):
    """While open, cell_step_grads multiplies by a transposed copy of each w_hh in ws,
    made once here (see _hh_grad) instead of by w_hh itself at every time step. The
    caller guarantees that the weights do not change while it is open (a scan's
    backward: the optimiser steps after it)."""
    mine = []
    for w in ws:
        if w is not None and w.ndim == 2 and w.flags.c_contiguous and id(w) not in _WT:
            _WT[id(w)] = (w, transposed(w))
            mine.append(id(w))
    try:
        yield
    finally:
        for k in mine:
            del _WT[k]


def _recurrent_grad(ghp, w_hh, gh=None):
    """gh (+)= ghp @ w_hh: through w_hh's transposed copy when transposed_weights holds
    one (gh given: added to it); ghp's rows may lie at a stride (gate_grads_into)."""
    got = _WT.get(id(w_hh))
    if got is None or got[0] is not w_hh or ghp.dtype != w_hh.dtype:
        return matmul_rows(ghp, w_hh, gh, add=gh is not None)
    N, H = ghp.shape[0], w_hh.shape[1]
    out = np.empty((N, H), ghp.dtype) if gh is None else gh
    fn, T = _threads(_hh_grad, ghp.size * H, H)
    gf, gs = _row_view(ghp, ghp.dtype)
    return fn(gf, gs, got[1], np.empty((H, N), ghp.dtype), out, gh is not None, T)


_INTO: dict = {}    # id(w_hh) -> (w_hh, out): where the next cell_step_grads writes gxp


def gate_grads_into(w_hh, out):
    """The next cell_step_grads of an lstm cell with this w_hh writes gxp into out
    ([N, 4H], its rows contiguous at any distance apart: a time slice of a scan's
    buffer) and returns it, instead of a new array that the scan then copies there
    (52 MB a char-LSTM step); an rnn cell too where out is C-contiguous. out None:
    forget it."""
    if out is None:
        _INTO.pop(id(w_hh), None)
    else:
        _INTO[id(w_hh)] = (w_hh, out)


def _into(w_hh, shape, dt):
    """gate_grads_into's buffer for this w_hh if it fits (else None), consumed."""
    got = _INTO.pop(id(w_hh), None)
    if got is None or got[0] is not w_hh:
        return None
    o, isz = got[1], np.dtype(dt).itemsize
    if o.dtype != dt or o.shape != shape or o.strides[1] != isz or o.strides[0] % isz or o.strides[0] < shape[1] * isz:
        return None
    return o


def cell_step_grads(kind, acts, ghn, gcn, h, c, w_hh, order="ifog"):
    """(gxp, ghp, gh, gc or None) of cell_step without its weight gradients: ghp is the
    gradient of the recurrent pre-activation h @ w_hh.T + b_hh (gxp itself but for gru),
    so that a time loop can form w_hh's gradient of all steps as one GEMM."""
    dt = acts.dtype
    G, H = _gates(kind, w_hh)
    into = _into(w_hh, (h.shape[0], G * H), dt)
    ghn, h, w_hh = _f(ghn, dt), _f(h, dt), _f(w_hh, dt)
    N = h.shape[0]
    if into is not None and not (kind == "lstm" or kind == "rnn" and into.flags.c_contiguous):
        into = None     # (the rnn kernel writes whole rows only; gru keeps two gradients)
    gxp = np.empty((N, G * H), dt) if into is None else into
    ghp, gc = gxp, None
    fn, T = _threads(_rnn_bwd if kind == "rnn" else _lstm_bwd if kind == "lstm" else _gru_bwd, N * G * H * 8, N)
    if kind == "rnn":
        fn(acts, ghn, gxp, T)
    elif kind == "lstm":
        gc = np.empty((N, H), dt)
        has = gcn is not None
        xf, xs = _row_view(gxp, dt)
        fn(acts, _f(c, dt), ghn, _f(gcn, dt) if has else ghn, has, xf, xs, gc, *LSTM_BLOCKS[order], T)
    if kind == "gru":
        ghp, gh = np.empty((N, G * H), dt), np.empty((N, H), dt)
        fn(acts, h, ghn, gxp, ghp, gh, T)       # gh = z * gh', then
        _recurrent_grad(ghp, w_hh, gh)          # + ghp @ w_hh
    else:
        gh = _recurrent_grad(ghp, w_hh)
    return gxp, ghp, gh, gc


def cell_step_backward(kind, acts, ghn, gcn, h, c, w_hh, order="ifog", gw_hh=None, gb_hh=None,
                       accumulate=False, need_gb=True):
    """(gxp, gh, gc or None, gw_hh, gb_hh) of cell_step; see the module doc."""
    gxp, ghp, gh, gc = cell_step_grads(kind, acts, ghn, gcn, h, c, w_hh, order)
    gw, gb = weight_grad(ghp, _f(h, acts.dtype), gw_hh, gb_hh, need_gb, accumulate)
    return gxp, gh, gc, gw, gb


def cell_forward(kind, x, h, c, w_ih, w_hh, b_ih=None, b_hh=None, order="ifog"):
    """(h', c' or None, acts): the whole cell, the input projection then cell_step."""
    xp = project(x, w_ih, b_ih)
    return cell_step(kind, xp, h, c, w_hh, b_hh, order)


def cell_backward(kind, acts, ghn, gcn, x, h, c, w_ih, w_hh, order="ifog", need_gx=True, gw_ih=None,
                  gw_hh=None):
    """(gx or None, gh, gc or None, gw_ih, gw_hh, gb_ih, gb_hh) of cell_forward."""
    gxp, gh, gc, gwh, gbh = cell_step_backward(kind, acts, ghn, gcn, h, c, w_hh, order, gw_hh)
    gx, gwi, gbi = project_backward(gxp, x, w_ih, need_gx, gw_ih)
    return gx, gh, gc, gwi, gwh, gbi, gbh


# ---------------------------------------------------------------- attention over locations

def _att_fwd(f, q, wf, wq, b, ws, u, pq, a, T):
    """u = tanh(f @ w_feat.T + q @ w_query.T + b) (the GEMMs write u and pq, the loop
    finishes them), scores e = u . w_score, a = softmax of e over the L locations."""
    N, L, D = f.shape
    A, Q = wf.shape[0], q.shape[1]
    ff, qf, wff, wqf = f.reshape(-1), q.reshape(-1), wf.reshape(-1), wq.reshape(-1)
    uf, pqf = u.reshape(-1), pq.reshape(-1)
    zero, low = a.dtype.type(0), a.dtype.type(-np.inf)
    for t in prange(T):
        n0, n1 = t * N // T, (t + 1) * N // T
        if n1 > n0:
            _gemm(n1 - n0, A, Q, qf[n0 * Q:], Q, N_, wqf, Q, T_, pqf[n0 * A:], 0.0)
            _gemm((n1 - n0) * L, A, D, ff[n0 * L * D:], D, N_, wff, D, T_, uf[n0 * L * A:], 0.0)
            for n in range(n0, n1):
                m = low
                for l in range(L):
                    r = n * L + l
                    e = zero
                    for k in range(A):
                        v = np.tanh(u[r, k] + pq[n, k] + b[k])
                        u[r, k] = v
                        e += v * ws[k]
                    a[n, l] = e
                    m = max(m, e)
                s = zero
                for l in range(L):
                    e = np.exp(a[n, l] - m)
                    a[n, l] = e
                    s += e
                for l in range(L):
                    a[n, l] /= s
    return a


def _att_bwd(ga, a, u, ws, ge, gpre, gpq, T):
    """Through the softmax (ge), the score (w_score) and tanh: gpre [N*L, A] is the
    gradient of W_feat f_l + W_query q + b; gpq its sum over locations."""
    N, L = a.shape
    A = u.shape[1]
    zero, one = a.dtype.type(0), a.dtype.type(1)
    for t in prange(T):
        for n in range(t * N // T, (t + 1) * N // T):
            s = zero
            for l in range(L):
                s += ga[n, l] * a[n, l]
            for k in range(A):
                gpq[n, k] = zero
            for l in range(L):
                r = n * L + l
                g = a[n, l] * (ga[n, l] - s)
                ge[r, 0] = g
                for k in range(A):
                    v = u[r, k]
                    d = g * ws[k] * (one - v * v)
                    gpre[r, k] = d
                    gpq[n, k] += d
    return gpre


_att_fwd, _att_bwd = kernel(_att_fwd), kernel(_att_bwd)


def attention_scores(feats, query, w_feat, w_query, bias, w_score):
    """(weights [N, L], u [N*L, A]): additive attention, softmax over the L locations."""
    dt = feats.dtype
    f, q = _f(feats, dt), _f(query, dt)
    N, L, _ = f.shape
    A = w_feat.shape[0]
    u, pq, a = np.empty((N * L, A), dt), np.empty((N, A), dt), np.empty((N, L), dt)
    fn, T = _threads(_att_fwd, u.size * (f.shape[2] + 4), N)
    fn(f, q, _f(w_feat, dt), _f(w_query, dt), _bias(bias, A, dt), _f(w_score, dt).reshape(-1), u, pq, a, T)
    return a, u


def attention_scores_backward(gweights, weights, u, feats, query, w_feat, w_query, w_score,
                              need_gfeats=True, need_gquery=True):
    """(gfeats or None, gquery or None, gw_feat, gw_query, gbias, gw_score)."""
    dt = weights.dtype
    f, q = _f(feats, dt), _f(query, dt)
    N, L, D = f.shape
    A = u.shape[1]
    ge, gpre, gpq = np.empty((N * L, 1), dt), np.empty((N * L, A), dt), np.empty((N, A), dt)
    fn, T = _threads(_att_bwd, u.size * 4, N)
    fn(_f(gweights, dt), weights, u, _f(w_score, dt).reshape(-1), ge, gpre, gpq, T)
    wf, wq = _f(w_feat, dt), _f(w_query, dt)
    gf = matmul_rows(gpre, wf).reshape(N, L, D) if need_gfeats else None
    gq = matmul_rows(gpq, wq) if need_gquery else None
    gwf, gb = weight_grad(gpre, f.reshape(N * L, D))
    gwq, _ = weight_grad(gpq, q, need_gb=False)
    gws, _ = weight_grad(ge, u, need_gb=False)
    return gf, gq, gwf, gwq, gb, gws


# ---------------------------------------------------------------- soft and hard reads

def _wsum(f, w, y, T):
    N, L, D = f.shape
    zero = y.dtype.type(0)
    for t in prange(T):
        for n in range(t * N // T, (t + 1) * N // T):
            for d in range(D):
                y[n, d] = zero
            for l in range(L):
                a = w[n, l]
                for d in range(D):
                    y[n, d] += a * f[n, l, d]
    return y


def _wsum_bwd(gy, f, w, gf, gw, T):
    N, L, D = f.shape
    zero = gy.dtype.type(0)
    for t in prange(T):
        for n in range(t * N // T, (t + 1) * N // T):
            for l in range(L):
                a = w[n, l]
                s = zero
                for d in range(D):
                    g = gy[n, d]
                    gf[n, l, d] = a * g
                    s += f[n, l, d] * g
                gw[n, l] = s
    return gf


_wsum, _wsum_bwd = kernel(_wsum), kernel(_wsum_bwd)


def weighted_sum(feats, weights):
    """y[n] = sum over l of weights[n, l] * feats[n, l]: [N, L, D], [N, L] -> [N, D]."""
    dt = feats.dtype
    f = _f(feats, dt)
    y = np.empty((f.shape[0], f.shape[2]), dt)
    fn, T = _threads(_wsum, f.size, f.shape[0])
    return fn(f, _f(weights, dt), y, T)


def weighted_sum_backward(gy, feats, weights):
    """(gfeats [N, L, D], gweights [N, L])."""
    dt = feats.dtype
    f = _f(feats, dt)
    gf, gw = np.empty(f.shape, dt), np.empty(f.shape[:2], dt)
    fn, T = _threads(_wsum_bwd, f.size, f.shape[0])
    fn(_f(gy, dt), f, _f(weights, dt), gf, gw, T)
    return gf, gw


def _check_index(index, L):
    bad = np.flatnonzero((index < 0) | (index >= L))
    if bad.size:
        raise IndexError(f"index[{bad[0]}] = {index[bad[0]]} is not a location in [0, {L})")


def gather_location(feats, index):
    """feats[n, index[n]]: [N, L, D], i64[N] -> [N, D]."""
    _check_index(index, feats.shape[1])
    return np.ascontiguousarray(feats[np.arange(feats.shape[0]), index])


def gather_location_backward(gy, index, L):
    """gfeats [N, L, D]: gy at each row's chosen location, zero elsewhere."""
    _check_index(index, L)
    gf = np.zeros((gy.shape[0], L, gy.shape[1]), gy.dtype)
    gf[np.arange(gy.shape[0]), index] = gy
    return gf


# ---------------------------------------------------------------- discrete choices

def _sample(w, seed, out):
    N, L = w.shape
    zero, inf = w.dtype.type(0), w.dtype.type(np.inf)
    base = mix(seed)
    for n in prange(N):
        z = mix(base + np.uint64(n))
        u = w.dtype.type(np.int32(z >> np.uint64(40))) * w.dtype.type(2.0 ** -24)
        tot = zero
        for l in range(L):
            if w[n, l] > zero:
                tot += w[n, l]
        pick = -1
        if tot > zero and tot < inf:
            thr = u * tot
            cum = zero
            for l in range(L):
                v = w[n, l]
                if v > zero:
                    cum += v
                    pick = l
                    if cum > thr:
                        break
        out[n] = pick
    return out


_sample = kernel(_sample, exact=True)     # IEEE order: the running sums are CUDA's, bit for bit


def sample_categorical(weights, seed):
    """i64[N]: one index per row of weights [N, L] drawn in proportion to its positive
    entries (see the module doc); -1 for a row with no positive finite total."""
    w = weights if weights.dtype in (np.float32, np.float64) else weights.astype(np.float32)
    w = np.ascontiguousarray(w)
    out = np.empty(w.shape[0], np.int64)
    return _sample(w.size, w, np.uint64(seed % 2 ** 64), out)


def argmax(x, axis=-1):
    """i64 index of the first largest entry along axis (a NaN is the largest)."""
    return np.argmax(x, axis=axis).astype(np.int64)
