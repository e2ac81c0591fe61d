"""A recurrent layer over T steps in one kernel call each way (Numba, CPU): the lowering
of a scan whose step is one fused lstm_cell or rnn_cell reading the scanned sequence
(runtime/scan.py, plan.layer_cell).

It computes what T of recurrent.py's cell steps compute, in a feature-major layout that
needs no input projection, no adds and no transposes per step:

  hx  [H + D + 1, (T + 1) N]   column block t is [h_{t-1}; x_t; 1] for the N rows: the
                               forward writes h_t straight into block t + 1
  W   [G H, H + D + 1]         [w_hh | w_ih | b_ih + b_hh], an lstm's gate rows permuted so
                               that thread p's units' i, f, o, g rows are one block
  acts [T, 5H, N]              (lstm) W @ hx block t (one GEMM a step, the projection and
                               both biases in it), activated in place, then tanh(c_t); an
                               rnn's tanh goes straight into hx

so a thread's step is one GEMM into its own rows and the gates of its own units: one
parallel region a step. The backward is one region a step too (its units' rows of the
gradient reaching h_t, then their gates' gradient), leaves the gates' gradient of every
step as G [G H, T N], and all of W's gradient (biases included, through the row of ones)
is one GEMM G @ hx^T after the loop.

  layer_forward(kind, x[N, T, D], h0, c0 or None, w_ih, w_hh, b_ih, b_hh, order, keep)
      -> (hs [N, T, H], h_T, c_T or None, saved or None)
  layer_backward(saved, ghs [N, T, H] or None, gh_T or None, gc_T or None, need_gx)
      -> (gx [N, T, D] or None, gh0, gc0 or None, gw_ih, gw_hh, gb): gb the gradient of
      either bias
"""
import numpy as np

from . import kernel, prange
from .gemm import N_, T_, gemm as _gemm
from .recurrent import LSTM_BLOCKS, _f, _gates, _hh_share as _share, _threads
from .vmath import vsigmoid, vtanh

CHUNK = 16      # units a gate pass takes at a time: 16 x N values a block, in L1


def _fwd(w, hx, acts, cs, T, keep, ki, P):
    """Steps 0..T-1. hx [K, (T+1) N] holds block 0 and the x and ones rows; acts [T or 1,
    5H, N]; cs [T+1 or 2, H, N] with c_0 in cs[0]; h_t goes to hx block t + 1 (rows :H)."""
    H = cs.shape[1]
    N = cs.shape[2]
    K = w.shape[1]
    L = hx.shape[1]
    u = np.uint64
    wf, xf, af, cf = w.reshape(-1), hx.reshape(-1), acts.reshape(-1), cs.reshape(-1)
    for t in range(T):
        a0 = (t if keep else 0) * 5 * H * N
        cp = (t if keep else t % 2) * H * N
        cq = (t + 1 if keep else (t + 1) % 2) * H * N
        for p in prange(P):
            u0, u1 = _share(p, P, H)
            U = u1 - u0
            if U > 0:
                g0 = a0 + 4 * u0 * N       # this thread's gate rows: i, f, o, g blocks of U rows
                _gemm(4 * U, N, K, wf[4 * u0 * K:], K, N_, xf[t * N:], L, N_, af[g0:], 0.0)
                k = ki[p]
                for j0 in range(u0, u1, CHUNK):
                    j1 = min(j0 + CHUNK, u1)
                    m = (j1 - j0) * N
                    bi = g0 + (j0 - u0) * N
                    bf, bo, bg = bi + U * N, bi + 2 * U * N, bi + 3 * U * N
                    bc = a0 + (4 * H + j0) * N
                    vsigmoid(af, bi, m, k)
                    vsigmoid(af, bf, m, k)
                    vsigmoid(af, bo, m, k)
                    vtanh(af, bg, m, k)
                    c0, c1 = cp + j0 * N, cq + j0 * N
                    for e in range(m):
                        c2 = af[u(bf + e)] * cf[u(c0 + e)] + af[u(bi + e)] * af[u(bg + e)]
                        cf[u(c1 + e)] = c2
                        af[u(bc + e)] = c2
                    vtanh(af, bc, m, k)
                    for j in range(j0, j1):
                        r, s = (j - j0) * N, j * L + (t + 1) * N
                        for n in range(N):
                            xf[u(s + n)] = af[u(bo + r + n)] * af[u(bc + r + n)]
    return hx


