"""The CPU target: binds each IR operator to its Numba kernel.

One function per operator (forward, and `<op>_grad` for operators whose VJP is a
kernel), all with the signature fn(node, inputs, state) -> list of arrays. What a
forward pass must keep for its backward (switches, batch statistics, masks,
probabilities) goes in state.saved[node], keyed by the forward node.
Elementwise operators (and fused chains of them) are generated, not listed here.
"""
from __future__ import annotations

import numpy as np

from netdsl.kernels import cpu as K

from ..errors import NetdslError
from ..ir.dims import Sym

KERNELS = {}
DTYPES = {"f16": np.float16, "f32": np.float32, "f64": np.float64, "i32": np.int32, "i64": np.int64,
          "bool": np.bool_}


def kernel(*names):
    def wrap(fn):
        for n in names:
            KERNELS[n] = fn
        return fn
    return wrap


def _param(n, st, role):
    p = n.params.get(role)
    return None if p is None else st.params[p.name]


def _grads_for(n, x):
    """Split a `_grad` node's inputs into (output grads, forward inputs, params)."""
    k = n.attrs["ngrads"]
    fwd = n.fwd
    nin = len(fwd.inputs)
    return x[:k], x[k:k + nin], x[k + nin:], set(n.attrs["like"])


def _wants(n, i):
    """Whether the grad node must produce the gradient of forward input i."""
    return n.attrs["ngrads"] + i in n.attrs["like"]


def _outs(n, gins: dict, gparams: dict):
    """Order gradients as the grad node declared them: inputs first, then params."""
    k, nin = n.attrs["ngrads"], len(n.fwd.inputs)
    out = []
    roles = [r for r, p in n.fwd.params.items() if p.role != "buffer"]
    for j in n.attrs["like"]:
        out.append(gins[j - k] if j < k + nin else gparams[roles[j - k - nin]])
    return out


# ---- convolution and linear

@kernel("conv")
def conv(n, x, st):
    a = n.attrs
    return [K.conv2d(x[0], _param(n, st, "weight"), _param(n, st, "bias"), a["s"], a["p"], a["d"], a["groups"])]


@kernel("conv_grad")
def conv_grad(n, x, st):
    (gy,), (xin,), _, _ = _grads_for(n, x)
    a = n.attrs
    gx, gw, gb = K.conv2d_backward(xin, _param(n.fwd, st, "weight"), gy, a["s"], a["p"], a["d"], a["groups"],
                                   need_gx=_wants(n, 0))
    return _outs(n, {0: gx}, {"weight": gw, "bias": gb})


@kernel("conv_transpose")
def conv_transpose(n, x, st):
    a = n.attrs
    return [K.conv_transpose2d(x[0], _param(n, st, "weight"), _param(n, st, "bias"), a["s"], a["p"],
                               a["output_padding"], a["d"], a["groups"])]


@kernel("conv_transpose_grad")
def conv_transpose_grad(n, x, st):
    (gy,), (xin,), _, _ = _grads_for(n, x)
    a = n.attrs
    gx, gw, gb = K.conv_transpose2d_backward(xin, _param(n.fwd, st, "weight"), gy, a["s"], a["p"],
                                             a["output_padding"], a["d"], a["groups"], need_gx=_wants(n, 0))
    return _outs(n, {0: gx}, {"weight": gw, "bias": gb})


def _rows(x):
    return x.reshape(-1, x.shape[-1])


@kernel("linear")
def linear(n, x, st):
    y = K.linear(_rows(x[0]), _param(n, st, "weight"), _param(n, st, "bias"))
    return [y.reshape(*x[0].shape[:-1], y.shape[-1])]


@kernel("linear_grad")
def linear_grad(n, x, st):
    (gy,), (xin,), _, _ = _grads_for(n, x)
    gx, gw, gb = K.linear_backward(_rows(xin), _param(n.fwd, st, "weight"), _rows(gy), need_gx=_wants(n, 0))
    return _outs(n, {0: None if gx is None else gx.reshape(xin.shape)}, {"weight": gw, "bias": gb})


# ---- normalisation and dropout

@kernel("bn")
def bn(n, x, st):
    a = n.attrs
    g, b = _param(n, st, "weight"), _param(n, st, "bias")
    rm, rv = _param(n, st, "running_mean"), _param(n, st, "running_var")
    if not st.train:
        return [K.batchnorm_infer(x[0], g, b, rm, rv, a["eps"])]
    y, mean, invstd = K.batchnorm_train(x[0], g, b, rm, rv, a["momentum"], a["eps"])
    st.saved[id(n)] = (mean, invstd)
    return [y]


