"""Darknet .cfg (and .weights) to netdsl.

A cfg is a list of [sections] of key=value lines; [net] gives the input, every other
section is one layer, and [route] / [shortcut] wire layers by index (relative when
negative). Here every layer's output gets a name (`conv12`, `res15`, `up86`...) and
each index becomes that name. The parameter paths are those names: `conv12.weight`
and `conv12.bias`, or `conv12.conv.weight` and `conv12.bn.*` with batch_normalize.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from ..errors import NetdslError
from .emit import Spec, call, ident

KNOWN = ("net", "network", "convolutional", "maxpool", "route", "shortcut", "upsample", "yolo", "region")
ACTIVATIONS = {"leaky": "leaky_relu(slope=0.1)", "relu": "relu", "linear": None, "mish": "mish(name=NAME)",
               "logistic": "sigmoid", "swish": "silu", "tanh": "tanh"}

CONV_BN = """# [convolutional] with batch_normalize=1: the conv has no bias, the batch norm's shift
# takes its place (darknet's eps 1e-5 on the variance, as its CUDNN path)
block conv_bn(x, c, k, s, p, groups) {
  return x -> conv(c, k=k, s=s, p=p, groups=groups, bias=false, name="conv") -> bn(eps=1e-5, name="bn")
}"""
MISH = """# darknet's mish: x * tanh(softplus(x))
block mish(x) {
  return x * tanh(log(exp(x) + 1.0))
}"""


@dataclass
class Section:
    kind: str
    line: int
    opts: dict[str, tuple[str, int]] = field(default_factory=dict)   # key -> (value, line)


@dataclass
class Layer:
    """A converted layer: its output name, channels, and (for a conv) what its weights are."""
    index: int
    kind: str
    name: str
    channels: int
    conv: dict | None = None       # c_in, c_out, k, groups, bn


def parse_cfg(text: str, path: str) -> list[Section]:
    sections: list[Section] = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].split(";", 1)[0].strip()
        if not line:
            continue
        if line.startswith("["):
            if not line.endswith("]"):
                raise NetdslError(f"{path}:{n}: a section header must end with ']': {line}")
            sections.append(Section(line[1:-1].strip().lower(), n))
        elif "=" in line:
            if not sections:
                raise NetdslError(f"{path}:{n}: '{line}' comes before the first [section]")
            k, v = line.split("=", 1)
            sections[-1].opts[k.strip()] = (v.strip(), n)
        else:
            raise NetdslError(f"{path}:{n}: expected [section] or key=value, got '{line}'")
    if not sections or sections[0].kind not in ("net", "network"):
        raise NetdslError(f"{path}: a darknet cfg starts with a [net] section")
    return sections


class _Opts:
    def __init__(self, sec: Section, path: str, index: int):
        self.sec, self.path, self.index = sec, path, index

    def where(self, key: str | None = None) -> str:
        line = self.sec.opts[key][1] if key in self.sec.opts else self.sec.line
        return f"{self.path}:{line}: layer {self.index} [{self.sec.kind}]"

    def get(self, key: str, default=None, kind=int):
        if key not in self.sec.opts:
            return default
        v = self.sec.opts[key][0]
        try:
            return kind(v)
        except ValueError:
            raise NetdslError(f"{self.where(key)}: {key}={v} is not {'an integer' if kind is int else 'a number'}") \
                from None

    def ints(self, key: str) -> list[int]:
        v = self.sec.opts.get(key, ("", 0))[0]
        try:
            return [int(t) for t in v.split(",") if t.strip()]
        except ValueError:
            raise NetdslError(f"{self.where(key)}: {key}={v} is not a list of integers") from None


def convert_cfg(path: str, network: str | None = None) -> tuple[str, list[Layer]]:
    """(the .net text, the layers in order, for the weights)."""
    text = _read_text(path)
    sections = parse_cfg(text, path)
    net = _Opts(sections[0], path, -1)
    C, H, W = net.get("channels", 3), net.get("height", 416), net.get("width", 416)
    spec = Spec(network or ident(os.path.splitext(os.path.basename(path))[0]).lower())
    spec.header = [f"Converted by `netdsl import` from {os.path.basename(path)} (darknet).",
                   "Wires are named by kind and darknet layer index (conv12 is layer 12); the",
                   "comment after each stage is the darknet layer it comes from."]
    spec.inputs.append(("image", f"f32[N, {C}, {H}, {W}]"))
    layers: list[Layer] = []
    prev, prev_c = "image", C
    uses_bn = uses_mish = False
    for i, sec in enumerate(sections[1:]):
        o = _Opts(sec, path, i)
        if sec.kind not in KNOWN or sec.kind in ("net", "network"):
            raise NetdslError(f"{path}:{sec.line}: layer {i}: unknown layer type [{sec.kind}]",
                              hint="netdsl import converts " + ", ".join(f"[{k}]" for k in KNOWN[2:]))

        def ref(j: int, key: str) -> Layer:
            k = i + j if j < 0 else j
            if not 0 <= k < i:
                raise NetdslError(f"{o.where(key)}: {key} refers to layer {k}, which is not before layer {i}")
            return layers[k]

        comment = f"{i} {sec.kind}"
        if sec.kind == "convolutional":
            c = o.get("filters", 1)
            k, s = o.get("size", 1), o.get("stride", 1)
            p = k // 2 if o.get("pad", 0) else o.get("padding", 0)
            g = o.get("groups", 1)
            bn = bool(o.get("batch_normalize", 0))
            act = o.sec.opts.get("activation", ("logistic", 0))[0]
            if act not in ACTIVATIONS:
                raise NetdslError(f"{o.where('activation')}: activation {act} is not converted",
                                  hint="known: " + ", ".join(ACTIVATIONS))
            if c <= 0 or k <= 0 or s <= 0 or g <= 0 or prev_c % g or c % g:
                raise NetdslError(f"{o.where()}: filters={c} size={k} stride={s} groups={g} do not fit "
                                  f"{prev_c} input channels")
            name = f"conv{i}"
            if bn:
                uses_bn = True
                spec.add(name, prev, call("conv_bn", c, k, s, p, g, name=name), comment)
            else:
                spec.add(name, prev, call("conv", c, k=k, s=s if s != 1 else None, p=p or None,
                                          groups=g if g != 1 else None, name=name), comment)
            if ACTIVATIONS[act]:
                uses_mish |= act == "mish"
                spec.then(ACTIVATIONS[act].replace("NAME", f'"mish{i}"'))
            layers.append(Layer(i, sec.kind, name, c, dict(c_in=prev_c, c_out=c, k=k, groups=g, bn=bn)))
        elif sec.kind == "maxpool":
            k, s = o.get("size", o.get("stride", 1)), o.get("stride", 1)
            name = f"pool{i}"
            if k % 2:       # darknet pads size-1 in all, half before: symmetric for odd sizes
                spec.add(name, prev, call("maxpool", k=k, s=s, p=(k - 1) // 2 or None, name=name), comment)
            elif k == s:    # even: nothing before, one fewer after than needed: torch's ceil mode
                spec.add(name, prev, call("maxpool", k=k, s=s, ceil=True, name=name), comment)
            else:
                raise NetdslError(f"{o.where()}: a maxpool of even size {k} with stride {s} has darknet's "
                                  f"lopsided padding, which netdsl's maxpool does not have")
            layers.append(Layer(i, sec.kind, name, prev_c))
        elif sec.kind == "route":
            refs = o.ints("layers")
            if not refs:
                raise NetdslError(f"{o.where()}: [route] needs layers=")
            if o.get("groups", 1) != 1:
                raise NetdslError(f"{o.where('groups')}: [route] with groups is not converted")
            src = [ref(j, "layers") for j in refs]
            if len(src) == 1:       # a route of one layer only re-reads it: no node
                layers.append(Layer(i, sec.kind, src[0].name, src[0].channels))
            else:
                name = f"route{i}"
                spec.add(name, f"concat({', '.join(l.name for l in src)}, name=\"{name}\")",
                         comment=f"{i} route layers={','.join(str(l.index) for l in src)}")
                layers.append(Layer(i, sec.kind, name, sum(l.channels for l in src)))
        elif sec.kind == "shortcut":
            refs = o.ints("from")
            if len(refs) != 1:
                raise NetdslError(f"{o.where('from')}: [shortcut] needs one from= layer")
            src = ref(refs[0], "from")
            if src.channels != prev_c:
                raise NetdslError(f"{o.where('from')}: [shortcut] adds layer {src.index} ({src.channels} channels) "
                                  f"to {prev_c} channels: darknet's partial add is not converted")
            act = o.sec.opts.get("activation", ("linear", 0))[0]
            if act not in ACTIVATIONS:
                raise NetdslError(f"{o.where('activation')}: activation {act} is not converted")
            name = f"res{i}"
            spec.add(name, f"add({prev}, {src.name}, name=\"{name}\")", comment=f"{i} shortcut from={src.index}")
            if ACTIVATIONS[act]:
                uses_mish |= act == "mish"
                spec.then(ACTIVATIONS[act].replace("NAME", f'"mish{i}"'))
            layers.append(Layer(i, sec.kind, name, prev_c))
        elif sec.kind == "upsample":
            name = f"up{i}"
            spec.add(name, prev, call("upsample", scale=o.get("stride", 2), name=name), comment)
            layers.append(Layer(i, sec.kind, name, prev_c))
        else:   # yolo / region: a loss and decoder in darknet; the raw head tensor is the output here
            keys = [k for k in ("mask", "anchors", "classes", "num") if k in sec.opts]
            desc = " ".join(f"{k}={sec.opts[k][0]}" for k in keys)
            spec.outputs.append((prev, f"layer {i} [{sec.kind}] {desc}: the raw head (boxes are decoded "
                                       f"outside netdsl)"))
            layers.append(Layer(i, sec.kind, prev, prev_c))
        prev, prev_c = layers[-1].name, layers[-1].channels
    if not spec.outputs:
        spec.outputs.append((prev, f"layer {len(layers) - 1}, the last"))
    spec.blocks = ([CONV_BN] if uses_bn else []) + ([MISH] if uses_mish else [])
    return spec.render(), layers


def convert_weights(path: str, layers: list[Layer]) -> dict[str, np.ndarray]:
    """Parameters by path from a darknet .weights file: a header (major, minor,
    revision as int32, images seen as int64 from version 0.2 on, else int32), then per
    conv layer in order: BN shift, scale, mean, variance (or the conv bias), then the
    conv weights [c_out, c_in/groups, k, k], all float32 little-endian."""
    try:
        data = open(path, "rb").read()
    except OSError as e:
        raise NetdslError(f"cannot read weights {path}: {e.strerror}") from None
    if len(data) < 16:
        raise NetdslError(f"{path} is too short for a darknet weights header")
    major, minor, _rev = np.frombuffer(data, "<i4", 3)
    off = 20 if major * 10 + minor >= 2 else 16
    floats = np.frombuffer(data, "<f4", (len(data) - off) // 4, off)
    pos, out = 0, {}

    def take(n, what, layer):
        nonlocal pos
        if pos + n > len(floats):
            raise NetdslError(f"{path} ends inside layer {layer.index}'s {what}: the weights are for "
                              f"another cfg")
        a = floats[pos:pos + n].copy()
        pos += n
        return a

    for l in layers:
        if l.conv is None:
            continue
        cv = l.conv
        n = cv["c_out"]
        if cv["bn"]:
            for key in ("bias", "weight", "running_mean", "running_var"):
                out[f"{l.name}.bn.{key}"] = take(n, "batch norm", l)
            wkey = f"{l.name}.conv.weight"
        else:
            out[f"{l.name}.bias"] = take(n, "bias", l)
            wkey = f"{l.name}.weight"
        shape = (n, cv["c_in"] // cv["groups"], cv["k"], cv["k"])
        out[wkey] = take(int(np.prod(shape)), "weights", l).reshape(shape)
    if pos != len(floats) or (len(data) - off) % 4:
        raise NetdslError(f"{path} holds {len(data) - off - 4 * pos} bytes more than the cfg's layers take: "
                          f"the weights are for another cfg")
    return out


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise NetdslError(f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise NetdslError(f"{path} is not a UTF-8 text file") from None
