"""Operator bindings written once for both targets.

`register(table, K)` binds every operator whose binding is the same on the CPU
and on CUDA but for the kernel module `K` (`netdsl.kernels.cpu` or
`netdsl.kernels.cuda`, which expose the same names and signatures; `runtime/cpu.py`
passes the CPU module through an adapter that adds the numpy structural kernels and
fits signatures that differ). What truly differs per target (the losses' scalars)
stays in `runtime/cpu.py` and `runtime/cuda.py`.

Every binding has the signature fn(node, inputs, state) -> list of arrays. What a
forward pass must keep for its backward (switches, batch statistics, masks,
probabilities) goes in state.saved[node], keyed by the forward node.
"""
from __future__ import annotations

import math

import numpy as np

from ..autodiff import trainable
from ..ir.dims import Sym
from ..ops.tensor import reduced_axes
from .arena import pack

DTYPES = {"f16": np.float16, "f32": np.float32, "f64": np.float64, "i32": np.int32, "i64": np.int64,
          "bool": np.bool_}


def array_dtype(dtype: str, floats):
    """The array dtype of a value declared `dtype` in a run computing in `floats`
    (every float value takes the run's float dtype)."""
    return floats if dtype.startswith("f") else DTYPES[dtype]


def registrar(table: dict):
    """A decorator `@kernel(op, ...)` that binds a function to operator names in `table`.
    What it returns, for the workspace planner (arena.py):
      writes="into": it takes `out` ({output index: array}) and writes those outputs there,
        allocating only the ones not given;
      writes="new": new arrays, never an input or a view of one;
      writes="views" (the default, the safe assumption): maybe an input or a view of one."""
    def kernel(*names, writes="views"):
        assert writes in ("into", "new", "views")

        def wrap(fn):
            fn.writes = writes
            for n in names:
                table[n] = fn
            return fn
        return wrap
    return kernel


# ---- helpers

def _into(out, j, name) -> dict:
    """{name: out[j]} when the executor gave output j a buffer (CPU workspace), else {}."""
    return {name: out[j]} if out and j in out else {}


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
    roles = [r for r, _ in trainable(n.fwd)]
    for j in n.attrs["like"]:
        out.append(gins[j - k] if j < k + nin else gparams[roles[j - k - nin]])
    return out


class GradBuffers:
    """Parameter gradients kept from step to step, as torch keeps .grad: a gradient
    kernel whose output is a parameter's final gradient (not one of several summed)
    writes into this buffer instead of a new array. A step then allocates no gradient
    memory, and the previous step's gradients are not alive beside the new ones; the
    arrays a step returns are overwritten by the next step. They lie side by side in
    one buffer of huge pages, as the parameters do (init.py)."""

    def __init__(self, grads: dict):
        self.final = {id(v): name for name, v in grads.items()}    # gradient value -> parameter
        self.arrays: dict[str, np.ndarray] = {}
        self._shapes = {name: tuple(v.shape) for name, v in grads.items()
                        if all(isinstance(d, int) for d in v.shape)}
        self._buf, self._at = None, {}   # arena.pack's, for the dtype of the first gradient

    def get(self, v, like):
        name = self.final.get(id(v))
        if name is None:
            return None
        a = self.arrays.get(name)
        if a is None or a.shape != like.shape or a.dtype != like.dtype:
            a = self.arrays[name] = self._carve(name, like)
        return a

    def _carve(self, name, like):
        """name's place in the buffer, laid out for like's dtype on first need."""
        if like.shape != self._shapes.get(name):
            return np.empty(like.shape, like.dtype)
        if self._buf is None or self._buf.dtype != like.dtype:
            self._buf, self._at = pack({n: math.prod(shape) for n, shape in self._shapes.items()}, like.dtype)
        return self._buf[self._at[name]:self._at[name] + like.size].reshape(like.shape)


def _grad_out(n, st, role, key="gw_out", every=False) -> dict:
    """{key: buffer} when grad node n's gradient of parameter `role` is that
    parameter's final gradient and the run keeps gradient buffers; else {}.
    every=True: asked only of buffers that hold every parameter's gradient (the CUDA
    model's, runtime/cuda_flat.py; the CPU's hold the big weights' only)."""
    bufs = getattr(st, "grad_buffers", None)
    if bufs is None or role not in n.fwd.params or (every and not getattr(bufs, "every", False)):
        return {}
    k, nin = n.attrs["ngrads"], len(n.fwd.inputs)
    roles = [r for r, _ in trainable(n.fwd)]
    j = k + nin + roles.index(role)
    if j not in n.attrs["like"]:
        return {}
    out = bufs.get(n.outputs[n.attrs["like"].index(j)], st.params[n.fwd.params[role].name])
    return {} if out is None else {key: out}


