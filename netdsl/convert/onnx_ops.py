"""Each netdsl operator as ONNX nodes (opset 17), for onnx_export.py.

A rule takes the exporter and a node, emits ONNX nodes reading `ex.name(input)` and
writing `ex.out_name(node, i)`. The semantics are netdsl's (and torch's, which netdsl
follows); where ONNX differs the rule says how it is bridged.
"""
from __future__ import annotations

import numpy as np

from ..errors import NetdslError
from .onnx_export import np_dtype

RULES: dict = {}


def rule(*names):
    def put(fn):
        for n in names:
            RULES[n] = fn
        return fn
    return put


def emit(ex, n) -> None:
    fn = RULES.get(n.op)
    if fn is None:
        raise NetdslError(f"cannot export operator '{n.op}' ({n.path}) to ONNX: it has no ONNX form here", n.pos)
    fn(ex, n)


def _x(ex, n, i: int = 0) -> str:
    return ex.name(n.inputs[i])


def _y(ex, n, i: int = 0) -> str:
    return ex.out_name(n, i)


def _scalar(ex, n, value, i: int = 0) -> str:
    """A 0-d constant of the dtype of the node's i-th input."""
    return ex.const(np.asarray(value, dtype=np_dtype(n.inputs[i].dtype)))


def _pads(p) -> list[int]:
    return [p[0], p[1], p[0], p[1]]      # ONNX: all begins, then all ends


# ---------------------------------------------------------------- elementwise

_SIMPLE = {"relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh", "exp": "Exp", "log": "Log", "neg": "Neg",
           "sqrt": "Sqrt", "hardswish": "HardSwish", "add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div",
           "dropout": "Identity", "drop_path": "Identity", "detach": "Identity",
           "global_avgpool": "GlobalAveragePool", "global_maxpool": "GlobalMaxPool"}


@rule(*_SIMPLE)
def _simple(ex, n):
    ex.add(_SIMPLE[n.op], [_x(ex, n, i) for i in range(len(n.inputs))], [_y(ex, n)], n)


@rule("leaky_relu")
def _leaky(ex, n):
    ex.add("LeakyRelu", [_x(ex, n)], [_y(ex, n)], n, alpha=float(n.attrs.get("slope", 0.01)))


@rule("relu6", "clamp")
def _clip(ex, n):
    lo, hi = (0.0, 6.0) if n.op == "relu6" else (n.attrs.get("min", -np.inf), n.attrs.get("max", np.inf))
    ins = [_x(ex, n), _scalar(ex, n, lo) if np.isfinite(lo) else "", _scalar(ex, n, hi) if np.isfinite(hi) else ""]
    while ins[-1] == "":
        ins.pop()
    ex.add("Clip", ins, [_y(ex, n)], n)


@rule("silu", "swish")
def _silu(ex, n):
    ex.add("Mul", [_x(ex, n), ex.one("Sigmoid", [_x(ex, n)], n)], [_y(ex, n)], n)


@rule("gelu")
def _gelu(ex, n):
    # the exact (erf) form, as netdsl and torch's default; ONNX's Gelu op is opset 20
    x = _x(ex, n)
    e = ex.one("Erf", [ex.one("Mul", [x, _scalar(ex, n, 0.7071067811865476)], n)], n)
    half_x = ex.one("Mul", [x, _scalar(ex, n, 0.5)], n)
    ex.add("Mul", [half_x, ex.one("Add", [e, _scalar(ex, n, 1.0)], n)], [_y(ex, n)], n)


@rule("square")
def _square(ex, n):
    ex.add("Mul", [_x(ex, n), _x(ex, n)], [_y(ex, n)], n)


@rule("scale")
def _scale(ex, n):
    ex.add("Mul", [_x(ex, n), _scalar(ex, n, n.attrs["factor"])], [_y(ex, n)], n)


@rule("shift")
def _shift(ex, n):
    ex.add("Add", [_x(ex, n), _scalar(ex, n, n.attrs["amount"])], [_y(ex, n)], n)


