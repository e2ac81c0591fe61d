"""The CPU target: binds each IR operator to its Numba kernel.

The bindings both targets share are written once in `runtime/bindings.py` and
registered here with the CPU kernel module (through `_Kernels`, which gives it the
CUDA module's names and signatures where they differ, structural kernels in numpy
among them). What is bound here is only what the CPU does its own way: losses with
host scalars. Elementwise operators (and fused chains of them) are generated, not
listed here.
"""
from __future__ import annotations

import numpy as np

from netdsl.kernels import cpu as K
from netdsl.kernels.cpu.dense import embedding_backward
from netdsl.kernels.cpu.loss import scalar

from . import scan
from .bindings import register, registrar

KERNELS = {}
kernel = registrar(KERNELS)


# ---- structural kernels in numpy, under the CUDA module's names and signatures

def concat(xs, axis):
    return np.concatenate(xs, axis=axis)


def transpose(x, perm):
    return np.ascontiguousarray(x.transpose(perm))


def split(x, sizes, axis):
    return [np.ascontiguousarray(p) for p in np.split(x, np.cumsum(sizes)[:-1], axis=axis)]


def slice_(x, index):
    return np.ascontiguousarray(x[index])


def slice_backward(g, shape, index):
    gx = np.zeros(shape, g.dtype)
    gx[index] = g
    return gx


def sum_to(g, shape):
    """Undo broadcasting: sum leading axes away, then every axis where `shape` has 1."""
    lead = g.ndim - len(shape)
    g = g.sum(axis=tuple(range(lead))) if lead else g
    axes = tuple(i for i, (a, b) in enumerate(zip(g.shape, shape)) if b == 1 and a != 1)
    return np.ascontiguousarray(g.sum(axis=axes, keepdims=True) if axes else g)


def softmax(x, axis, log=False):
    z = x - x.max(axis=axis, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=axis, keepdims=True))
    return z - lse if log else np.exp(z - lse)


def softmax_backward(gy, y, axis, log=False):
    if log:
        return gy - np.exp(y) * gy.sum(axis=axis, keepdims=True)
    return y * (gy - (gy * y).sum(axis=axis, keepdims=True))


def embedding(w, ids):
    return w[ids]


def one_hot(ids, classes):
    return np.eye(classes, dtype=np.float32)[ids]


def pad(x, axis, before, after):
    widths = [(0, 0)] * x.ndim
    widths[axis % x.ndim] = (before, after)
    return np.pad(x, widths)


