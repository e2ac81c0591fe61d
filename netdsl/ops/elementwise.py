"""Elementwise operators, each defined once as a scalar expression.

`expr` computes the output from inputs `a` (and `b`) and attributes; `grads` gives,
per input, the derivative of the output times the incoming gradient `g`, in terms of
`a`, `b`, the output `y` and attributes. The CPU and CUDA kernel generators render
these strings (and chains of them, fused) into kernels; nothing here is written per
target. Binary operators broadcast like numpy.
"""
from __future__ import annotations

import ast

from .registry import OPS, Attr, Ctx, OpDef, register

# name: (arity, expr, grads, attrs)
SCALAR = {
    "relu":       (1, "max(a, 0)", ("g * (y > 0)",), ()),
    "leaky_relu": (1, "a if a > 0 else slope * a", ("g if a > 0 else g * slope",),
                   (Attr("slope", "float", 0.01),)),
    "sigmoid":    (1, "1 / (1 + exp(-a))", ("g * y * (1 - y)",), ()),
    # the activations of modern CNNs, with torch's gradients at the kinks (relu6 and
    # hardswish as torch's hardtanh/hardswish, clamp's bounds pass the gradient)
    "relu6":      (1, "min(max(a, 0), 6)", ("g * (a > 0) * (a < 6)",), ()),
    "hardswish":  (1, "a * min(max(a + 3, 0), 6) / 6",
                   ("0 if a < -3 else (g if a > 3 else g * (2 * a + 3) / 6)",), ()),
    "silu":       (1, "a / (1 + exp(-a))",       # also spelled swish; g*s*(1 + a*(1 - s)), s = sigmoid(a),
                   ("g / (1 + exp(-a)) * (1 + a * (1 - 1 / (1 + exp(-a))))",), ()),   # 0, not nan, where exp overflows
    "gelu":       (1, "0.5 * a * (1 + erf(a * 0.7071067811865476))",     # exact (erf) form, torch's default
                   ("g * (0.5 * (1 + erf(a * 0.7071067811865476)) + a * 0.3989422804014327 * exp(-0.5 * a * a))",),
                   ()),
    "clamp":      (1, "min(max(a, min), max)", ("g * (a >= min) * (a <= max)",),
                   (Attr("min", "float", float("-inf")), Attr("max", "float", float("inf")))),
    "tanh":       (1, "tanh(a)", ("g * (1 - y * y)",), ()),
    "exp":        (1, "exp(a)", ("g * y",), ()),
    "log":        (1, "log(a)", ("g / a",), ()),
    "neg":        (1, "-a", ("-g",), ()),
    "square":     (1, "a * a", ("2 * g * a",), ()),
    "sqrt":       (1, "sqrt(a)", ("g / (2 * y)",), ()),
    "scale":      (1, "a * factor", ("g * factor",), (Attr("factor", "float"),)),
    "shift":      (1, "a + amount", ("g",), (Attr("amount", "float"),)),
    "add":        (2, "a + b", ("g", "g"), ()),
    "sub":        (2, "a - b", ("g", "-g"), ()),
    "mul":        (2, "a * b", ("g * b", "g * a"), ()),
    "div":        (2, "a / b", ("g / b", "-g * a / (b * b)"), ()),
}


def broadcast(ctx: Ctx):
    """numpy broadcasting over symbolic dimensions."""
    a, b = ctx.inputs
    ra, rb = a.shape[::-1], b.shape[::-1]
    out, bad = [], []
    rank = max(len(ra), len(rb))
    for i in range(rank):
        da = ra[i] if i < len(ra) else 1
        db = rb[i] if i < len(rb) else 1
        if da == db or db == 1:
            out.append(da)
        elif da == 1:
            out.append(db)
        else:
            bad.append((rank - 1 - i, da, db))
    if bad:   # name the leftmost disagreement: channels before spatial size
        axis, da, db = bad[-1]
        ctx.fail(f"shapes cannot be combined elementwise: axis {axis} is {da} in one and {db} in the other",
                 hint="both operands must have the same shape, or 1 where they differ")
    if a.dtype != b.dtype:
        ctx.fail(f"operands have different dtypes {a.dtype} and {b.dtype}")
    return [(tuple(out[::-1]), a.dtype)]


def _unary(ctx: Ctx):
    if ctx.x().dtype not in ("f16", "f32", "f64"):
        ctx.fail(f"needs a floating-point tensor, got {ctx.x().dtype}",
                 hint="integer tensors (labels, indices) cannot pass through activations")
    return [(ctx.x().shape, ctx.x().dtype)]


def _clamp(ctx: Ctx):
    if ctx.min > ctx.max:
        ctx.fail(f"min ({ctx.min:g}) is above max ({ctx.max:g})", hint="clamp(x, min=LOW, max=HIGH)")
    return _unary(ctx)


RULES = {"clamp": _clamp}     # shape rules beyond the arity's default
ALIASES = {"swish": "silu"}   # other names of the same operator (the same registry entry)


def names_in(expr: str) -> set[str]:
    return {n.id for n in ast.walk(ast.parse(expr, mode="eval")) if isinstance(n, ast.Name)}


def _vjp(b, node, gys):
    """Each input's gradient is the op's scalar derivative applied elementwise (an
    `ew_grad` node, fused with its neighbours later), summed back over broadcast axes."""
    g = gys[0]
    grads = []
    for i, x in enumerate(node.inputs):
        if not b.needs(x):
            grads.append(None)
            continue
        expr = SCALAR[node.op][2][i]
        if expr == "g":
            gi = g
        else:   # pass only what the derivative reads, so nothing else is kept alive for it
            named = dict(zip(("a", "b"), node.inputs), y=node.outputs[0])
            uses = [k for k in ("a", "b", "y") if k in names_in(expr)]
            gi = b.one("ew_grad", [g, *(named[k] for k in uses)],
                       dict(node.attrs, of=node.op, wrt=i, uses=tuple(uses)), node)
        grads.append(b.sum_to(gi, x, node))
    return grads, {}


for _name, (_arity, _expr, _grads, _attrs) in SCALAR.items():
    _also = [k for k, v in ALIASES.items() if v == _name]
    register(OpDef(
        name=_name, inputs=("a", "b")[:_arity], attrs=_attrs,
        infer=RULES.get(_name, _unary if _arity == 1 else broadcast), kind="elementwise", vjp=_vjp,
        doc=f"elementwise: y = {_expr}" + "".join(f"; {_name} and {a} are one operator" for a in _also)))
for _alias, _name in ALIASES.items():
    OPS[_alias] = OPS[_name]    # a spec may write either name; its nodes are of the one operator

register(OpDef(
    name="ew_grad", inputs=("g", "*xs"), attrs=(), kind="elementwise", differentiable=False,
    infer=lambda ctx: [(ctx.inputs[0].shape, ctx.inputs[0].dtype)],
    doc="gradient of an elementwise operator with respect to input `wrt`: "
        "the `grads` expression of SCALAR[of] evaluated on (g, inputs, output)"))

# elementwise operators the language spells with symbols
BINARY_SYMBOLS = {"+": "add", "-": "sub", "*": "mul", "/": "div"}
