"""The CPU target: binds each IR operator to its Numba kernel.

The bindings both targets share are written once in `runtime/bindings.py` and
registered here with the CPU kernel module (through `_Kernels`, which gives it the
CUDA module's signatures where they differ). What follows is only what the CPU
does its own way: numpy-based structural operators, losses with host scalars.
Elementwise operators (and fused chains of them) are generated, not listed here.
"""
from __future__ import annotations

import numpy as np

from netdsl.kernels import cpu as K

from .bindings import _dims, _index, _param, register, registrar

KERNELS = {}
kernel = registrar(KERNELS)


class _Kernels:
    """`netdsl.kernels.cpu` as the shared bindings call it: the CUDA module's names and
    signatures where the two differ, everything else passed straight through."""

    def __getattr__(self, name):
        return getattr(K, name)

    zeros = staticmethod(np.zeros)
    full = staticmethod(np.full)

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


# ---- upsampling

@kernel("bed_of_nails", writes="new")
def bed_of_nails(n, x, st):
    s = n.attrs["scale"]
    N, C, H, W = x[0].shape
    y = np.zeros((N, C, H * s, W * s), x[0].dtype)
    y[:, :, ::s, ::s] = x[0]
    return [y]


@kernel("bed_of_nails_grad")
def bed_of_nails_grad(n, x, st):
    s = n.attrs["scale"]
    return [np.ascontiguousarray(x[0][:, :, ::s, ::s])]


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
    gz = K.softmax_cross_entropy_backward(st.saved[id(n.fwd)], y, n.attrs["ignore_index"], float(gl))
    if nhwc is not None:
        gz = np.ascontiguousarray(gz.reshape(nhwc).transpose(0, 3, 1, 2))
    return [gz.reshape(logits.shape)]


# ---- structural operators

@kernel("transpose")
def transpose(n, x, st):
    return [np.ascontiguousarray(x[0].transpose(n.attrs["perm"]))]


@kernel("concat", writes="new")
def concat(n, x, st):
    return [np.concatenate(x, axis=n.attrs["axis"])]


@kernel("split")
def split(n, x, st):
    axis = n.attrs["axis"] % x[0].ndim
    sizes = _dims([v.shape[axis] for v in n.outputs], st)
    return [np.ascontiguousarray(p) for p in np.split(x[0], np.cumsum(sizes)[:-1], axis=axis)]


@kernel("slice")
def slice_(n, x, st):
    return [np.ascontiguousarray(x[0][_index(n)])]


@kernel("slice_grad", writes="new")
def slice_grad(n, x, st):
    g = np.zeros(st.shape_of(n.outputs[0]), x[0].dtype)
    g[_index(n.fwd)] = x[0]
    return [g]


@kernel("sum_to")
def sum_to(n, x, st):
    g = x[0]
    shape = st.shape_of(n.outputs[0])
    lead = g.ndim - len(shape)
    g = g.sum(axis=tuple(range(lead))) if lead else g
    axes = tuple(i for i, (a, b) in enumerate(zip(g.shape, shape)) if b == 1 and a != 1)
    return [np.ascontiguousarray(g.sum(axis=axes, keepdims=True) if axes else g)]


# softmax-family and reductions are small in the CNN classics; numpy is enough here

@kernel("softmax", "log_softmax", writes="new")
def softmax(n, x, st):
    ax = n.attrs["axis"]
    z = x[0] - x[0].max(axis=ax, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=ax, keepdims=True))
    y = np.exp(z - lse) if n.op == "softmax" else z - lse
    st.saved[id(n)] = y
    return [y]


@kernel("softmax_grad", "log_softmax_grad", writes="new")
def softmax_grad(n, x, st):
    gy, y, ax = x[0], st.saved[id(n.fwd)], n.attrs["axis"]
    if n.fwd.op == "softmax":
        return [y * (gy - (gy * y).sum(axis=ax, keepdims=True))]
    return [gy - np.exp(y) * gy.sum(axis=ax, keepdims=True)]


@kernel("sum", "mean", writes="new")
def reduce(n, x, st):
    f = np.sum if n.op == "sum" else np.mean
    return [np.ascontiguousarray(f(x[0], axis=n.attrs["axis"]))]


@kernel("sum_grad", "mean_grad", writes="new")
def reduce_grad(n, x, st):
    gy, xin, ax = x[0], x[1], n.attrs["axis"] % x[1].ndim
    scale = 1.0 if n.fwd.op == "sum" else 1.0 / xin.shape[ax]
    return [np.ascontiguousarray(np.broadcast_to(np.expand_dims(gy * gy.dtype.type(scale), ax), xin.shape))]


@kernel("embedding", writes="new")
def embedding(n, x, st):
    return [_param(n, st, "weight")[x[0]]]


@kernel("embedding_grad", writes="new")
def embedding_grad(n, x, st):
    gy, ids = x[0], x[1]
    w = _param(n.fwd, st, "weight")
    gw = np.zeros_like(w)
    np.add.at(gw, ids.reshape(-1), gy.reshape(-1, w.shape[1]))
    return [gw]


@kernel("one_hot", writes="new")
def one_hot(n, x, st):
    return [np.eye(n.attrs["classes"], dtype=np.float32)[x[0]]]


@kernel("pad", writes="new")
def pad(n, x, st):
    a = n.attrs
    widths = [(0, 0)] * x[0].ndim
    widths[a["axis"] % x[0].ndim] = (a["before"], a["after"])
    return [np.pad(x[0], widths)]


def _adaptive_cells(size, out):
    """torch's adaptive pooling windows: cell i covers [floor(i*size/out), ceil((i+1)*size/out))."""
    return [(i * size // out, -(-(i + 1) * size // out)) for i in range(out)]


@kernel("adaptive_avgpool")
def adaptive_avgpool(n, x, st):
    N, C, H, W = x[0].shape
    h, w = n.attrs["size"]
    if (H, W) == (h, w):
        return [x[0]]
    y = np.empty((N, C, h, w), x[0].dtype)
    for i, (r0, r1) in enumerate(_adaptive_cells(H, h)):
        for j, (c0, c1) in enumerate(_adaptive_cells(W, w)):
            y[:, :, i, j] = x[0][:, :, r0:r1, c0:c1].mean(axis=(2, 3))
    return [y]


@kernel("adaptive_avgpool_grad")
def adaptive_avgpool_grad(n, x, st):
    gy, xin = x[0], x[1]
    N, C, H, W = xin.shape
    h, w = n.attrs["size"]
    if (H, W) == (h, w):
        return [gy]
    gx = np.zeros_like(xin)
    for i, (r0, r1) in enumerate(_adaptive_cells(H, h)):
        for j, (c0, c1) in enumerate(_adaptive_cells(W, w)):
            gx[:, :, r0:r1, c0:c1] += (gy[:, :, i, j] / gy.dtype.type((r1 - r0) * (c1 - c0)))[:, :, None, None]
    return [gx]
