"""Sum and mean over several axes, and their adjoint (the CPU twins of
kernels/cuda/tensor.py's reduce_axes / expand_axes). NumPy's reductions are enough:
these are small in the networks that use them (a global pool, a loss's mean)."""
import math

import numpy as np


def reduce_axes(x, axes, mean=False, keepdims=False):
    axes = tuple(sorted({a % x.ndim for a in axes}))
    y = np.sum(x, axis=axes, keepdims=keepdims)
    if mean:
        y = y * x.dtype.type(1.0 / math.prod(x.shape[a] for a in axes))
    # (np.ascontiguousarray makes a reduction over every axis 1-d: a loss must stay 0-d)
    return np.ascontiguousarray(y, x.dtype).reshape(y.shape)


def expand_axes(g, shape, axes, scale=1.0):
    """g repeated along the reduced axes of `shape`, times scale."""
    axes = {a % len(shape) for a in axes}
    g = g.reshape(tuple(1 if i in axes else d for i, d in enumerate(shape)))
    if scale != 1.0:
        g = g * g.dtype.type(scale)
    return np.ascontiguousarray(np.broadcast_to(g, shape)).reshape(shape)
