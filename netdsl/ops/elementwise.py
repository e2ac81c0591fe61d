"""Elementwise operators, each defined once as a scalar expression.

`expr` computes the output from inputs `a` (and `b`) and attributes; `grads` gives,
per input, the derivative of the output times the incoming gradient `g`, in terms of
`a`, `b`, the output `y` and attributes. The CPU and CUDA kernel generators render
these strings (and chains of them, fused) into kernels; nothing here is written per
target. Binary operators broadcast like numpy.
"""
from __future__ import annotations

from .registry import Attr, Ctx, OpDef, register

# name: (arity, expr, grads, attrs)
SCALAR = {
    "relu":       (1, "max(a, 0)", ("g * (a > 0)",), ()),
    "leaky_relu": (1, "a if a > 0 else slope * a", ("g if a > 0 else g * slope",),
                   (Attr("slope", "float", 0.01),)),
    "sigmoid":    (1, "1 / (1 + exp(-a))", ("g * y * (1 - y)",), ()),
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
    out = []
    for i in range(max(len(ra), len(rb))):
        da = ra[i] if i < len(ra) else 1
        db = rb[i] if i < len(rb) else 1
        if da == db or db == 1:
            out.append(da)
        elif da == 1:
            out.append(db)
        else:
            ctx.fail(f"shapes cannot be combined elementwise: axis {max(len(ra), len(rb)) - 1 - i} "
                     f"is {da} in one and {db} in the other",
                     hint="both operands must have the same shape, or 1 where they differ")
    if a.dtype != b.dtype:
        ctx.fail(f"operands have different dtypes {a.dtype} and {b.dtype}")
    return [(tuple(out[::-1]), a.dtype)]


def _unary(ctx: Ctx):
    if ctx.x().dtype not in ("f16", "f32", "f64"):
        ctx.fail(f"needs a floating-point tensor, got {ctx.x().dtype}",
                 hint="integer tensors (labels, indices) cannot pass through activations")
    return [(ctx.x().shape, ctx.x().dtype)]


for _name, (_arity, _expr, _grads, _attrs) in SCALAR.items():
    register(OpDef(
        name=_name, inputs=("a", "b")[:_arity], attrs=_attrs,
        infer=_unary if _arity == 1 else broadcast, kind="elementwise",
        doc=f"elementwise: y = {_expr}"))

# elementwise operators the language spells with symbols
BINARY_SYMBOLS = {"+": "add", "-": "sub", "*": "mul", "/": "div"}
