"""Optimiser updates on the device, one kernel per parameter tensor.

The arithmetic is `netdsl.runtime.optim`'s (torch.optim's single-tensor path),
operation for operation, with hyper-parameters cast to the parameter dtype.
"""
from __future__ import annotations

import math

import numpy as np
from numba import cuda

from . import TPB_RED, flat, kernel, launch, tree_sum


@kernel("aaaffffii")
def _sgd(p, g, buf, lr, momentum, dampening, weight_decay, first, nesterov):
    for i in range(cuda.grid(1), p.size, cuda.gridsize(1)):
        d = g[i]
        if weight_decay != 0:
            d = d + weight_decay * p[i]
        if momentum != 0:
            if first:
                b = d
            else:
                b = buf[i] * momentum + (p.dtype.type(1) - dampening) * d
            buf[i] = b
            d = d + momentum * b if nesterov else b
        p[i] = p[i] - lr * d


@kernel("aaaaffffffi")
def _adam(p, g, m, v, step_size, beta1, beta2, bc2_sqrt, eps, weight_decay, decoupled):
    """weight_decay here is wd for L2 (added to g), or lr*wd for decoupled (AdamW)."""
    T = p.dtype.type
    for i in range(cuda.grid(1), p.size, cuda.gridsize(1)):
        d = g[i]
        if weight_decay != 0:
            if decoupled:
                p[i] = p[i] * (T(1) - weight_decay)
            else:
                d = d + weight_decay * p[i]
        mi = m[i] + (T(1) - beta1) * (d - m[i])
        vi = v[i] * beta2 + (T(1) - beta2) * (d * d)
        m[i] = mi
        v[i] = vi
        p[i] = p[i] - step_size * (mi / (math.sqrt(vi) / bc2_sqrt + eps))


@kernel("aa")
def _sumsq(x, out):
    """out[0] += sum of squares of x (atomically, one partial per block)."""
    T = x.dtype.type
    sh = cuda.shared.array(TPB_RED, x.dtype)
    t = cuda.threadIdx.x
    acc = T(0)
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        acc += x[i] * x[i]
    sh[t] = acc
    tree_sum(sh, t)
    if t == 0:
        cuda.atomic.add(out, 0, sh[0])


@kernel("af")
def _scale(x, c):
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        x[i] = x[i] * c


def sgd_update(p, g, buf, lr, momentum, dampening, weight_decay, first, nesterov):
    t = np.dtype(p.dtype).type
    launch(_sgd, p.size, flat(p), flat(g), flat(buf), t(lr), t(momentum), t(dampening), t(weight_decay),
           int(first), int(nesterov))


def adam_update(p, g, m, v, step_size, beta1, beta2, bc2_sqrt, eps, weight_decay, decoupled):
    t = np.dtype(p.dtype).type
    launch(_adam, p.size, flat(p), flat(g), flat(m), flat(v), t(step_size), t(beta1), t(beta2), t(bc2_sqrt),
           t(eps), t(weight_decay), int(decoupled))


def global_norm(arrays) -> float:
    """sqrt of the sum of squares of every array: one number comes down."""
    arrays = [a for a in arrays if a is not None]
    if not arrays:
        return 0.0
    out = cuda.to_device(np.zeros(1, arrays[0].dtype))
    for a in arrays:
        if a.size:
            _sumsq[min(1024, max(1, -(-a.size // TPB_RED))), TPB_RED](flat(a), out)
    return math.sqrt(float(out.copy_to_host()[0]))


def scale(a, c):
    launch(_scale, a.size, flat(a), np.dtype(a.dtype).type(c))
