"""Fully connected layer y = x @ w.T + b, threads split the batch rows (or the columns);
and the backward of an embedding (a linear layer on one-hot rows)."""
import numpy as np

from . import as_float, kernel, njit, prange
from .gemm import N_, T_, gemm as _gemm


def _fwd(x, w, b, y, T):
    """Thread t takes a share of the batch rows, or of the output columns when there are
    fewer rows than columns (a batch of tens: a row share would make every thread stream
    all of w). A row share starts its rows from the bias and adds the GEMM to them (beta 1):
    no pass over y follows, and w is read as it is (np.dot of w.T was twice as slow)."""
    N, K = x.shape
    M = w.shape[0]
    u = np.uint64
    xf, wf, yf = x.reshape(-1), w.reshape(-1), y.reshape(-1)
    for t in prange(T):
        if N >= M:
            n0, n1 = t * N // T, (t + 1) * N // T
            if n1 > n0:
                for r in range(n0, n1):
                    for m in range(M):
                        yf[u(r * M + m)] = b[u(m)]
                if K > 0 and M > 0:
                    _gemm(n1 - n0, M, K, xf[n0 * K:], K, N_, wf, K, T_, yf[n0 * M:], 1.0)
        else:
            m0, m1 = t * M // T, (t + 1) * M // T
            if m1 > m0:
                _gemm(N, m1 - m0, K, xf, K, N_, wf[m0 * K:], K, T_, yf[m0:], 0.0, M)
                for i in range(N):
                    for m in range(m0, m1):
                        y[i, m] += b[m]
    return y


def _bwd(x, w, gy, gx, gw, T, need_gx):
    """gw[m0:m1] = gy[:, m0:m1].T @ x and gx = gy @ w for thread t's share of gw's rows
    and of gx's rows (or columns, with fewer rows than columns): no two threads write the
    same element."""
    N, K = x.shape
    M = w.shape[0]
    gyf, xf, gwf, wf = gy.reshape(-1), x.reshape(-1), gw.reshape(-1), w.reshape(-1)
    for t in prange(T):
        m0, m1 = t * M // T, (t + 1) * M // T
        if m1 > m0:
            _gemm(m1 - m0, K, N, gyf[m0:], M, T_, xf, K, N_, gwf[m0 * K:], 0.0)
        if need_gx:
            if N >= K:
                n0, n1 = t * N // T, (t + 1) * N // T
                if n1 > n0:
                    np.dot(gy[n0:n1], w, gx[n0:n1])
            else:
                k0, k1 = t * K // T, (t + 1) * K // T
                if k1 > k0:
                    _gemm(N, k1 - k0, M, gyf, M, N_, wf[k0:], K, N_, gx.reshape(-1)[k0:], 0.0, K)
    return gx


def _emb_bwd(gy, ids, gw):
    """gw[ids[r]] += gy[r] in row order (np.add.at's), serially: rows of one id collide."""
    R, D = gy.shape
    u = np.uint64
    gf, wf = gy.reshape(-1), gw.reshape(-1)
    for r in range(R):
        b = ids[r] * D
        for d in range(D):
            wf[u(b + d)] += gf[u(r * D + d)]
    return gw


_fwd = kernel(_fwd)
_bwd = kernel(_bwd)
_emb_bwd = njit(_emb_bwd)


def linear(x, w, b=None):
    """y[N, M] = x[N, K] @ w[M, K].T + b[M]."""
    x = as_float(x)
    w = np.ascontiguousarray(w, dtype=x.dtype)
    b = np.zeros(w.shape[0], x.dtype) if b is None else np.ascontiguousarray(b, dtype=x.dtype)
    y = np.empty((x.shape[0], w.shape[0]), x.dtype)
    fn, T = _fwd.pick(x.shape[0] * w.size)
    return fn(x, w, b, y, min(T, max(1, x.shape[0], w.shape[0])))


def linear_backward(x, w, gy, need_gx=True, gw_out=None):
    """(gx[N, K], gw[M, K], gb[M]); gx is None when not requested; gw goes into gw_out
    when given (the caller's gradient buffer)."""
    x = as_float(x)
    w = np.ascontiguousarray(w, dtype=x.dtype)
    gy = np.ascontiguousarray(gy, dtype=x.dtype)
    fn, T = _bwd.pick(x.shape[0] * w.size)
    gx = np.empty(x.shape if need_gx else (0, 0), x.dtype)
    gw = np.empty(w.shape, x.dtype) if gw_out is None else gw_out
    fn(x, w, gy, gx, gw, T, need_gx)
    return (gx if need_gx else None), gw, gy.sum(axis=0)


def embedding_backward(gy, ids, wshape):
    """The gradient of w[ids] for w of shape wshape, given gy [..., D] (np.add.at's sums,
    in its order, about 20x faster)."""
    V, D = wshape
    ids = np.asarray(ids, np.int64).reshape(-1)
    if ids.size and (ids.min() < -V or ids.max() >= V):
        raise IndexError(f"embedding: an index outside [{-V}, {V})")
    gy = np.ascontiguousarray(gy).reshape(-1, D)
    return _emb_bwd(gy, np.where(ids < 0, ids + V, ids), np.zeros(wshape, gy.dtype))
