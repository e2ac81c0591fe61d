"""Fully connected layer y = x @ w.T + b, threads split the batch rows."""
import numpy as np
from numba import prange

from . import as_float, kernel


def _fwd(x, w, b, y, T):
    N = x.shape[0]
    for t in prange(T):
        n0, n1 = t * N // T, (t + 1) * N // T
        if n1 > n0:
            yt = y[n0:n1]
            np.dot(x[n0:n1], w.T, yt)
            for i in range(n1 - n0):
                yt[i] += b
    return y


def _bwd(x, w, gy, gx, gw, T, need_gx):
    """gx = gy @ w; per-thread partial gw[t] = gy_t.T @ x_t (summed by the caller)."""
    N = x.shape[0]
    for t in prange(T):
        n0, n1 = t * N // T, (t + 1) * N // T
        if n1 > n0:
            np.dot(gy[n0:n1].T, x[n0:n1], gw[t])
            if need_gx:
                np.dot(gy[n0:n1], w, gx[n0:n1])
    return gx


_fwd = kernel(_fwd)
_bwd = kernel(_bwd)


def linear(x, w, b=None):
    """y[N, M] = x[N, K] @ w[M, K].T + b[M]."""
    x = as_float(x)
    w = np.ascontiguousarray(w, dtype=x.dtype)
    b = np.zeros(w.shape[0], x.dtype) if b is None else np.ascontiguousarray(b, dtype=x.dtype)
    y = np.empty((x.shape[0], w.shape[0]), x.dtype)
    fn, T = _fwd.pick(x.shape[0] * w.size)
    return fn(x, w, b, y, min(T, max(1, x.shape[0])))


def linear_backward(x, w, gy, need_gx=True):
    """(gx[N, K], gw[M, K], gb[M]); gx is None when not requested."""
    x = as_float(x)
    w = np.ascontiguousarray(w, dtype=x.dtype)
    gy = np.ascontiguousarray(gy, dtype=x.dtype)
    fn, T = _bwd.pick(x.shape[0] * w.size)
    T = min(T, max(1, x.shape[0]))
    gx = np.empty(x.shape if need_gx else (0, 0), x.dtype)
    gw = np.zeros((T,) + w.shape, x.dtype)
    fn(x, w, gy, gx, gw, T, need_gx)
    return (gx if need_gx else None), gw.sum(axis=0), gy.sum(axis=0)
