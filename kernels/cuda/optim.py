"""Optimiser updates on the device, one kernel per parameter tensor.

The per-element rules are kernels/update.py's, shared with the CPU kernels.
"""
from __future__ import annotations

import math

import numpy as np
from numba import cuda

from ..update import adam_rule, sgd_rule
from . import TPB_RED, device, flat, kernel, launch, tree_sum


_sgd_rule = device(sgd_rule)
_adam_rule = device(adam_rule)


@kernel("aaaffffii")
def _sgd(p, g, buf, lr, momentum, undamped, weight_decay, first, nesterov):
    for i in range(cuda.grid(1), p.size, cuda.gridsize(1)):
        p[i], b = _sgd_rule(p[i], g[i], buf[i], lr, momentum, undamped, weight_decay, first, nesterov)
        if momentum != 0:     # without momentum buf is a stand-in (p itself)
            buf[i] = b


@kernel("aaaaffffffff")
def _adam(p, g, m, v, step_size, c1, beta2, c2, bc2_sqrt, eps, weight_decay, decay):
    for i in range(cuda.grid(1), p.size, cuda.gridsize(1)):
        p[i], m[i], v[i] = _adam_rule(p[i], g[i], m[i], v[i], step_size, c1, beta2, c2, bc2_sqrt, eps,
                                      weight_decay, decay)


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
    launch(_sgd, p.size, flat(p), flat(g), flat(buf), t(lr), t(momentum), t(1 - dampening), t(weight_decay),
           int(first), int(nesterov))


def adam_update(p, g, m, v, step_size, beta1, beta2, bc2_sqrt, eps, weight_decay, decay):
    t = np.dtype(p.dtype).type
    launch(_adam, p.size, flat(p), flat(g), flat(m), flat(v), t(step_size), t(1 - beta1), t(beta2), t(1 - beta2),
           t(bc2_sqrt), t(eps), t(weight_decay), t(decay))


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
