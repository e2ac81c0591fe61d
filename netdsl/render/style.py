"""How things look: operator families and their colours, box texts, shape labels.

Colours are pale fills with a darker border of the same hue (after ColorBrewer's
Pastel1/Set1), so black text stays readable on every box and families stay apart on
a grey-scale print too, by border darkness.
"""
from __future__ import annotations

import html

from ..ir.dims import Sym
from ..ir.graph import Node

# family: (fill, border, legend text)
FAMILIES = {
    "conv":       ("#dbe8f6", "#3d6fa8", "convolution"),
    "linear":     ("#e6dcf0", "#6a4c93", "linear / embedding"),
    "norm":       ("#fdf2c9", "#b08d10", "normalisation"),
    "activation": ("#dcefd6", "#4a8a3a", "activation"),
    "pool":       ("#fde3c8", "#c0701a", "pooling / resampling"),
    "merge":      ("#f6d9e6", "#a84673", "merge (add, mul, concat)"),
    "math":       ("#eee4dc", "#8a6b55", "elementwise math"),
    "shape":      ("#ececec", "#777777", "reshape / slice / split"),
    "dropout":    ("#f2f2f2", "#999999", "dropout"),
    "recurrent":  ("#d4efef", "#2f8585", "recurrent cell"),
    "detection":  ("#d9f0e3", "#2e7d5b", "detection"),
    "loss":       ("#f8d3d0", "#c0392b", "loss"),
    "other":      ("#f5f5f5", "#888888", "other"),
}
BLOCK = ("#eef2f8", "#5b6f8e")          # a block drawn as one box (--depth)
STATE = ("#cfe8f9", "#1f6fb2")          # a recurrence's carried state
INPUT = ("#ffffff", "#333333")
BACK_EDGE = "#1f6fb2"
# a recurrence's backward: the loop's violet to the forward's blue
GRAD_STATE = ("#e4dcf6", "#6741b0")     # a carried state's gradient
GRAD_EDGE = "#6741b0"
GRAD_LOOP = "#f5f2fc"
SAVED_EDGE = "#9a86c8"                  # a forward value saved per step, read by the backward
TRAIN_GREY = "#8a8a8a"

_BY_OP = {
    "conv": "conv", "conv_transpose": "conv",
    "linear": "linear", "embedding": "linear",
    "bn": "norm", "lrn": "norm", "layer_norm": "norm", "group_norm": "norm",
    "relu": "activation", "leaky_relu": "activation", "sigmoid": "activation", "tanh": "activation",
    "softmax": "activation", "log_softmax": "activation", "gelu": "activation", "elu": "activation",
    "maxpool": "pool", "avgpool": "pool", "global_avgpool": "pool", "global_maxpool": "pool",
    "adaptive_avgpool": "pool", "upsample": "pool", "max_unpool": "pool", "bed_of_nails": "pool",
    "add": "merge", "sub": "merge", "mul": "merge", "div": "merge", "concat": "merge",
    "dropout": "dropout",
}
_BY_KIND = {"loss": "loss", "detection": "detection", "recurrent": "recurrent", "structural": "shape"}

# families that read as a suffix of the layer before them (conv -> bn -> relu): stacked into its box
FOLLOWERS = {"norm", "activation", "dropout"}


def family(op: str) -> str:
    from ..ops import OPS
    if op in _BY_OP:
        return _BY_OP[op]
    kind = OPS[op].kind if op in OPS else "layer"
    if kind == "elementwise":
        return "math"
    return _BY_KIND.get(kind, "other")


def differentiable(node: Node) -> bool:
    from ..ops import OPS
    return node.op not in OPS or OPS[node.op].differentiable


# ---- texts

def dim(d) -> str:
    s = str(d)
    return f"({s})" if isinstance(d, Sym) and len(d.terms) > 1 else s