def _bwd(wt, acts, cs, ghT, gca, gcb, gout, G, T, P):
    """For t = T-1 down to -1, one parallel region, thread p its units: first their rows
    of the gradient reaching h_t from step t + 1, ghT[t] += w_hh^T @ G block t + 1 (into
    gout at t = -1; this needs all of block t + 1, written in the region before), then
    the gates' gradient of step t into their rows of G's block t, and c's into the other
    of gca / gcb. ghT [T, H, N] holds the emits' gradients (and the final h's at T-1);
    wt = w[:, :H]^T [H, 4H]. Returns the buffer that holds c_0's gradient."""
    H = cs.shape[1]
    N = cs.shape[2]
    L = G.shape[1]
    u = np.uint64
    one = acts.dtype.type(1)
    af, cf, gf, wtf, Gf = acts.reshape(-1), cs.reshape(-1), ghT.reshape(-1), wt.reshape(-1), G.reshape(-1)
    src, dst = gca.reshape(-1), gcb.reshape(-1)
    for t in range(T - 1, -2, -1):
        a0, h0 = t * 5 * H * N, t * H * N
        for p in prange(P):
            u0, u1 = _share(p, P, H)
            U = u1 - u0
            if U > 0 and t + 1 < T:
                if t >= 0:
                    _gemm(U, N, 4 * H, wtf[u0 * 4 * H:], 4 * H, N_, Gf[(t + 1) * N:], L, N_, gf[h0 + u0 * N:], 1.0)
                else:
                    _gemm(U, N, 4 * H, wtf[u0 * 4 * H:], 4 * H, N_, Gf, L, N_, gout.reshape(-1)[u0 * N:], 0.0)
            for j in range(u0, u1 if t >= 0 else u0):
                r = j - u0
                ai = a0 + (4 * u0 + r) * N
                af_, ao, ag, ac = ai + U * N, ai + 2 * U * N, ai + 3 * U * N, a0 + (4 * H + j) * N
                gi = (4 * u0 + r) * L + t * N
                gfo, go, gg = gi + U * L, gi + 2 * U * L, gi + 3 * U * L
                s = j * N
                for n in range(N):
                    i, f = af[u(ai + n)], af[u(af_ + n)]
                    o, g, tc = af[u(ao + n)], af[u(ag + n)], af[u(ac + n)]
                    gh = gf[u(h0 + s + n)]
                    dc = gh * o * (one - tc * tc) + src[u(s + n)]
                    Gf[u(gi + n)] = dc * g * i * (one - i)
                    Gf[u(gfo + n)] = dc * cf[u(h0 + s + n)] * f * (one - f)
                    Gf[u(go + n)] = gh * tc * o * (one - o)
                    Gf[u(gg + n)] = dc * i * (one - g * g)
                    dst[u(s + n)] = dc * f
        if t >= 0:
            src, dst = dst, src
    return src


def _rnn_fwd(w, hx, T, ki, P):
    """The vanilla RNN's steps: h_t = tanh(W @ hx block t), written straight into block
    t + 1 (thread p its units' rows), where the backward reads it too."""
    H = w.shape[0]
    K = w.shape[1]
    L = hx.shape[1]
    N = L // (T + 1)
    wf, xf = w.reshape(-1), hx.reshape(-1)
    for t in range(T):
        for p in prange(P):
            u0, u1 = _share(p, P, H)
            if u1 > u0:
                o = u0 * L + (t + 1) * N
                _gemm(u1 - u0, N, K, wf[u0 * K:], K, N_, xf[t * N:], L, N_, xf[o:], 0.0, L)
                for j in range(u0, u1):
                    vtanh(xf, j * L + (t + 1) * N, N, ki[p])
    return hx


