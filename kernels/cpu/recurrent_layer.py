"""A scan whose step is one fused LSTM cell reading the scanned sequence (a recurrent
layer: charlm's fused stack), run over all T steps in one kernel call per direction
(Numba, CPU) instead of a step program and its bindings per time step.

The step is recurrent.py's cell_step and cell_step_grads: the same GEMM split, the same
gate rows (_lstm_gates, _lstm_grad_row), so a layer gives what T cell steps give. What
the loop saves is the Python of the per-step programs, a new buffer per step (and its
page faults), and the copies into the scan's kept buffers: the forward writes what the
backward reads straight into the [T, ...] buffers it keeps.

  lstm_layer_forward(xp[N, T, 4H], h0, c0, w_hh, b_hh, order, hx=None)
      -> (hs [N, T, H], h_T, c_T, saved): xp is the input projection of every step
      (x W_ih^T + b_ih, one GEMM before); hx [T, N, H + D] (training): h_{t-1} is written
      into hx[t, :, :H] (x_t being in hx[t, :, H:]), the rows of the weight gradients'
      one GEMM; saved (training, else None) is what lstm_layer_backward reads.
  lstm_layer_backward(saved, ghs [N, T, H] or None, gh_T or None, gc_T or None, w_hh, order)
      -> (gxp [T, N, 4H], gh0, gc0): gxp the gradient of the projected input (and of
      h @ w_hh.T + b_hh: they share it) at every step, time-major.
"""
import numpy as np

from . import kernel, prange
from .gemm import N_, T_, gemm as _gemm
from .recurrent import LSTM_BLOCKS, _f, _bias, _gates, _hh_fwd, _hh_share, _lstm_gates, _lstm_grad_row, _threads, \
    transposed