def _dims(shape, st):
    return tuple(int(d.subs(st.dims)) if isinstance(d, Sym) else int(d) for d in shape)


def _rows(x):
    k = x.shape[x.ndim - 1]     # (the CUDA simulator's shapes refuse negative indices)
    return x.reshape(x.size // k, k)


def _index(n):
    return tuple(slice(*i) if isinstance(i, tuple) else i for i in n.attrs["index"])


def register(table: dict, K, target: str) -> None:
    """Bind the operators shared by both targets into `table`, calling kernels from `K`
    (`target` names the runtime in messages)."""
    kernel = registrar(table)

    # ---- convolution and linear

    @kernel("conv", writes="into")
    def conv(n, x, st, out=None):
        a = n.attrs
        return [K.conv2d(x[0], _param(n, st, "weight"), _param(n, st, "bias"), a["s"], a["p"], a["d"],
                         a["groups"], **_into(out, 0, "out"))]

    @kernel("conv_grad", writes="into")
    def conv_grad(n, x, st, out=None):
        (gy,), (xin,), _, _ = _grads_for(n, x)
        a = n.attrs
        gx, gw, gb = K.conv2d_backward(xin, _param(n.fwd, st, "weight"), gy, a["s"], a["p"], a["d"], a["groups"],
                                       need_gx=_wants(n, 0), need_gb="bias" in n.fwd.params,
                                       **_grad_out(n, st, "weight"), **_grad_out(n, st, "bias", "gb_out", True),
                                       **_into(out, 0, "gx_out"))
        return _outs(n, {0: gx}, {"weight": gw, "bias": gb})

    @kernel("conv_transpose", writes="new")
    def conv_transpose(n, x, st):
        a = n.attrs
        return [K.conv_transpose2d(x[0], _param(n, st, "weight"), _param(n, st, "bias"), a["s"], a["p"],
                                   a["output_padding"], a["d"], a["groups"])]

    @kernel("conv_transpose_grad", writes="new")
    def conv_transpose_grad(n, x, st):
        (gy,), (xin,), _, _ = _grads_for(n, x)
        a = n.attrs
        gx, gw, gb = K.conv_transpose2d_backward(xin, _param(n.fwd, st, "weight"), gy, a["s"], a["p"],
                                                 a["output_padding"], a["d"], a["groups"], need_gx=_wants(n, 0),
                                                 need_gb="bias" in n.fwd.params)
        return _outs(n, {0: gx}, {"weight": gw, "bias": gb})

    @kernel("linear", writes="new")
    def linear(n, x, st):
        y = K.linear(_rows(x[0]), _param(n, st, "weight"), _param(n, st, "bias"))
        return [y.reshape(tuple(x[0].shape)[:-1] + (y.shape[1],))]

    @kernel("linear_grad", writes="new")
    def linear_grad(n, x, st):
        (gy,), (xin,), _, _ = _grads_for(n, x)
        hoisted = getattr(st, "hoisted_grad", None)
        if hoisted is not None and id(n.fwd) in hoisted:   # in a scan: weights after the loop (runtime/scan.py)
            g2 = _rows(gy)
            gx = K.matmul_rows(g2, _param(n.fwd, st, "weight")).reshape(xin.shape) if _wants(n, 0) else None
            hoisted[id(n.fwd)] = (g2, _rows(xin))
            return _outs(n, {0: gx}, {"weight": None, "bias": None})
        gx, gw, gb = K.linear_backward(_rows(xin), _param(n.fwd, st, "weight"), _rows(gy), need_gx=_wants(n, 0),
                                       **_grad_out(n, st, "weight"), **_grad_out(n, st, "bias", "gb_out", True))
        return _outs(n, {0: None if gx is None else gx.reshape(xin.shape)}, {"weight": gw, "bias": gb})

    # ---- normalisation and dropout

    @kernel("bn", writes="into")
    def bn(n, x, st, out=None):
        a = n.attrs
        g, b = _param(n, st, "weight"), _param(n, st, "bias")
        rm, rv = _param(n, st, "running_mean"), _param(n, st, "running_var")
        y = _into(out, 0, "out")
        if not st.train:
            return [K.batchnorm_infer(x[0], g, b, rm, rv, a["eps"], **y)]
        if n.fwd is not None:   # a replay in the backward (remat.py)
            return [K.batchnorm_apply(x[0], g, b, *st.saved[id(n.fwd)], **y)]
        y, mean, invstd = K.batchnorm_train(x[0], g, b, rm, rv, a["momentum"], a["eps"], **y)
        st.saved[id(n)] = (mean, invstd)
        return [y]

    @kernel("bn_grad", writes="into")
    def bn_grad(n, x, st, out=None):
        (gy,), (xin,), _, _ = _grads_for(n, x)
        mean, invstd = st.saved[id(n.fwd)]
        gx, gg, gb = K.batchnorm_backward(xin, gy, _param(n.fwd, st, "weight"), mean, invstd,
                                          **(_into(out, 0, "gx_out") if _wants(n, 0) else {}),
                                          **_grad_out(n, st, "weight", "gg_out", True),
                                          **_grad_out(n, st, "bias", "gb_out", True))
        return _outs(n, {0: gx}, {"weight": gg, "bias": gb})

    @kernel("lrn", writes="new")
    def lrn(n, x, st):
        a = n.attrs
        y, scale = K.local_response_norm(x[0], a["size"], a["alpha"], a["beta"], a["k"])
        st.saved[id(n)] = scale
        return [y]

    @kernel("lrn_grad", writes="new")
    def lrn_grad(n, x, st):
        (gy,), (xin,), _, _ = _grads_for(n, x)
        a = n.attrs
        return [K.local_response_norm_backward(xin, st.saved[id(n.fwd)], gy, a["size"], a["alpha"], a["beta"])]

    def masked(op, forward, backward):
        """Dropout and stochastic depth: identity at inference or p = 0; in training a
        seeded random mask, kept for the backward."""
        @kernel(op)
        def fwd(n, x, st):
            if not st.train or n.attrs["p"] == 0:
                st.saved[id(n)] = None
                return [x[0]]
            y, mask = forward(x[0], n.attrs["p"], seed=st.seed_for(n))
            st.saved[id(n)] = mask
            return [y]

        @kernel(f"{op}_grad")
        def bwd(n, x, st):
            mask = st.saved[id(n.fwd)]
            return [x[0] if mask is None else backward(x[0], mask, n.attrs["p"])]

    masked("dropout", K.dropout, K.dropout_backward)
    masked("drop_path", K.drop_path, K.drop_path_backward)

    # ---- reductions over an axis or a list of axes

    @kernel("sum", "mean", writes="new")
    def reduce(n, x, st):
        a = n.attrs
        return [K.reduce_axes(x[0], reduced_axes(a["axis"], x[0].ndim), n.op == "mean", a.get("keepdim", False))]

    @kernel("sum_grad", "mean_grad", writes="new")
    def reduce_grad(n, x, st):
        gy, xin = x[0], x[1]
        axes = reduced_axes(n.attrs["axis"], xin.ndim)
        count = math.prod(xin.shape[a] for a in axes)
        return [K.expand_axes(gy, xin.shape, axes, 1.0 if n.fwd.op == "sum" else 1.0 / count)]

    # ---- pooling and upsampling

    @kernel("maxpool", writes="into")
    def maxpool(n, x, st, out=None):
        a = n.attrs
        y, sw = K.maxpool2d(x[0], a["k"], a["s"], a["p"], a["ceil"], **_into(out, 0, "out"))
        st.saved[id(n)] = sw
        if not a["switches"]:
            return [y]
        return [y, sw if sw.dtype == np.int64 else sw.astype(np.int64)]    # declared i64

    @kernel("maxpool_grad", writes="into")
    def maxpool_grad(n, x, st, out=None):
        a = n.attrs
        return [K.maxpool2d_backward(x[0], st.saved[id(n.fwd)], x[1].shape, a["k"], a["s"], a["p"], a["ceil"],
                                     **_into(out, 0, "out"))]

    @kernel("avgpool", writes="new")
    def avgpool(n, x, st):
        a = n.attrs
        return [K.avgpool2d(x[0], a["k"], a["s"], a["p"], a["ceil"])]

    @kernel("avgpool_grad", writes="new")
    def avgpool_grad(n, x, st):
        a = n.attrs
        return [K.avgpool2d_backward(x[0], x[1].shape, a["k"], a["s"], a["p"], a["ceil"])]

    @kernel("global_avgpool", writes="new")
    def global_avgpool(n, x, st):
        return [K.global_avgpool2d(x[0])]

    @kernel("global_avgpool_grad", writes="new")
    def global_avgpool_grad(n, x, st):
        return [K.global_avgpool2d_backward(x[0], x[1].shape)]

    @kernel("global_maxpool", writes="new")
    def global_maxpool(n, x, st):
        y, sw = K.global_maxpool2d(x[0])
        st.saved[id(n)] = sw
        return [y]

    @kernel("global_maxpool_grad", writes="new")
    def global_maxpool_grad(n, x, st):
        shape = x[1].shape
        return [K.maxpool2d_backward(x[0], st.saved[id(n.fwd)], shape, shape[2:], 1, 0)]

    @kernel("max_unpool", writes="new")
    def max_unpool(n, x, st):
        a = n.attrs
        return [K.max_unpool2d(x[0], x[1], a["k"], a["s"], a["p"], st.shape_of(n.outputs[0])[2:])]

    @kernel("max_unpool_grad", writes="new")
    def max_unpool_grad(n, x, st):
        return [K.max_unpool2d_backward(x[0], x[2])]

    @kernel("upsample", writes="new")
    def upsample(n, x, st):
        s = n.attrs["scale"]
        if n.attrs["mode"] == "nearest":
            return [K.upsample_nearest2d(x[0], s)]
        return [K.upsample_bilinear2d(x[0], scale_factor=float(s))]

    @kernel("upsample_grad", writes="new")
    def upsample_grad(n, x, st):
        s = n.attrs["scale"]
        if n.attrs["mode"] == "nearest":
            return [K.upsample_nearest2d_backward(x[0], s)]
        return [K.upsample_bilinear2d_backward(x[0], x[1].shape, scale_factor=float(s))]

    @kernel("extract_patches", writes="new")
    def extract_patches(n, x, st):
        a = n.attrs
        return [K.extract_patches(x[0], a["k"], a["s"], a["p"])]

    @kernel("extract_patches_grad", writes="new")
    def extract_patches_grad(n, x, st):
        a = n.attrs
        return [K.extract_patches_backward(x[0], x[1].shape, a["k"], a["s"], a["p"])]

    # ---- pointwise losses (the forward's loss is a 0-d array on either target)

    point = {"l2": (K.mse_loss, K.mse_loss_backward), "smooth_l1": (K.smooth_l1_loss, K.smooth_l1_loss_backward),
             "bce": (K.bce_with_logits, K.bce_with_logits_backward)}

    def loss_extra(fwd, weight):
        """The keyword arguments of a point loss: beta, the weight (optional) and its norm."""
        extra = {"weight": weight, "norm": fwd.attrs["norm"]}
        return {**extra, "beta": fwd.attrs["beta"]} if fwd.op == "smooth_l1" else extra

    @kernel("l2", "smooth_l1", "bce", writes="new")
    def point_loss(n, x, st):
        return [point[n.op][0](x[0], x[1], **loss_extra(n, x[2] if len(x) > 2 else None)).reshape(())]

    @kernel("l2_grad", "smooth_l1_grad", "bce_grad", writes="new")
    def point_loss_grad(n, x, st):
        (gl,), ins, _, _ = _grads_for(n, x)
        return [point[n.fwd.op][1](ins[0], ins[1], gl, **loss_extra(n.fwd, ins[2] if len(ins) > 2 else None))]

    # ---- structural operators (the CPU's kernels are numpy, under the same names: runtime/cpu.py)

    @kernel("coords", writes="new")
    def coords(n, x, st):
        N, _, H, W = x[0].shape
        dt = array_dtype(n.outputs[0].dtype, st.dtype)
        grid = np.empty((N, 2, H, W), dt)
        grid[:, 0] = ((np.arange(W) + 0.5) * 2 / W - 1)[None, None, :]
        grid[:, 1] = ((np.arange(H) + 0.5) * 2 / H - 1)[None, :, None]
        return [K.to_device(grid)]

    @kernel("transpose")
    def transpose(n, x, st):
        return [K.transpose(x[0], n.attrs["perm"])]

    @kernel("concat", writes="new")
    def concat(n, x, st):
        return [K.concat(x, n.attrs["axis"])]

    @kernel("split")
    def split(n, x, st):
        axis = n.attrs["axis"] % x[0].ndim
        return K.split(x[0], _dims([v.shape[axis] for v in n.outputs], st), axis)

    @kernel("slice")
    def slice_(n, x, st):
        return [K.slice_(x[0], _index(n))]

    @kernel("slice_grad", writes="new")
    def slice_grad(n, x, st):
        return [K.slice_backward(x[0], st.shape_of(n.outputs[0]), _index(n.fwd))]

    @kernel("sum_to")
    def sum_to(n, x, st):
        return [K.sum_to(x[0], st.shape_of(n.outputs[0]))]

    @kernel("pad", writes="new")
    def pad(n, x, st):
        a = n.attrs
        return [K.pad(x[0], a["axis"], a["before"], a["after"])]

    @kernel("softmax", "log_softmax", writes="new")
    def softmax(n, x, st):
        y = K.softmax(x[0], n.attrs["axis"], log=n.op == "log_softmax")
        st.saved[id(n)] = y
        return [y]

    @kernel("softmax_grad", "log_softmax_grad", writes="new")
    def softmax_grad(n, x, st):
        return [K.softmax_backward(x[0], st.saved[id(n.fwd)], n.attrs["axis"], log=n.fwd.op == "log_softmax")]

    @kernel("embedding", writes="new")
    def embedding(n, x, st):
        return [K.embedding(_param(n, st, "weight"), x[0])]

    @kernel("embedding_grad", writes="new")
    def embedding_grad(n, x, st):
        return [K.embedding_backward(x[0], x[1], _param(n.fwd, st, "weight").shape)]

    @kernel("one_hot", writes="new")
    def one_hot(n, x, st):
        return [K.one_hot(x[0], n.attrs["classes"])]

    @kernel("adaptive_avgpool")
    def adaptive_avgpool(n, x, st):
        if tuple(x[0].shape[2:]) == tuple(n.attrs["size"]):
            return [x[0]]
        return [K.adaptive_avgpool2d(x[0], n.attrs["size"])]

    @kernel("adaptive_avgpool_grad")
    def adaptive_avgpool_grad(n, x, st):
        gy, xin = x[0], x[1]
        if tuple(xin.shape) == tuple(gy.shape):
            return [gy]
        return [K.adaptive_avgpool2d_backward(gy, xin.shape)]

    @kernel("bed_of_nails", writes="new")
    def bed_of_nails(n, x, st):
        return [K.bed_of_nails(x[0], n.attrs["scale"])]

    @kernel("bed_of_nails_grad")
    def bed_of_nails_grad(n, x, st):
        return [K.bed_of_nails_backward(x[0], n.attrs["scale"])]

    @kernel("reshape", "flatten")
    def reshape(n, x, st):
        return [x[0].reshape(_dims(n.outputs[0].shape, st))]

    @kernel("zeros", writes="new")
    def zeros(n, x, st):
        return [K.zeros(st.shape_of(n.outputs[0]), array_dtype(n.outputs[0].dtype, st.dtype))]

    @kernel("fill", writes="new")
    def fill(n, x, st):
        return [K.full(st.shape_of(n.outputs[0]), n.attrs["value"], array_dtype(n.outputs[0].dtype, st.dtype))]

    @kernel("detach")
    def detach(n, x, st):
        return [x[0]]

    recurrent(kernel, K)
    detection(kernel, K)
    targets(kernel, K)
    boxes(kernel, K)


# ---- anchors, box coding, IoU, NMS and proposals (kernels/*/boxes.py): no gradients

def boxes(kernel, K) -> None:
    """Bind the box operators of ops/detection.py with `kernel` to K. Their fixed-size
    outputs carry the padding contract of docs/language.md ("Detection")."""

    def float_out(n, st):
        return array_dtype(n.outputs[0].dtype, st.dtype)

    @kernel("anchors", writes="new")
    def anchors(n, x, st):
        a = n.attrs
        return [K.anchors(tuple(x[0].shape)[2:], a["sizes"], a["ratios"], a["stride"], float_out(n, st))]

    @kernel("default_boxes", writes="new")
    def default_boxes(n, x, st):
        a = n.attrs
        return [K.default_boxes([tuple(v.shape)[2:] for v in x], a["ratios"], a["smin"], a["smax"], a["image"],
                                a["scales"], a["steps"], float_out(n, st))]

    @kernel("box_encode", writes="new")
    def box_encode(n, x, st):
        return [K.box_encode(x[0], x[1], n.attrs["weights"])]

    @kernel("box_decode", writes="new")
    def box_decode(n, x, st):
        return [K.box_decode(x[0], x[1], n.attrs["weights"])]

    @kernel("iou", writes="new")
    def iou(n, x, st):
        return [K.box_iou(x[0], x[1])]

    @kernel("proposals", writes="new")
    def proposals(n, x, st):
        a = n.attrs
        return [K.proposals(x[0], x[1], x[2], a["pre_nms"], a["post_nms"], a["iou"], a["min_size"], a["image"])]

    @kernel("nms", writes="new")
    def nms(n, x, st):
        a = n.attrs
        return list(K.detect_nms(x[0], x[1], a["iou"], a["max_out"], a["score_thresh"], a["background"]))

    @kernel("to_rois", writes="new")
    def to_rois(n, x, st):
        return [K.to_rois(x[0])]


# ---- recurrent cells, attention over locations, discrete choices (kernels/*/recurrent.py)

CELLS = {"rnn_cell": "rnn", "lstm_cell": "lstm", "gru_cell": "gru"}
CELL_PARAMS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
ATTENTION_PARAMS = ("weight_feat", "weight_query", "bias", "weight_score")


def recurrent(kernel, K) -> None:
    """Bind the operators of ops/recurrent.py with `kernel` (a registrar) to module K."""
    from ..errors import NetdslError

    # Inside a scan whose sequence is the cell's input, the input projection of every time
    # step is one GEMM before the loop (runtime/scan.py): the step gets its rows in
    # st.hoisted and runs only the recurrent part. In a scan's backward, a cell listed in
    # st.hoisted_grad (True: its projection was hoisted) leaves its gates' gradients and
    # the h (and x) they multiply there, for the weight gradients of all steps as one GEMM
    # each after the loop, and gives no weight gradients here.
    @kernel(*CELLS, writes="new")
    def cell(n, x, st):
        kind, order = CELLS[n.op], n.attrs.get("order", "ifog")
        c0 = x[2] if kind == "lstm" else None
        xp = getattr(st, "hoisted", {}).get(id(n))
        if xp is not None:
            h, c, acts = K.cell_step(kind, xp, x[1], c0, _param(n, st, "weight_hh"), _param(n, st, "bias_hh"),
                                     order=order)
        else:
            h, c, acts = K.cell_forward(kind, x[0], x[1], c0, *(_param(n, st, r) for r in CELL_PARAMS), order=order)
        st.saved[id(n)] = acts
        return [h] if c is None else [h, c]

    @kernel(*(f"{op}_grad" for op in CELLS), writes="new")
    def cell_grad(n, x, st):
        gys, ins, _, _ = _grads_for(n, x)
        lstm = CELLS[n.fwd.op] == "lstm"
        hoisted = getattr(st, "hoisted_grad", None)
        if hoisted is not None and id(n.fwd) in hoisted:
            gxp, ghp, gh, gc = K.cell_step_grads(
                CELLS[n.fwd.op], st.saved[id(n.fwd)], gys[0], gys[1] if lstm else None, ins[1],
                ins[2] if lstm else None, _param(n.fwd, st, "weight_hh"), order=n.attrs.get("order", "ifog"))
            if hoisted[id(n.fwd)]:      # x's gradient comes from the projection's GEMM after the loop
                gx = K.zeros(ins[0].shape, ins[0].dtype)
                hoisted[id(n.fwd)] = (gxp, None if ghp is gxp else ghp, ins[1], None)
            else:
                gx = K.matmul_rows(gxp, _param(n.fwd, st, "weight_ih")) if _wants(n, 0) else None
                hoisted[id(n.fwd)] = (gxp, None if ghp is gxp else ghp, ins[1], ins[0])
            return _outs(n, {0: gx, 1: gh, 2: gc}, dict.fromkeys(CELL_PARAMS))
        bufs = {key: v for role, key in (("weight_ih", "gw_ih"), ("weight_hh", "gw_hh"))
                for v in _grad_out(n, st, role).values()}
        gx, gh, gc, gwi, gwh, gbi, gbh = K.cell_backward(
            CELLS[n.fwd.op], st.saved[id(n.fwd)], gys[0], gys[1] if lstm else None, ins[0], ins[1],
            ins[2] if lstm else None, _param(n.fwd, st, "weight_ih"), _param(n.fwd, st, "weight_hh"),
            order=n.attrs.get("order", "ifog"), need_gx=_wants(n, 0), **bufs)
        return _outs(n, {0: gx, 1: gh, 2: gc}, {"weight_ih": gwi, "weight_hh": gwh, "bias_ih": gbi, "bias_hh": gbh})

    @kernel("attention_scores", writes="new")
    def attention_scores(n, x, st):
        a, u = K.attention_scores(x[0], x[1], *(_param(n, st, r) for r in ATTENTION_PARAMS))
        st.saved[id(n)] = (a, u)
        return [a]

    @kernel("attention_scores_grad", writes="new")
    def attention_scores_grad(n, x, st):
        (gy,), (f, q), _, _ = _grads_for(n, x)
        p = {r: _param(n.fwd, st, r) for r in ATTENTION_PARAMS}
        gf, gq, gwf, gwq, gb, gws = K.attention_scores_backward(
            gy, *st.saved[id(n.fwd)], f, q, p["weight_feat"], p["weight_query"], p["weight_score"],
            need_gfeats=_wants(n, 0), need_gquery=_wants(n, 1))
        return _outs(n, {0: gf, 1: gq}, dict(zip(ATTENTION_PARAMS, (gwf, gwq, gb, gws))))

    @kernel("weighted_sum", writes="new")
    def weighted_sum(n, x, st):
        return [K.weighted_sum(x[0], x[1])]

    @kernel("weighted_sum_grad", writes="new")
    def weighted_sum_grad(n, x, st):
        (gy,), (f, w), _, _ = _grads_for(n, x)
        gf, gw = K.weighted_sum_backward(gy, f, w)
        return _outs(n, {0: gf, 1: gw}, {})

    def located(n, fn, *args):
        """fn(*args), a bad index (the CPU's IndexError) reported at the node."""
        try:
            return fn(*args)
        except IndexError as e:
            raise NetdslError(f"{n.op} ({n.path}): {e}", n.pos) from None

    @kernel("gather_location", writes="new")
    def gather_location(n, x, st):
        return [located(n, K.gather_location, x[0], x[1])]

    @kernel("gather_location_grad", writes="new")
    def gather_location_grad(n, x, st):
        (gy,), (f, index), _, _ = _grads_for(n, x)
        return _outs(n, {0: located(n.fwd, K.gather_location_backward, gy, index, f.shape[1])}, {})

    @kernel("sample_categorical", writes="new")
    def sample_categorical(n, x, st):
        ix = K.sample_categorical(x[0], st.seed_for(n))
        if isinstance(ix, np.ndarray) and ix.size and ix.min() < 0:    # (CUDA leaves -1 for gather's NaN)
            row = int(np.flatnonzero(ix < 0)[0])
            raise NetdslError(f"sample_categorical ({n.path}): row {row} of the weights has no positive "
                              f"finite total to draw from", n.pos, hint="pass probabilities, e.g. a softmax")
        return [ix]

    @kernel("argmax", writes="new")
    def argmax(n, x, st):
        return [K.argmax(x[0], n.attrs["axis"])]


# ---- RoI features and the detection heads' layers (kernels/*/roi.py)

def detection(kernel, K) -> None:
    """Bind roi_pool, roi_align, crop_resize, l2norm and select_class with `kernel` to K.
    RoI gradients go to the feature map only (grad_wrt=(0,)); l2norm's also to its weight."""
    from ..errors import NetdslError

    def located(n, fn, *args):
        """fn(*args), a RoI's image or a label out of range (the CPU's IndexError) reported at the node."""
        try:
            return fn(*args)
        except IndexError as e:
            raise NetdslError(f"{n.op} ({n.path}): {e}", n.pos) from None

    @kernel("roi_pool", writes="new")
    def roi_pool(n, x, st):
        y, argmax = located(n, K.roi_pool, x[0], x[1], n.attrs["out"], n.attrs["scale"])
        st.saved[id(n)] = argmax
        return [y]

    @kernel("roi_pool_grad", writes="new")
    def roi_pool_grad(n, x, st):
        (gy,), (f, rois), _, _ = _grads_for(n, x)
        return [located(n.fwd, K.roi_pool_backward, gy, st.saved[id(n.fwd)], rois, f.shape)]

    @kernel("roi_align", writes="new")
    def roi_align(n, x, st):
        a = n.attrs
        return [located(n, K.roi_align, x[0], x[1], a["out"], a["scale"], a["sampling"], a["aligned"])]

    @kernel("roi_align_grad", writes="new")
    def roi_align_grad(n, x, st):
        (gy,), (f, rois), _, _ = _grads_for(n, x)
        a = n.attrs
        return [located(n.fwd, K.roi_align_backward, gy, rois, f.shape, a["scale"], a["sampling"], a["aligned"])]

    @kernel("crop_resize", writes="new")
    def crop_resize(n, x, st):
        return [located(n, K.crop_resize, x[0], x[1], n.attrs["size"])]

    @kernel("crop_resize_grad", writes="new")
    def crop_resize_grad(n, x, st):
        (gy,), (image, rois), _, _ = _grads_for(n, x)
        return [located(n.fwd, K.crop_resize_backward, gy, rois, image.shape)]

    @kernel("l2norm", writes="new")
    def l2norm(n, x, st):
        return [K.l2norm(x[0], _param(n, st, "weight"), n.attrs["eps"])]

    @kernel("l2norm_grad", writes="new")
    def l2norm_grad(n, x, st):
        (gy,), (xin,), _, _ = _grads_for(n, x)
        gx, gw = K.l2norm_backward(gy, xin, _param(n.fwd, st, "weight"), n.attrs["eps"], need_gx=_wants(n, 0))
        return _outs(n, {0: gx}, {"weight": gw})

    @kernel("select_class", writes="new")
    def select_class(n, x, st):
        return [located(n, K.select_class, x[0], x[1])]

    @kernel("select_class_grad", writes="new")
    def select_class_grad(n, x, st):
        (gy,), (xin, labels), _, _ = _grads_for(n, x)
        return [located(n.fwd, K.select_class_backward, gy, labels, xin.shape[1])]


# ---- training targets: matching, sampling, per-RoI targets, YOLO's grid (kernels/*/targets.py)

def targets(kernel, K) -> None:
    """Bind the target-assignment operators of ops/detection.py with `kernel` to K. None has
    a gradient; the sampling ones draw from the run's seed (st.seed_for: seed, step, node),
    as dropout does, so a run repeats exactly."""
    from ..errors import NetdslError

    def located(n, fn, *args):
        """fn(*args), a bad image, gt index or label (the kernels' IndexError) reported at the node."""
        try:
            return fn(*args)
        except IndexError as e:
            raise NetdslError(f"{n.op} ({n.path}): {e}", n.pos) from None

    @kernel("assign_targets", writes="new")
    def assign_targets(n, x, st):
        a = n.attrs
        return list(K.assign_targets(x[0], x[1], x[2], a["fg_iou"], a["bg_iou"], a["binary"]))

    @kernel("sample_anchors", writes="new")
    def sample_anchors(n, x, st):
        a = n.attrs
        return [K.sample_anchors(x[0], a["batch"], a["fg_fraction"], st.seed_for(n))]

    @kernel("sample_rois", writes="new")
    def sample_rois(n, x, st):
        a = n.attrs
        return list(K.sample_rois(x[0], x[1], x[2], a["batch"], a["fg_fraction"], a["fg_iou"], a["bg_iou"],
                                  a["bg_lo"], st.seed_for(n)))

    @kernel("hard_negatives", writes="new")
    def hard_negatives(n, x, st):
        return [K.hard_negatives(x[0], x[1], n.attrs["ratio"])]

    @kernel("positive", writes="new")
    def positive(n, x, st):
        return [K.positive(x[0], array_dtype(n.outputs[0].dtype, st.dtype), n.attrs["min"])]

    @kernel("match_gather", writes="new")
    def match_gather(n, x, st):
        return [located(n, K.match_gather, x[0], x[1], x[2], n.attrs["fill"])]

    @kernel("mask_targets", writes="new")
    def mask_targets(n, x, st):
        return [located(n, K.mask_targets, x[0], x[1], x[2], n.attrs["size"])]

    @kernel("keypoint_targets", writes="new")
    def keypoint_targets(n, x, st):
        return [located(n, K.keypoint_targets, x[0], x[1], x[2], n.attrs["size"])]

    @kernel("yolo_targets", writes="new")
    def yolo_targets(n, x, st):
        a = n.attrs
        return list(located(n, K.yolo_targets, x[0], x[1], x[2], a["boxes"], a["classes"], a["image"]))

    @kernel("yolo_decode", writes="new")
    def yolo_decode(n, x, st):
        a = n.attrs
        return list(K.yolo_decode(x[0], a["boxes"], a["classes"], a["image"]))