# ---------------------------------------------------------------- layers

def _bias(ex, n) -> list[str]:
    b = n.params.get("bias")
    return [ex.param(b.name)] if b is not None else []


@rule("conv")
def _conv(ex, n):
    a = n.attrs
    ex.add("Conv", [_x(ex, n), ex.param(n.params["weight"].name)] + _bias(ex, n), [_y(ex, n)], n,
           kernel_shape=list(a["k"]), strides=list(a["s"]), pads=_pads(a["p"]), dilations=list(a["d"]),
           group=int(a["groups"]))


@rule("conv_transpose")
def _conv_transpose(ex, n):
    a = n.attrs      # weight [Cin, Cout/groups, kh, kw]: torch's layout is ONNX's
    ex.add("ConvTranspose", [_x(ex, n), ex.param(n.params["weight"].name)] + _bias(ex, n), [_y(ex, n)], n,
           kernel_shape=list(a["k"]), strides=list(a["s"]), pads=_pads(a["p"]), dilations=list(a["d"]),
           group=int(a["groups"]), output_padding=list(a.get("output_padding", (0, 0))))


@rule("linear")
def _linear(ex, n):
    w = n.params["weight"].name
    if n.inputs[0].rank == 2:
        ex.add("Gemm", [_x(ex, n), ex.param(w)] + _bias(ex, n), [_y(ex, n)], n, transB=1)
        return
    # [..., K] @ W^T: MatMul broadcasts over the leading axes (Gemm is 2-D only)
    y = ex.one("MatMul", [_x(ex, n), ex.param(w, np.transpose, ".T")], n)
    ex.add("Add" if n.params.get("bias") else "Identity", [y] + _bias(ex, n), [_y(ex, n)], n)


@rule("bn")
def _bn(ex, n):
    p = n.params
    C = n.inputs[0].shape[1]
    dt = np_dtype(n.inputs[0].dtype)
    scale = ex.param(p["weight"].name) if "weight" in p else ex.const(np.ones(C, dt))
    shift = ex.param(p["bias"].name) if "bias" in p else ex.const(np.zeros(C, dt))
    ex.add("BatchNormalization", [_x(ex, n), scale, shift, ex.param(p["running_mean"].name),
                                  ex.param(p["running_var"].name)], [_y(ex, n)], n,
           epsilon=float(n.attrs["eps"]), momentum=1.0 - float(n.attrs["momentum"]))


