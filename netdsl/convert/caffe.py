"""Caffe .prototxt (and .caffemodel) to netdsl.

Layers name their inputs and outputs by blob (`bottom` / `top`); an in-place layer
(top == bottom, Caffe's ReLU) writes a new version of the blob. Each layer becomes a
statement named after the layer, and each blob name means its latest version, so the
spec reads in Caffe's names. Parameters are named by layer: `conv1.weight`, `fc8.bias`;
a BatchNorm with the Scale after it is one `bn` named after the BatchNorm.
"""
from __future__ import annotations

import os

from ..errors import NetdslError
from .emit import Spec, call, ident
from .prototxt import Msg, parse

DATA = ("Data", "ImageData", "HDF5Data", "MemoryData", "WindowData", "DummyData", "Python")
KNOWN = ("Input", *DATA, "Convolution", "Pooling", "LRN", "InnerProduct", "ReLU", "Dropout", "Concat",
         "Eltwise", "BatchNorm", "Scale", "Softmax", "SoftmaxWithLoss", "Accuracy")


class Layer:
    def __init__(self, msg: Msg, path: str):
        self.msg, self.path = msg, path
        self.name = str(msg.get("name", ""))
        self.type = str(msg.get("type", ""))
        self.bottoms = [str(b) for b in msg.all("bottom")]
        self.tops = [str(t) for t in msg.all("top")]
        phases = [str(inc.get("phase", "")) for inc in msg.all("include") if isinstance(inc, Msg)]
        self.phase = phases[0] if len(phases) == 1 else None

    def where(self, key: str | None = None, sub: Msg | None = None) -> str:
        line = (sub or self.msg).line_of(key) if key else self.msg.line_of("type")
        return f"{self.path}:{line}: layer '{self.name}' ({self.type})"

    def fail(self, what: str, key: str | None = None, sub: Msg | None = None, hint: str | None = None):
        raise NetdslError(f"{self.where(key, sub)}: {what}", hint=hint)


def _square(l: Layer, p: Msg, key: str, default: int) -> int:
    """kernel_size / stride / pad: one value, or _h and _w that must agree (netdsl's are square)."""
    vs = p.all(key)
    h, w = p.get(key[:-5] + "_h" if key.endswith("_size") else key + "_h"), \
        p.get(key[:-5] + "_w" if key.endswith("_size") else key + "_w")
    if h is not None or w is not None:
        if h != w:
            l.fail(f"{key}: {h}x{w} is not square, and netdsl's kernels are", key)
        return int(h)
    if len(set(vs)) > 1:
        l.fail(f"{key}: {vs} is not square, and netdsl's kernels are", key, p)
    return int(vs[0]) if vs else default