@kernel("bn_grad")
def bn_grad(n, x, st):
    (gy,), (xin,), _, _ = _grads_for(n, x)
    mean, invstd = st.saved[id(n.fwd)]
    gx, gg, gb = K.batchnorm_backward(xin, gy, _param(n.fwd, st, "weight"), mean, invstd)
    return _outs(n, {0: gx}, {"weight": gg, "bias": gb})


@kernel("lrn")
def lrn(n, x, st):
    a = n.attrs
    y, scale = K.local_response_norm(x[0], a["size"], a["alpha"], a["beta"], a["k"])
    st.saved[id(n)] = scale
    return [y]


@kernel("lrn_grad")
def lrn_grad(n, x, st):
    (gy,), (xin,), _, _ = _grads_for(n, x)
    a = n.attrs
    return [K.local_response_norm_backward(xin, st.saved[id(n.fwd)], gy, a["size"], a["alpha"], a["beta"])]


@kernel("dropout")
def dropout(n, x, st):
    if not st.train or n.attrs["p"] == 0:
        st.saved[id(n)] = None
        return [x[0]]
    y, mask = K.dropout(x[0], n.attrs["p"], seed=st.seed_for(n))
    st.saved[id(n)] = mask
    return [y]


@kernel("dropout_grad")
def dropout_grad(n, x, st):
    mask = st.saved[id(n.fwd)]
    return [x[0] if mask is None else K.dropout_backward(x[0], mask, n.attrs["p"])]


# ---- pooling and upsampling

@kernel("maxpool")
def maxpool(n, x, st):
    a = n.attrs
    y, sw = K.maxpool2d(x[0], a["k"], a["s"], a["p"], a["ceil"])
    st.saved[id(n)] = sw
    return [y, sw] if a["switches"] else [y]


@kernel("maxpool_grad")
def maxpool_grad(n, x, st):
    return [K.maxpool2d_backward(x[0], st.saved[id(n.fwd)], x[1].shape)]


@kernel("avgpool")
def avgpool(n, x, st):
    a = n.attrs
    return [K.avgpool2d(x[0], a["k"], a["s"], a["p"], a["ceil"])]


@kernel("avgpool_grad")
def avgpool_grad(n, x, st):
    a = n.attrs
    return [K.avgpool2d_backward(x[0], x[1].shape, a["k"], a["s"], a["p"], a["ceil"])]


@kernel("global_avgpool")
def global_avgpool(n, x, st):
    return [K.global_avgpool2d(x[0])]


@kernel("global_avgpool_grad")
def global_avgpool_grad(n, x, st):
    return [K.global_avgpool2d_backward(x[0], x[1].shape)]


@kernel("global_maxpool")
def global_maxpool(n, x, st):
    y, sw = K.maxpool2d(x[0], x[0].shape[2:], 1, 0)
    st.saved[id(n)] = sw
    return [y]


@kernel("global_maxpool_grad")
def global_maxpool_grad(n, x, st):
    return [K.maxpool2d_backward(x[0], st.saved[id(n.fwd)], x[1].shape)]


@kernel("max_unpool")
def max_unpool(n, x, st):
    a = n.attrs
    return [K.max_unpool2d(x[0], x[1], a["k"], a["s"], a["p"])]


@kernel("max_unpool_grad")
def max_unpool_grad(n, x, st):
    return [K.max_unpool2d_backward(x[0], x[2])]


@kernel("upsample")
def upsample(n, x, st):
    s = n.attrs["scale"]
    if n.attrs["mode"] == "nearest":
        return [K.upsample_nearest2d(x[0], s)]
    return [K.upsample_bilinear2d(x[0], scale_factor=float(s))]


@kernel("upsample_grad")
def upsample_grad(n, x, st):
    s = n.attrs["scale"]
    if n.attrs["mode"] == "nearest":
        return [K.upsample_nearest2d_backward(x[0], s)]
    return [K.upsample_bilinear2d_backward(x[0], x[1].shape, scale_factor=float(s))]


@kernel("bed_of_nails")
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


@kernel("cross_entropy")
def cross_entropy(n, x, st):
    z, y, _ = _ce_2d(x[0], x[1])
    loss, probs = K.softmax_cross_entropy(z, y, n.attrs["ignore_index"])
    st.saved[id(n)] = probs
    return [np.asarray(loss)]


@kernel("cross_entropy_grad")
def cross_entropy_grad(n, x, st):
    gl, logits, labels = x[0], x[1], x[2]
    _, y, nhwc = _ce_2d(logits, labels)
    gz = K.softmax_cross_entropy_backward(st.saved[id(n.fwd)], y, n.attrs["ignore_index"], float(gl))
    if nhwc is not None:
        gz = np.ascontiguousarray(gz.reshape(nhwc).transpose(0, 3, 1, 2))
    return [gz.reshape(logits.shape)]