def _fwd(xp, h0, c0, whh, bhh, hs, cs, acts, hx, keep, ki, gt, bo, bg, P):
    """cs [T + 1, N, H] (keep) or [2, N, H]: c_{t-1} at cs[t]; acts [T, N, 5H] (keep) or
    [1, N, 5H]; hx [T, N, H + D] (keep) or empty; ki [P, 4H] int32 scratch; gt [4H, N]."""
    N, T, G = xp.shape
    H = h0.shape[1]
    W = 5 * H
    u = np.uint64
    xf, hf, hsf, csf, af, wf, gtf = (xp.reshape(-1), h0.reshape(-1), hs.reshape(-1), cs.reshape(-1),
                                     acts.reshape(-1), whh.reshape(-1), gt.reshape(-1))
    hxf = hx.reshape(-1)
    D = hx.shape[2] - H if keep else 0
    oo, og = bo * H, bg * H
    c0f = c0.reshape(-1)
    for j in range(N * H):
        csf[u(j)] = c0f[u(j)]
    for t in range(T):
        a0 = t * N * W if keep else 0
        cp = (t if keep else t % 2) * N * H
        cq = (t + 1 if keep else (t + 1) % 2) * N * H
        for p in prange(P):     # split over w_hh's rows, so acts' columns: see _hh_share
            c0_, c1_ = _hh_share(p, P, G)
            if c1_ > c0_:
                if t == 0:
                    _hh_fwd(wf, hf, H, gtf, af[a0:], W, xf, T * G, bhh, c0_, c1_, N, H, G)
                else:
                    _hh_fwd(wf, hsf[(t - 1) * H:], T * H, gtf, af[a0:], W, xf[t * G:], T * G, bhh, c0_, c1_, N, H, G)
        for p in prange(P):
            k = ki[p]
            for n in range(p * N // P, (p + 1) * N // P):
                q = n * T * H + t * H
                _lstm_gates(af, a0 + n * W, csf, cp + n * H, csf, cq + n * H, hsf, q, H, oo, og, k)
                if keep and t + 1 < T:
                    r = ((t + 1) * N + n) * (H + D)
                    for j in range(H):
                        hxf[u(r + j)] = hsf[u(q + j)]
    return hs


def _bwd(acts, cs, ghs, has_ghs, wt, gxp, gh, gca, gcb, gt, bo, bg, P):
    """From t = T-1 down to 0: the gates' gradient of step t into gxp[t] (gh: the gradient
    reaching h_t, gca / gcb: c_t's, swapped each step), then gh = gxp[t] @ w_hh (from
    wt = w_hh.T, as recurrent._hh_grad) + ghs[:, t-1]. Returns the buffer holding c_0's."""
    T, N, W = acts.shape
    H = W // 5
    G = 4 * H
    u = np.uint64
    af, csf, gsf, wtf, xf, ghf, gtf = (acts.reshape(-1), cs.reshape(-1), ghs.reshape(-1), wt.reshape(-1),
                                       gxp.reshape(-1), gh.reshape(-1), gt.reshape(-1))
    oo, og = bo * H, bg * H
    src, dst = gca.reshape(-1), gcb.reshape(-1)
    for t in range(T - 1, -1, -1):
        for p in prange(P):
            for n in range(p * N // P, (p + 1) * N // P):
                r = t * N + n
                _lstm_grad_row(af, r * W, csf, r * H, ghf, n * H, src, True, xf, r * G, dst, n * H, H, oo, og)
        src, dst = dst, src
        for p in prange(P):     # thread p: a share of wt's rows, so of gh's columns
            h0, h1 = p * H // P, (p + 1) * H // P
            if h1 > h0:
                _gemm(h1 - h0, N, G, wtf[h0 * G:], G, N_, xf[t * N * G:], G, T_, gtf[h0 * N:], 0.0)
                for j0 in range(h0, h1, 16):    # 16 of gt's rows at a time: its reads stay in L1
                    j1 = min(j0 + 16, h1)
                    for n in range(N):
                        for j in range(j0, j1):
                            v = gtf[u(j * N + n)]
                            if has_ghs and t > 0:
                                v += gsf[u(n * T * H + (t - 1) * H + j)]
                            ghf[u(n * H + j)] = v
    return src


_fwd, _bwd = kernel(_fwd), kernel(_bwd)


def lstm_layer_forward(xp, h0, c0, w_hh, b_hh=None, order="ifog", hx=None):
    """(hs, h_T, c_T, saved or None); see the module doc."""
    dt = xp.dtype
    _, H = _gates("lstm", w_hh)
    xp, h0, c0, w_hh, b_hh = _f(xp, dt), _f(h0, dt), _f(c0, dt), _f(w_hh, dt), _bias(b_hh, 4 * H, dt)
    N, T, _ = xp.shape
    keep = hx is not None
    hs = np.empty((N, T, H), dt)
    cs = np.empty((T + 1 if keep else 2, N, H), dt)
    acts = np.empty((T if keep else 1, N, 5 * H), dt)
    fn, P = _threads(_fwd, N * 4 * H * (H + 8), N)
    if keep:
        hx[0, :, :H] = h0
    fn(xp, h0, c0, w_hh, b_hh, hs, cs, acts, hx if keep else np.empty((0, 0, 0), dt), keep,
       np.empty((P, 4 * H), np.int32), np.empty((4 * H, N), dt), *LSTM_BLOCKS[order], P)
    c_T = cs[T if keep else T % 2].copy()
    h_T = np.ascontiguousarray(hs[:, T - 1]) if T else h0.copy()
    return hs, h_T, c_T, ((acts, cs) if keep else None)


def lstm_layer_backward(saved, ghs, gh_T, gc_T, w_hh, order="ifog"):
    """(gxp [T, N, 4H], gh0, gc0); see the module doc."""
    acts, cs = saved
    dt = acts.dtype
    T, N, W = acts.shape
    H = W // 5
    gh = np.zeros((N, H), dt) if gh_T is None else np.array(gh_T, dt)
    has = ghs is not None
    if has and T:
        ghs = _f(ghs, dt)
        gh += ghs[:, T - 1]
    gca = np.zeros((N, H), dt) if gc_T is None else np.array(gc_T, dt)
    gxp = np.empty((T, N, 4 * H), dt)
    fn, P = _threads(_bwd, N * 4 * H * (H + 8), H)
    gc = fn(acts, cs, ghs if has else np.empty((0, 0, 0), dt), has, transposed(_f(w_hh, dt)), gxp, gh, gca,
            np.empty((N, H), dt), np.empty((H, N), dt), *LSTM_BLOCKS[order], P)
    return gxp, gh, gc.reshape(N, H)