def _rnn_bwd(wt, hx, ghT, gout, G, T, P):
    """As _bwd for the vanilla RNN: thread p's rows of ghT[t] += w_hh^T @ G block t + 1,
    then G's block t = ghT[t] * (1 - h_t^2) in its rows."""
    H = ghT.shape[1]
    N = ghT.shape[2]
    L, LX = G.shape[1], hx.shape[1]
    u = np.uint64
    one = G.dtype.type(1)
    xf, gf, wtf, Gf = hx.reshape(-1), ghT.reshape(-1), wt.reshape(-1), G.reshape(-1)
    for t in range(T - 1, -2, -1):
        h0 = t * H * N
        for p in prange(P):
            u0, u1 = _share(p, P, H)
            U = u1 - u0
            if U > 0 and t + 1 < T:
                if t >= 0:
                    _gemm(U, N, H, wtf[u0 * H:], H, N_, Gf[(t + 1) * N:], L, N_, gf[h0 + u0 * N:], 1.0)
                else:
                    _gemm(U, N, H, wtf[u0 * H:], H, N_, Gf, L, N_, gout.reshape(-1)[u0 * N:], 0.0)
            for j in range(u0, u1 if t >= 0 else u0):
                a, g, s = j * LX + (t + 1) * N, j * L + t * N, h0 + j * N
                for n in range(N):
                    y = xf[u(a + n)]
                    Gf[u(g + n)] = gf[u(s + n)] * (one - y * y)
    return G


def _blocks(rows, blk, b, ld, into, P):
    """Between rows [N, T, F] and feature-major blocks: blk[t b + f ld + n] = rows[n, t, f]
    (into), or the other way; 16 features at a time (their rows stay in L1)."""
    N, T, F = rows.shape
    u = np.uint64
    rf = rows.reshape(-1)
    for t in prange(T):
        for f0 in range(0, F, 16):
            f1 = min(f0 + 16, F)
            for n in range(N):
                i, j = t * b + n, (n * T + t) * F
                if into:
                    for f in range(f0, f1):
                        blk[u(i + f * ld)] = rf[u(j + f)]
                else:
                    for f in range(f0, f1):
                        rf[u(j + f)] = blk[u(i + f * ld)]
    return blk


def _wgrad(G, hx, gw, P):
    """gw [4H, K] = G [4H, T N] @ hx[:, :T N]^T, thread p a share of the rows."""
    M, R = G.shape
    K, L = hx.shape
    Gf, xf, wf = G.reshape(-1), hx.reshape(-1), gw.reshape(-1)
    for p in prange(P):
        m0, m1 = p * M // P, (p + 1) * M // P
        if m1 > m0:
            _gemm(m1 - m0, K, R, Gf[m0 * R:], R, N_, xf, L, T_, wf[m0 * K:], 0.0)
    return gw


def _xgrad(G, w, H, D, gx, P):
    """gx rows (t, n) [T N, D] = G^T @ w[:, H:H+D], thread p a share of the rows."""
    M, R = G.shape
    K = w.shape[1]
    Gf, wf, of = G.reshape(-1), w.reshape(-1), gx.reshape(-1)
    for p in prange(P):
        r0, r1 = p * R // P, (p + 1) * R // P
        if r1 > r0:
            _gemm(r1 - r0, D, M, Gf[r0:], R, T_, wf[H:], K, N_, of[r0 * D:], 0.0)
    return gx


_fwd, _bwd, _rnn_fwd, _rnn_bwd, _wgrad, _xgrad, _blocks = (
    kernel(f) for f in (_fwd, _bwd, _rnn_fwd, _rnn_bwd, _wgrad, _xgrad, _blocks))


def _run(k, P, *args):
    """k's parallel copy for P > 1 threads, else its serial one."""
    return (k.parallel if P > 1 else k.serial)(*args, P)