def shape_label(shape, dtype: str = "f32") -> str:
    """`64×56×56`: the batch dimension N is left out everywhere, symbolic dims keep their names."""
    dims = list(shape)
    if len(dims) > 1 and isinstance(dims[0], Sym) and str(dims[0]) == "N":
        dims = dims[1:]     # (a lone N stays: labels [N] read better as "N" than as nothing)
    text = "×".join(dim(d) for d in dims) if dims else "scalar"
    return text if dtype in ("f32", "") else f"{dtype} {text}"


def count(n) -> str:
    """Parameter counts: exact below ten thousand, else three significant figures."""
    for unit, size, least in (("G", 1e9, 1e9), ("M", 1e6, 1e6), ("K", 1e3, 1e4)):
        if n >= least:
            return f"{n / size:.3g}{unit}"
    return str(n)


def _pair(v) -> str:
    v = tuple(v) if isinstance(v, (tuple, list)) else (v, v)
    return str(v[0]) if v[0] == v[1] else f"{v[0]}×{v[1]}"


def _window(a, default_s=1) -> str:
    k = a["k"] if isinstance(a["k"], (tuple, list)) else (a["k"], a["k"])
    out = f"{k[0]}×{k[1]}"
    s = a.get("s", default_s)
    if s not in (default_s, (default_s, default_s), 0, (0, 0)):
        out += f" s{_pair(s)}"
    if a.get("p") not in (None, 0, (0, 0)):
        out += f" p{_pair(a['p'])}"
    if a.get("d") not in (None, 1, (1, 1)):
        out += f" d{_pair(a['d'])}"
    return out


def op_text(node: Node, frames=None) -> str:
    """A few words saying what the operator does: `conv 3×3 s2 p1 · 64`. `frames`: where it
    is drawn, when not its own (a recurrence's backward nodes sit in the backward step)."""
    from ..ops import OPS
    op, a = node.op, node.attrs
    if op in ("conv", "conv_transpose"):
        t = f"{'conv' if op == 'conv' else 'conv_T'} {_window(a)} · {a['c']}"
        if a.get("groups", 1) != 1:
            t += f" g{a['groups']}"
    elif op in ("maxpool", "avgpool", "max_unpool"):
        t = f"{op} {_window(a, default_s=0)}"
    elif op == "linear":
        t = f"linear · {a['out']}"
    elif op == "embedding":
        t = f"embedding {a['vocab']} → {a['dim']}"
    elif op == "bn":
        t = "bn γ=0" if a.get("zero_init") else "bn"
    elif op == "slice":
        t = "slice [" + ", ".join(_index(i) for i in a["index"]) + "]"
    elif op == "scale":
        t = f"× {a['factor']:g}"
    elif op == "shift":
        t = f"{'+' if a['amount'] >= 0 else '−'} {abs(a['amount']):g}"
    else:
        # everything else: the op name and the attributes that differ from their defaults
        defaults = {x.name: x.default for x in OPS[op].attrs} if op in OPS else {}
        extra = [f"{k}={_short(v)}" for k, v in a.items()
                 if k in defaults and v != defaults[k] and _short(v)]
        t = " ".join([op] + extra)
    local = local_name(node, frames)
    if local != op and not _auto_name(local, op):
        t = f"{local}: {t}"
    return t if len(t) <= 40 else t[:39] + "…"


def _index(i) -> str:
    """One subscript as it was written: 3, :, 1:, :-1."""
    if isinstance(i, tuple) and len(i) == 2:
        return ":".join("" if x is None else str(x) for x in i)
    return str(i)


def _short(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (tuple, list)):
        return "[" + ",".join(_short(x) for x in v) + "]" if len(v) <= 4 else ""
    s = str(v)
    return s if len(s) <= 12 else ""


def local_name(node: Node, frames=None) -> str:
    """The node's name within its block: its path less the block's (`downsample.0`)."""
    scope = ".".join(f.scope for f in (node.frames if frames is None else frames) if f.scope)
    return node.path[len(scope) + 1:] if scope and node.path.startswith(scope + ".") else node.path


def _auto_name(local: str, op: str) -> bool:
    return local.startswith(op) and local[len(op):].isdigit()


def esc(s) -> str:
    return html.escape(str(s), quote=True)