def convert_prototxt(path: str, network: str | None = None) -> tuple[str, dict]:
    """(the .net text, layer name -> (netdsl name, kind) for the weights)."""
    try:
        text = open(path, encoding="utf-8").read()
    except OSError as e:
        raise NetdslError(f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise NetdslError(f"{path} is not a UTF-8 text file") from None
    net = parse(text, path)
    if net.all("layers"):
        raise NetdslError(f"{path}:{net.line_of('layers')}: this is Caffe's old V1 format ('layers')",
                          hint="upgrade it with Caffe's upgrade_net_proto_text, then import it")
    base = os.path.splitext(os.path.basename(path))[0]
    spec = Spec(network or ident(str(net.get("name", base))).lower())
    spec.header = [f"Converted by `netdsl import` from {os.path.basename(path)} (Caffe).",
                   "Variables and parameters are named after Caffe's layers (/ and other signs become _)."]
    taken: set[str] = {"image", "label"}
    blob: dict[str, str] = {}           # Caffe blob -> netdsl variable holding its latest version
    read: set[str] = set()              # blobs some kept layer reads
    weights: dict[str, tuple[str, str]] = {}

    # deploy-style inputs at the top of the file
    for i, name in enumerate(net.all("input")):
        shapes = net.all("input_shape")
        dims = [int(d) for d in shapes[i].all("dim")] if i < len(shapes) else \
            [int(d) for d in net.all("input_dim")[4 * i:4 * i + 4]]
        _input(spec, blob, taken, str(name), dims, f"{path}:{net.line_of('input')}: input '{name}'")

    layers = [Layer(m, path) for m in net.all("layer")]
    kept = []
    for l in layers:
        if l.type not in KNOWN:
            raise NetdslError(f"{path}:{l.msg.line_of('type')}: layer '{l.name}': unknown layer type "
                              f"'{l.type}'", hint="netdsl import converts " + ", ".join(KNOWN))
        if l.type == "Accuracy" or (l.phase == "TEST" and l.type not in DATA):
            spec.notes.append(f"left out: layer {l.name} ({l.type}{', TEST phase only' if l.phase else ''})")
            continue
        kept.append(l)
    for l in kept:
        read.update(l.bottoms)

    i = 0
    while i < len(kept):
        l = kept[i]
        i += 1
        t = l.type
        if t in DATA or t == "Input":
            if all(top in blob for top in l.tops):      # the TEST twin of a TRAIN data layer
                continue
            if t == "Input":
                shapes = l.msg.sub("input_param").all("shape")
                for k, top in enumerate(l.tops):
                    dims = [int(d) for d in shapes[min(k, len(shapes) - 1)].all("dim")] if shapes else []
                    _input(spec, blob, taken, top, dims, l.where())
                continue
            crop = l.msg.sub("transform_param").get("crop_size")
            mem = l.msg.sub("memory_data_param")
            if mem.get("height") is not None:
                dims = [1, int(mem.get("channels", 3)), int(mem.get("height")), int(mem.get("width"))]
            elif crop is not None:
                dims = [1, 3, int(crop), int(crop)]
            else:
                l.fail("the image size is not in the prototxt (no transform_param crop_size)",
                       hint="give the network an Input layer with input_param { shape { dim: ... } }")
            _input(spec, blob, taken, l.tops[0], dims, l.where())
            for top in l.tops[1:]:
                v = ident("label" if top == "label" else top, taken if top != "label" else None)
                spec.inputs.append((v, "i64[N]"))
                blob[top] = v
            continue
        ins = []
        for b in l.bottoms:
            if b not in blob:
                l.fail(f"bottom '{b}' is no earlier layer's top", "bottom")
            ins.append(blob[b])
        if not ins:
            l.fail("the layer has no bottom")
        name = ident(l.name, taken)
        x = ins[0]
        comment = f"{l.type} {l.name}" if name != l.name else l.type
        if t == "Convolution":
            p = l.msg.sub("convolution_param")
            c = int(p.get("num_output", 0))
            if c <= 0:
                l.fail("num_output must be positive", "num_output", p)
            k, s, pad = _square(l, p, "kernel_size", 0), _square(l, p, "stride", 1), _square(l, p, "pad", 0)
            d = int(p.get("dilation", 1))
            g, bias = int(p.get("group", 1)), bool(p.get("bias_term", True))
            spec.add(name, x, call("conv", c, k=k, s=s if s != 1 else None, p=pad or None, d=d if d != 1 else None,
                                   groups=g if g != 1 else None, bias=None if bias else False, name=name), comment)
            weights[l.name] = (name, "conv" if bias else "conv_nobias")
        elif t == "Pooling":
            p = l.msg.sub("pooling_param")
            kind = str(p.get("pool", "MAX"))
            if kind not in ("MAX", "AVE"):
                l.fail(f"pool: {kind} is not converted (MAX and AVE are)", "pool", p)
            if p.get("global_pooling", False):
                spec.add(name, x, call("global_maxpool" if kind == "MAX" else "global_avgpool", name=name), comment)
            else:       # Caffe rounds pooled sizes up: torch's ceil mode, same rule for the last window
                k, s, pad = _square(l, p, "kernel_size", 0), _square(l, p, "stride", 1), _square(l, p, "pad", 0)
                spec.add(name, x, call("maxpool" if kind == "MAX" else "avgpool", k=k, s=s, p=pad or None,
                                       ceil=True, name=name), comment)
        elif t == "LRN":
            p = l.msg.sub("lrn_param")
            if str(p.get("norm_region", "ACROSS_CHANNELS")) != "ACROSS_CHANNELS":
                l.fail("only ACROSS_CHANNELS normalisation is converted", "norm_region", p)
            spec.add(name, x, call("lrn", size=int(p.get("local_size", 5)), alpha=float(p.get("alpha", 1.0)),
                                   beta=float(p.get("beta", 0.75)), k=float(p.get("k", 1.0)), name=name), comment)
        elif t == "InnerProduct":
            p = l.msg.sub("inner_product_param")
            bias = bool(p.get("bias_term", True))
            if int(p.get("axis", 1)) != 1 or p.get("transpose", False):
                l.fail("only axis 1 without transpose is converted", "axis", p)
            spec.add(name, x, "flatten", comment)   # Caffe flattens everything after the batch axis
            spec.then(call("linear", int(p.get("num_output", 0)), bias=None if bias else False, name=name))
            weights[l.name] = (name, "linear" if bias else "linear_nobias")
        elif t == "ReLU":
            slope = float(l.msg.sub("relu_param").get("negative_slope", 0.0))
            spec.add(name, x, call("leaky_relu", slope=slope, name=name) if slope else call("relu", name=name),
                     comment)
        elif t == "Dropout":
            spec.add(name, x, call("dropout", float(l.msg.sub("dropout_param").get("dropout_ratio", 0.5)),
                                   name=name), comment)
        elif t == "Concat":
            p = l.msg.sub("concat_param")
            axis = int(p.get("axis", p.get("concat_dim", 1)))
            spec.add(name, f"concat({', '.join(ins)}, axis={axis}, name=\"{name}\")" if axis != 1
                     else f"concat({', '.join(ins)}, name=\"{name}\")", comment=comment)
        elif t == "Eltwise":
            p = l.msg.sub("eltwise_param")
            op = {"SUM": "add", "PROD": "mul"}.get(str(p.get("operation", "SUM")))
            if op is None:
                l.fail(f"operation {p.get('operation')} is not converted (SUM and PROD are)", "operation", p)
            if any(float(c) != 1.0 for c in p.all("coeff")):
                l.fail("coefficients other than 1 are not converted", "coeff", p)
            expr = ins[0]
            for j, b in enumerate(ins[1:]):
                last = j == len(ins) - 2
                expr = f"{op}({expr}, {b}" + (f', name="{name}")' if last else ")")
            spec.add(name, expr, comment=comment)
        elif t == "BatchNorm":
            p = l.msg.sub("batch_norm_param")
            eps = float(p.get("eps", 1e-5))
            nxt = kept[i] if i < len(kept) else None
            affine = nxt is not None and nxt.type == "Scale" and nxt.bottoms == l.tops
            spec.add(name, x, call("bn", eps=eps, affine=None if affine else False, name=name),
                     comment + (f" + Scale {nxt.name}" if affine else ""))
            weights[l.name] = (name, "bn")
            if affine:
                sp = nxt.msg.sub("scale_param")
                weights[nxt.name] = (name, "scale" if sp.get("bias_term", False) else "scale_nobias")
                blob[nxt.tops[0]] = name
                i += 1
        elif t == "Scale":
            l.fail("a Scale layer is converted only right after the BatchNorm it scales")
        elif t == "Softmax":
            axis = int(l.msg.sub("softmax_param").get("axis", 1))
            spec.add(name, x, call("softmax", axis=axis, name=name), comment)
        elif t == "SoftmaxWithLoss":
            if len(ins) != 2:
                l.fail("SoftmaxWithLoss takes two bottoms, the scores and the labels")
            w = l.msg.get("loss_weight", 1)
            ignore = l.msg.sub("loss_param").get("ignore_label")
            ce = call("cross_entropy", ins[0], ins[1], ignore_index=ignore) if ignore is not None else \
                f"cross_entropy({ins[0]}, {ins[1]})"
            spec.losses.append(f"loss {name} = {ce}" + (f" weight {w}" if float(w) != 1.0 else "")
                               + (" phase train" if l.phase == "TRAIN" else ""))
            if all(o != ins[0] for o, _ in spec.outputs):
                spec.outputs.append((ins[0], f"the scores of loss {l.name}"))
            continue
        for top in l.tops:
            blob[top] = name
    # blobs nothing reads are the network's outputs (a deploy net's prob)
    for top, v in blob.items():
        if top not in read and v not in [n for n, _ in spec.outputs] and v not in [n for n, _ in spec.inputs]:
            spec.outputs.append((v, ""))
    if not spec.outputs:
        raise NetdslError(f"{path}: the network has no output")
    return spec.render(), weights


def _input(spec: Spec, blob: dict, taken: set, top: str, dims: list[int], where: str):
    if len(dims) != 4:
        raise NetdslError(f"{where}: the input needs 4 dims (N, C, H, W), got {dims or 'none'}")
    v = "image" if not spec.inputs else ident(top, taken)
    spec.inputs.append((v, f"f32[N, {dims[1]}, {dims[2]}, {dims[3]}]"))
    blob[top] = v