def _perm(kind, H, P, order):
    """Gate row of W -> row of the cell's weights: thread p's units' i, f, o, g blocks
    (lstm; rnn: its units' rows, in order already)."""
    if kind == "rnn":
        return np.arange(H)
    bo, bg = LSTM_BLOCKS[order]
    rows = []
    for p in range(P):
        js = np.arange(p * H // P, (p + 1) * H // P)
        rows += [js, H + js, bo * H + js, bg * H + js]
    return np.concatenate(rows)


def layer_forward(kind, x, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None, order="ifog", keep=False):
    """(hs [N, T, H], h_T, c_T (None but for lstm), saved or None); see the module doc."""
    dt = x.dtype
    Gn, H = _gates(kind, w_hh)
    x = _f(x, dt)
    N, T, D = x.shape
    K = H + D + 1
    fn, P = _threads(_fwd if kind == "lstm" else _rnn_fwd, N * Gn * H * K, H)
    perm = _perm(kind, H, P, order)
    b = np.zeros(Gn * H, dt)
    for v in (b_ih, b_hh):
        if v is not None:
            b += v
    w = np.empty((Gn * H, K), dt)
    w[:, :H], w[:, H:H + D], w[:, H + D] = _f(w_hh, dt)[perm], _f(w_ih, dt)[perm], b[perm]
    L = (T + 1) * N
    hx = np.empty((K, L), dt)
    hx[:H, :N] = _f(h0, dt).T
    _run(_blocks, P, x, hx.reshape(-1)[H * L:], N, L, True)
    hx[H:H + D, T * N:] = 0
    hx[H + D] = 1
    ki = np.empty((P, 2 * CHUNK * N), np.int32)
    acts = cs = c_T = None
    if kind == "lstm":
        acts = np.empty((T if keep else 1, 5 * H, N), dt)
        cs = np.empty((T + 1 if keep else 2, H, N), dt)
        cs[0] = _f(c0, dt).T
        fn(w, hx, acts, cs, T, keep, ki, P)
        c_T = np.ascontiguousarray(cs[T if keep else T % 2].T)
    else:
        fn(w, hx, T, ki, P)
    hs = np.empty((N, T, H), dt)
    _run(_blocks, P, hs, hx.reshape(-1)[N:], N, L, False)
    h_T = np.ascontiguousarray(hx[:H, T * N:].T)
    return hs, h_T, c_T, ((kind, w, hx, acts, cs, perm, P, D, N, T) if keep else None)


def layer_backward(saved, ghs, gh_T=None, gc_T=None, need_gx=True):
    """(gx or None, gh0, gc0 (None but for lstm), gw_ih, gw_hh, gb); see the module doc."""
    kind, w, hx, acts, cs, perm, P, D, N, T = saved
    dt = w.dtype
    H = hx.shape[0] - D - 1
    ghT = np.zeros((T, H, N), dt) if ghs is None else _run(_blocks, P, _f(ghs, dt), np.empty(T * H * N, dt), H * N, N, True)
    ghT = ghT.reshape(T, H, N)
    if gh_T is not None and T:
        ghT[T - 1] += _f(gh_T, dt).T
    G = np.empty((w.shape[0], T * N), dt)
    gout = np.zeros((H, N), dt)
    wt = np.ascontiguousarray(w[:, :H].T)
    gc = None
    if kind == "lstm":
        gc = np.zeros((H, N), dt) if gc_T is None else np.ascontiguousarray(_f(gc_T, dt).T)
        gc = _run(_bwd, P, wt, acts, cs, ghT, gc, np.empty((H, N), dt), gout, G, T)
        gc = np.ascontiguousarray(gc.reshape(H, N).T)
    else:
        _run(_rnn_bwd, P, wt, hx, ghT, gout, G, T)
    gw = _run(_wgrad, P, G, hx, np.empty(w.shape, dt))
    inv = np.empty_like(perm)
    inv[perm] = np.arange(perm.size)
    gw = gw[inv]
    gx = None
    if need_gx:
        gx = _run(_xgrad, P, G, w, H, D, np.empty((T * N, D), dt))
        gx = np.ascontiguousarray(gx.reshape(T, N, D).transpose(1, 0, 2))
    return (gx, np.ascontiguousarray(gout.T), gc, np.ascontiguousarray(gw[:, H:H + D]),
            np.ascontiguousarray(gw[:, :H]), np.ascontiguousarray(gw[:, H + D]))