_POINT = {"l2": (K.mse_loss, K.mse_loss_backward), "smooth_l1": (K.smooth_l1_loss, K.smooth_l1_loss_backward),
          "bce": (K.bce_with_logits, K.bce_with_logits_backward)}


@kernel("l2", "smooth_l1", "bce")
def point_loss(n, x, st):
    if len(x) > 2:
        raise NetdslError(f"{n.op} with a weight input is not supported by the CPU runtime yet", n.pos)
    extra = {"beta": n.attrs["beta"]} if n.op == "smooth_l1" else {}
    return [np.asarray(_POINT[n.op][0](x[0], x[1], **extra))]


@kernel("l2_grad", "smooth_l1_grad", "bce_grad")
def point_loss_grad(n, x, st):
    k = n.attrs["ngrads"]
    gl, pred, target = x[0], x[k], x[k + 1]
    op = n.fwd.op
    extra = {"beta": n.attrs["beta"]} if op == "smooth_l1" else {}
    return [_POINT[op][1](pred, target, float(gl), **extra)]


# ---- structural operators

@kernel("reshape", "flatten")
def reshape(n, x, st):
    shape = tuple(int(d.subs(st.dims)) if isinstance(d, Sym) else int(d) for d in n.outputs[0].shape)
    return [x[0].reshape(shape)]


@kernel("transpose")
def transpose(n, x, st):
    return [np.ascontiguousarray(x[0].transpose(n.attrs["perm"]))]


@kernel("concat")
def concat(n, x, st):
    return [np.concatenate(x, axis=n.attrs["axis"])]


@kernel("split")
def split(n, x, st):
    axis = n.attrs["axis"] % x[0].ndim
    sizes = [v.shape[axis] for v in n.outputs]
    sizes = [int(s.subs(st.dims)) if isinstance(s, Sym) else s for s in sizes]
    return [np.ascontiguousarray(p) for p in np.split(x[0], np.cumsum(sizes)[:-1], axis=axis)]


def _index(n):
    return tuple(slice(*i) if isinstance(i, tuple) else i for i in n.attrs["index"])


@kernel("slice")
def slice_(n, x, st):
    return [np.ascontiguousarray(x[0][_index(n)])]


@kernel("slice_grad")
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


@kernel("zeros")
def zeros(n, x, st):
    dt = n.outputs[0].dtype
    return [np.zeros(st.shape_of(n.outputs[0]), st.dtype if dt.startswith("f") else DTYPES[dt])]


@kernel("fill")
def fill(n, x, st):
    return [np.full(st.shape_of(n.outputs[0]), n.attrs["value"], st.dtype)]


@kernel("detach")
def detach(n, x, st):
    return [x[0]]


# softmax-family and reductions are small in the CNN classics; numpy is enough here

@kernel("softmax", "log_softmax")
def softmax(n, x, st):
    ax = n.attrs["axis"]
    z = x[0] - x[0].max(axis=ax, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=ax, keepdims=True))
    y = np.exp(z - lse) if n.op == "softmax" else z - lse
    st.saved[id(n)] = y
    return [y]


@kernel("softmax_grad", "log_softmax_grad")
def softmax_grad(n, x, st):
    gy, y, ax = x[0], st.saved[id(n.fwd)], n.attrs["axis"]
    if n.fwd.op == "softmax":
        return [y * (gy - (gy * y).sum(axis=ax, keepdims=True))]
    return [gy - np.exp(y) * gy.sum(axis=ax, keepdims=True)]


@kernel("sum", "mean")
def reduce(n, x, st):
    f = np.sum if n.op == "sum" else np.mean
    return [np.ascontiguousarray(f(x[0], axis=n.attrs["axis"]))]


@kernel("sum_grad", "mean_grad")
def reduce_grad(n, x, st):
    gy, xin, ax = x[0], x[1], n.attrs["axis"] % x[1].ndim
    scale = 1.0 if n.fwd.op == "sum" else 1.0 / xin.shape[ax]
    return [np.ascontiguousarray(np.broadcast_to(np.expand_dims(gy * gy.dtype.type(scale), ax), xin.shape))]


@kernel("embedding")
def embedding(n, x, st):
    return [_param(n, st, "weight")[x[0]]]


@kernel("embedding_grad")
def embedding_grad(n, x, st):
    gy, ids = x[0], x[1]
    w = _param(n.fwd, st, "weight")
    gw = np.zeros_like(w)
    np.add.at(gw, ids.reshape(-1), gy.reshape(-1, w.shape[1]))
    return [gw]


@kernel("one_hot")
def one_hot(n, x, st):
    return [np.eye(n.attrs["classes"], dtype=np.float32)[x[0]]]


@kernel("pad")
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
