"""Fully connected layer y = x @ w.T + b, threads split the batch rows."""
import numpy as np

from . import as_float, kernel, prange
from .gemm import N_, T_, gemm as _gemm


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
    """gw[m0:m1] = gy[:, m0:m1].T @ x and gx[n0:n1] = gy[n0:n1] @ w for thread t's share
    of gw's rows and of the batch: no two threads write the same element."""
    N, K = x.shape
    M = w.shape[0]
    gyf, xf, gwf = gy.reshape(-1), x.reshape(-1), gw.reshape(-1)
    for t in prange(T):
        m0, m1 = t * M // T, (t + 1) * M // T
        if m1 > m0:
            _gemm(m1 - m0, K, N, gyf[m0:], M, T_, xf, K, N_, gwf[m0 * K:], 0.0)
        n0, n1 = t * N // T, (t + 1) * N // T
        if need_gx and n1 > n0:
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