def _adaptive_cells(size, out):
    """torch's adaptive pooling windows: cell i covers [floor(i*size/out), ceil((i+1)*size/out))."""
    return [(i * size // out, -(-(i + 1) * size // out)) for i in range(out)]


def adaptive_avgpool2d(x, size):
    N, C, H, W = x.shape
    h, w = size
    y = np.empty((N, C, h, w), x.dtype)
    for i, (r0, r1) in enumerate(_adaptive_cells(H, h)):
        for j, (c0, c1) in enumerate(_adaptive_cells(W, w)):
            y[:, :, i, j] = x[:, :, r0:r1, c0:c1].mean(axis=(2, 3))
    return y


def adaptive_avgpool2d_backward(gy, xshape):
    N, C, H, W = xshape
    h, w = gy.shape[2:]
    gx = np.zeros(xshape, gy.dtype)
    for i, (r0, r1) in enumerate(_adaptive_cells(H, h)):
        for j, (c0, c1) in enumerate(_adaptive_cells(W, w)):
            gx[:, :, r0:r1, c0:c1] += (gy[:, :, i, j] / gy.dtype.type((r1 - r0) * (c1 - c0)))[:, :, None, None]
    return gx


def bed_of_nails(x, s):
    N, C, H, W = x.shape
    y = np.zeros((N, C, H * s, W * s), x.dtype)
    y[:, :, ::s, ::s] = x
    return y


def bed_of_nails_backward(gy, s):
    return np.ascontiguousarray(gy[:, :, ::s, ::s])


class _Kernels:
    """`netdsl.kernels.cpu` as the shared bindings call it: the CUDA module's names and
    signatures where the two differ, everything else passed straight through."""

    def __getattr__(self, name):
        return getattr(K, name)

    zeros = staticmethod(np.zeros)
    full = staticmethod(np.full)
    to_device = staticmethod(lambda x, dtype=None: x)      # (the host's arrays are the CPU's)
    concat = staticmethod(concat)
    transpose = staticmethod(transpose)
    split = staticmethod(split)
    slice_ = staticmethod(slice_)
    slice_backward = staticmethod(slice_backward)
    sum_to = staticmethod(sum_to)
    softmax = staticmethod(softmax)
    softmax_backward = staticmethod(softmax_backward)
    embedding = staticmethod(embedding)
    embedding_backward = staticmethod(embedding_backward)
    one_hot = staticmethod(one_hot)
    pad = staticmethod(pad)
    adaptive_avgpool2d = staticmethod(adaptive_avgpool2d)
    adaptive_avgpool2d_backward = staticmethod(adaptive_avgpool2d_backward)
    bed_of_nails = staticmethod(bed_of_nails)
    bed_of_nails_backward = staticmethod(bed_of_nails_backward)

    @staticmethod
    def conv_transpose2d_backward(*args, need_gb=True, **kw):
        return K.conv_transpose2d_backward(*args, **kw)

    @staticmethod
    def global_maxpool2d(x):
        return K.maxpool2d(x, x.shape[2:], 1, 0)

    @staticmethod
    def maxpool2d_backward(gy, switches, xshape, kernel_size=None, stride=None, pad=0, ceil_mode=False, out=None):
        return K.maxpool2d_backward(gy, switches, xshape, out)   # (the switches alone locate the maxima)


register(KERNELS, _Kernels(), "CPU")
scan.bind(KERNELS, "cpu", scan.CpuArrays)


# ---- losses (a loss node's output is a 0-d array)

def _ce_2d(logits, labels):
    """Cross-entropy over [N, C], [N, C, H, W] or [N, T, C]: move classes last, rows flat."""
    if logits.ndim == 3:
        return logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), None
    if logits.ndim == 4:
        N, C, H, W = logits.shape
        return np.ascontiguousarray(logits.transpose(0, 2, 3, 1)).reshape(-1, C), labels.reshape(-1), (N, H, W, C)
    return logits, labels, None


@kernel("cross_entropy", writes="new")
def cross_entropy(n, x, st):
    z, y, _ = _ce_2d(x[0], x[1])
    loss, probs = K.softmax_cross_entropy(z, y, n.attrs["ignore_index"])
    st.saved[id(n)] = probs
    return [np.asarray(loss)]


@kernel("cross_entropy_grad", writes="new")
def cross_entropy_grad(n, x, st):
    gl, logits, labels = x[0], x[1], x[2]
    _, y, nhwc = _ce_2d(logits, labels)
    gz = K.softmax_cross_entropy_backward(st.saved[id(n.fwd)], y, n.attrs["ignore_index"], scalar(gl))
    if nhwc is not None:
        gz = np.ascontiguousarray(gz.reshape(nhwc).transpose(0, 3, 1, 2))
    return [gz.reshape(logits.shape)]


# ---- REINFORCE (ops/policy.py): a surrogate loss from host scalars

@kernel("reinforce", writes="new")
def reinforce(n, x, st):
    logp, reward = x
    b = st.params[n.params["baseline"].name]
    R = -float(reward)
    adv = R - float(b[0])
    st.saved[id(n)] = adv
    if st.train:
        d = n.attrs["decay"]
        b[0] = d * b[0] + (1 - d) * R
    return [np.asarray(-adv * logp.mean(dtype=np.float64), dtype=logp.dtype)]


@kernel("reinforce_grad", writes="new")
def reinforce_grad(n, x, st):
    g, logp = x[0], x[1]
    return [np.full(logp.shape, -st.saved[id(n.fwd)] * scalar(g) / logp.size, logp.dtype)]