@rule("lrn")
def _lrn(ex, n):
    a = n.attrs
    size, alpha, beta, k = int(a["size"]), float(a["alpha"]), float(a["beta"]), float(a["k"])
    if size % 2:    # an odd window is centred alike in ONNX and torch
        ex.add("LRN", [_x(ex, n)], [_y(ex, n)], n, size=size, alpha=alpha, beta=beta, bias=k)
        return
    # even: torch sums channels [c - size//2, c + (size-1)//2], ONNX the mirror image;
    # written out: a channel-window mean of x^2 over zero-padded channels
    x = _x(ex, n)
    sq = ex.one("Unsqueeze", [ex.one("Mul", [x, x], n), ex.ints([1])], n)         # [N, 1, C, H, W]
    pads = [0, 0, size // 2, 0, 0, 0, 0, (size - 1) // 2, 0, 0]
    sq = ex.one("Pad", [sq, ex.ints(pads)], n)
    mean = ex.one("AveragePool", [sq], n, kernel_shape=[size, 1, 1])
    mean = ex.one("Squeeze", [mean, ex.ints([1])], n)
    s = ex.one("Add", [ex.one("Mul", [mean, _scalar(ex, n, alpha)], n), _scalar(ex, n, k)], n)
    ex.add("Div", [x, ex.one("Pow", [s, _scalar(ex, n, beta)], n)], [_y(ex, n)], n)


def _strides(n) -> list[int]:
    return [si or ki for si, ki in zip(n.attrs["s"], n.attrs["k"])]


def _overhang(n) -> list[int]:
    """Rows (columns) a ceil-mode pool's last window reaches past the padded input. ONNX's
    ceil_mode lacks torch's rule that the last window starts inside the input or its left
    padding (onnxruntime has it, the spec's shape inference not), so ceil mode is
    exported as floor mode with that much more padding at the end."""
    if not n.attrs.get("ceil"):
        return [0, 0]
    ins, outs = n.inputs[0].shape[2:], n.outputs[0].shape[2:]
    if not all(isinstance(d, int) for d in (*ins, *outs)):
        raise NetdslError(f"cannot export a ceil-mode {n.op} over a {ins[0]}x{ins[1]} input: ONNX needs its size "
                          "fixed", n.pos, hint="fix the input size with --set")
    return [max(0, (o - 1) * s + k - (i + 2 * p))
            for i, o, s, k, p in zip(ins, outs, _strides(n), n.attrs["k"], n.attrs["p"])]


@rule("maxpool")
def _maxpool(ex, n):
    k, p, e = list(n.attrs["k"]), n.attrs["p"], _overhang(n)
    x, pads = _x(ex, n), [p[0], p[1], p[0] + e[0], p[1] + e[1]]
    padded = any(q >= kk for q, kk in zip(pads[2:], k))
    if padded:      # onnxruntime wants pads below the kernel: pad with -inf first
        x = ex.one("Pad", [x, ex.ints([0, 0, *pads[:2], 0, 0, *pads[2:]]), _scalar(ex, n, -np.inf)], n)
        pads = [0, 0, 0, 0]
    attrs = dict(kernel_shape=k, strides=_strides(n), pads=pads)
    if not n.attrs.get("switches"):
        ex.add("MaxPool", [x], [_y(ex, n)], n, **attrs)
        return
    if padded:      # the indices would count the padding
        raise NetdslError("cannot export maxpool(switches=true) whose last window reaches this far past the "
                          "input (ceil=true with a stride above the kernel)", n.pos)
    # ONNX's indices run over the whole tensor (n, c included); netdsl's switches within
    # one plane. MaxUnpool reads ONNX's; anything else reads index mod H*W.
    idx = ex.fresh(f"{n.path}/indices")
    ex.add("MaxPool", [x], [_y(ex, n), idx], n, **attrs)
    sw = n.outputs[1]
    ex.aux[id(sw)] = idx
    if any(c.op != "max_unpool" for c in ex.consumers.get(id(sw), [])) or _is_output(ex, sw):
        H, W = n.inputs[0].shape[2:]
        ex.add("Mod", [idx, ex.shape([H * W])], [_y(ex, n, 1)], n)
    else:
        ex.names[id(sw)] = idx


def _is_output(ex, v) -> bool:
    return any(o is v for o in ex.g.outputs.values())


@rule("max_unpool")
def _max_unpool(ex, n):
    x, sw = n.inputs
    idx = ex.aux.get(id(sw))
    if idx is None:
        raise NetdslError("cannot export max_unpool: its switches do not come from a maxpool(switches=true) "
                          "of this graph", n.pos)
    N, C, OH, OW = n.outputs[0].shape
    shape = ex.one("Concat", [ex.one("Shape", [ex.name(x)], n, start=0, end=2), ex.shape([OH, OW])], n, axis=0)
    ex.add("MaxUnpool", [ex.name(x), idx, shape], [_y(ex, n)], n,
           kernel_shape=list(n.attrs["k"]), strides=_strides(n), pads=_pads(n.attrs["p"]))


@rule("avgpool")
def _avgpool(ex, n):
    k, p, e = list(n.attrs["k"]), n.attrs["p"], _overhang(n)
    if e == [0, 0]:     # every window inside the padded input: torch's divisor is k*k, as ONNX's
        ex.add("AveragePool", [_x(ex, n)], [_y(ex, n)], n, kernel_shape=k, strides=_strides(n), pads=_pads(p),
               count_include_pad=1)
        return
    # torch counts the padding but not the overhang past it: pad explicitly with zeros,
    # then let the overhang be ONNX padding that is not counted
    x = ex.one("Pad", [_x(ex, n), ex.ints([0, 0, *p, 0, 0, *p])], n)
    ex.add("AveragePool", [x], [_y(ex, n)], n, kernel_shape=k, strides=_strides(n), pads=[0, 0, *e],
           count_include_pad=0)


def _adaptive_matrix(size_in: int, size_out: int, dtype) -> np.ndarray:
    """[size_out, size_in]: row i averages inputs floor(i*H/h) .. ceil((i+1)*H/h) - 1."""
    m = np.zeros((size_out, size_in), np.float64)
    for i in range(size_out):
        a, b = (i * size_in) // size_out, -((-(i + 1) * size_in) // size_out)
        m[i, a:b] = 1.0 / (b - a)
    return m.astype(dtype)


@rule("adaptive_avgpool")
def _adaptive(ex, n):
    H, W = n.inputs[0].shape[2:]
    h, w = n.attrs["size"]
    if not (isinstance(H, int) and isinstance(W, int)):
        raise NetdslError(f"cannot export adaptive_avgpool over a {H}x{W} input: ONNX needs its size fixed",
                          n.pos, hint="fix the input size with --set")
    x = _x(ex, n)
    if (H, W) == (h, w):
        ex.add("Identity", [x], [_y(ex, n)], n)
    elif H % h == 0 and W % w == 0:     # equal windows: an ordinary average pool
        ex.add("AveragePool", [x], [_y(ex, n)], n, kernel_shape=[H // h, W // w], strides=[H // h, W // w])
    else:   # unequal windows: two averaging matrices, rows then columns (ONNX has no adaptive pool)
        dt = np_dtype(n.inputs[0].dtype)
        cols = ex.one("MatMul", [x, ex.const(_adaptive_matrix(W, w, dt).T)], n)
        ex.add("MatMul", [ex.const(_adaptive_matrix(H, h, dt)), cols], [_y(ex, n)], n)


@rule("upsample")
def _upsample(ex, n):
    s = float(n.attrs["scale"])
    scales = ex.const(np.asarray([1.0, 1.0, s, s], np.float32))
    if n.attrs.get("mode", "nearest") == "nearest":
        ex.add("Resize", [_x(ex, n), "", scales], [_y(ex, n)], n, mode="nearest",
               coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    else:   # torch's bilinear, align_corners=False
        ex.add("Resize", [_x(ex, n), "", scales], [_y(ex, n)], n, mode="linear",
               coordinate_transformation_mode="half_pixel")


@rule("bed_of_nails")
def _bed_of_nails(ex, n):
    # each value to its block's top-left corner: a depthwise transpose convolution with a
    # one-hot s x s kernel and stride s (exact: products with 1, sums with 0)
    s, C = int(n.attrs["scale"]), n.inputs[0].shape[1]
    k = np.zeros((C, 1, s, s), np_dtype(n.inputs[0].dtype))
    k[:, :, 0, 0] = 1
    ex.add("ConvTranspose", [_x(ex, n), ex.const(k)], [_y(ex, n)], n, kernel_shape=[s, s], strides=[s, s], group=C)


# ---------------------------------------------------------------- structure

@rule("flatten")
def _flatten(ex, n):
    start = n.attrs["start"] % n.inputs[0].rank
    ex.add("Reshape", [_x(ex, n), ex.ints([0] * start + [-1])], [_y(ex, n)], n)


@rule("reshape")
def _reshape(ex, n):
    ex.add("Reshape", [_x(ex, n), ex.shape(n.outputs[0].shape)], [_y(ex, n)], n)


@rule("transpose")
def _transpose(ex, n):
    ex.add("Transpose", [_x(ex, n)], [_y(ex, n)], n, perm=list(n.attrs["perm"]))


@rule("concat")
def _concat(ex, n):
    ex.add("Concat", [ex.name(v) for v in n.inputs], [_y(ex, n)], n, axis=n.attrs["axis"] % n.inputs[0].rank)


@rule("split")
def _split(ex, n):
    axis = n.attrs["axis"] % n.inputs[0].rank
    sizes = [o.shape[axis] for o in n.outputs]
    ex.add("Split", [_x(ex, n), ex.shape(sizes)], [_y(ex, n, i) for i in range(len(n.outputs))], n, axis=axis)


@rule("slice")
def _slice(ex, n):
    ranges = [(ax, ix) for ax, ix in enumerate(n.attrs["index"]) if isinstance(ix, tuple)]
    picks = [(ax, ix) for ax, ix in enumerate(n.attrs["index"]) if not isinstance(ix, tuple)]
    cur = _x(ex, n)
    if ranges:
        big = 2 ** 63 - 1
        starts = [0 if a is None else a for _, (a, _) in ranges]
        ends = [big if b is None else b for _, (_, b) in ranges]
        cur = ex.one("Slice", [cur, ex.shape(starts), ex.shape(ends), ex.ints([ax for ax, _ in ranges])], n)
    for ax, ix in sorted(picks, reverse=True):      # the last axis first: the earlier keep their numbers
        cur = ex.one("Gather", [cur, ex.const(np.int64(ix))], n, axis=ax)
    ex.add("Identity", [cur], [_y(ex, n)], n)


@rule("pad")
def _pad(ex, n):
    r = n.inputs[0].rank
    a = n.attrs["axis"] % r
    pads = [0] * (2 * r)
    pads[a], pads[r + a] = n.attrs["before"], n.attrs["after"]
    ex.add("Pad", [_x(ex, n), ex.ints(pads)], [_y(ex, n)], n)


@rule("softmax", "log_softmax")
def _softmax(ex, n):
    ex.add("Softmax" if n.op == "softmax" else "LogSoftmax", [_x(ex, n)], [_y(ex, n)], n, axis=n.attrs["axis"])


@rule("sum", "mean")
def _reduce(ex, n):
    from ..ops.tensor import reduced_axes
    axes = list(reduced_axes(n.attrs["axis"], n.inputs[0].rank))
    keep = int(bool(n.attrs.get("keepdim")))
    if n.op == "sum":           # opset 13+: ReduceSum's axes are an input
        ex.add("ReduceSum", [_x(ex, n), ex.ints(axes)], [_y(ex, n)], n, keepdims=keep)
    else:                       # ReduceMean's are an attribute until opset 18
        ex.add("ReduceMean", [_x(ex, n)], [_y(ex, n)], n, axes=axes, keepdims=keep)


@rule("zeros", "fill")
def _fill(ex, n):
    v = n.outputs[0]
    value = 0 if n.op == "zeros" else n.attrs["value"]
    t = ex.numpy_helper.from_array(np.asarray([value], dtype=np_dtype(v.dtype)), "value")
    ex.add("ConstantOfShape", [ex.shape(v.shape)], [_y(ex, n)], n, value=t)


@rule("embedding")
def _embedding(ex, n):
    ex.add("Gather", [ex.param(n.params["weight"].name), _x(ex, n)], [_y(ex, n)], n, axis=0)


@rule("one_hot")
def _one_hot(ex, n):
    ex.add("OneHot", [_x(ex, n), ex.ints([n.attrs["classes"]]), ex.const(np.asarray([0, 1], np.float32))],
           [_y(ex, n)], n, axis=-1)


@rule("argmax")
def _argmax(ex, n):
    ex.add("ArgMax", [_x(ex, n)], [_y(ex, n)], n, axis=n.attrs["axis"], keepdims=0)


from . import onnx_scan  # noqa: E402,F401  (the recurrent rules register themselves)
