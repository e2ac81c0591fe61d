"""The operator registry: one entry per operator holds everything about it.

An entry has the operator's tensor inputs, its attributes (type, default, check), its
shape rule, its parameters (shape and initialiser), its multiply-add count, its
gradient (`vjp`) and whether it can run yet. Elaboration, rendering, counting, the
backward pass (autodiff.py) and the runtimes all read the same entry, so an operator
is defined in one place.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import NetdslError, Note, Pos
from ..ir.dims import Sym, fmt_shape, is_dim
from . import inits as _inits

REQUIRED = object()


@dataclass
class Attr:
    name: str
    type: str                       # int float bool str pair ints floats dim any
    default: Any = REQUIRED
    choices: tuple | None = None
    check: Callable[[Any], str | None] | None = None   # returns an error message or None
    doc: str = ""


@dataclass
class OpDef:
    name: str
    inputs: tuple[str, ...]          # tensor inputs; a name starting with '*' is variadic
    attrs: tuple[Attr, ...]
    infer: Callable[["Ctx"], list]   # -> [(shape, dtype), ...] one per output
    params: Callable[["Ctx"], dict] | None = None   # role -> (shape, init, kind)
    macs: Callable[["Ctx"], Any] | None = None
    differentiable: bool = True
    kind: str = "layer"              # layer | elementwise | loss | structural | detection | recurrent
    optional_inputs: int = 0         # trailing inputs that may be omitted
    outputs: tuple[str, ...] = ("y",)
    doc: str = ""
    # Gradient: "kernel" means a dedicated `<name>_grad` operator computes every input and
    # parameter gradient at once; a callable writes the gradient as IR from other
    # operators: vjp(builder, node, output_grads) -> (input_grads, {param role: grad}).
    vjp: Callable | str | None = None
    grad_wrt: tuple[int, ...] | None = None   # inputs that get gradients (None: every float input)
    # Why the operator cannot run yet (it has no kernels in this version), or None: a network
    # using it compiles and renders, and `netdsl run`/Model stop at its node with this reason.
    # A function of the node says it for some uses only (e.g. an optional input given).
    pending: str | Callable[[Any], str | None] | None = None
    inits: tuple[str, ...] = ()      # every initialiser `params` names (ops/inits.py), checked on import
    # Integer inputs that are indices: ids(ctx) -> {input index: (count, ignored value or None)};
    # valid values are 0..count-1 (and the ignored one). Data loading checks labels with it.
    ids: Callable[["Ctx"], dict] | None = None

    @property
    def variadic(self) -> bool:
        return bool(self.inputs) and self.inputs[-1].startswith("*")


OPS: dict[str, OpDef] = {}


def register(op: OpDef) -> OpDef:
    if op.name in OPS:
        raise RuntimeError(f"operator {op.name} registered twice")
    _check_inits(op)
    OPS[op.name] = op
    if op.vjp == "kernel":
        # its gradient operator: inputs are the output gradients, the forward inputs and
        # the trainable parameters; outputs are shaped like the ones in attrs["like"]
        register(OpDef(f"{op.name}_grad", ("*ins",), (), _like_inputs, kind="grad",
                       differentiable=False, pending=op.pending, doc=f"gradient of {op.name}"))
    return op


def _check_inits(op: OpDef) -> None:
    """Every initialiser the entry declares exists, and its parameter rule names only
    those: an unknown name fails here, on import, and an undeclared one at elaboration."""
    if op.params is None:
        return
    if not op.inits:
        raise RuntimeError(f"operator {op.name} has parameters but declares no initialisers (inits=...)")
    unknown = [n for n in op.inits if n not in _inits.INITIALISERS]
    if unknown:
        raise RuntimeError(f"operator {op.name} names unknown initialiser(s) {', '.join(unknown)} "
                           f"(ops/inits.py has {', '.join(sorted(_inits.INITIALISERS))})")
    rule, declared = op.params, set(op.inits)

    def params(ctx):
        out = rule(ctx)
        for role, (_, init, _) in out.items():
            name = _inits.name_of(init)    # a ValueError names a malformed spec
            if name not in declared:
                raise RuntimeError(f"operator {op.name}: parameter '{role}' uses initialiser {name}, "
                                   f"which its entry does not declare in inits")
        return out
    op.params = params


def not_runnable(node) -> str | None:
    """Why `node` cannot run yet (from its operator's entry), or None when it can."""
    d = OPS.get(node.op)
    if d is None:
        return f"'{node.op}' is not an operator"
    # a gradient operator inherits its forward's reason, judged on the forward node
    return d.pending(node.fwd or node) if callable(d.pending) else d.pending


def _like_inputs(ctx: "Ctx"):
    return [(ctx.inputs[i].shape, ctx.inputs[i].dtype) for i in ctx.attrs["like"]]


def defop(name, inputs, attrs=(), **kw):
    """Decorator form: the decorated function is the shape rule."""
    def wrap(fn):
        register(OpDef(name=name, inputs=tuple(inputs), attrs=tuple(attrs), infer=fn,
                       doc=(fn.__doc__ or "").strip(), **kw))
        return fn
    return wrap


class Ctx:
    """What a shape/param/FLOP rule sees: input values, checked attributes, outputs."""

    def __init__(self, op: OpDef, inputs: list, attrs: dict, pos: Pos | None, path: str):
        self.op, self.inputs, self.attrs, self.pos, self.path = op, inputs, attrs, pos, path
        self.outputs: list = []

    def __getattr__(self, k):
        try:
            return self.__dict__["attrs"][k]
        except KeyError:
            raise AttributeError(k) from None

    def x(self, i: int = 0):
        return self.inputs[i]

    def fail(self, message: str, *culprits: int, hint: str | None = None):
        """A shape error, with a note for each input that took part (its producer and shape)."""
        notes = []
        for i in culprits or range(len(self.inputs)):
            if i >= len(self.inputs) or self.inputs[i] is None:
                continue
            v = self.inputs[i]
            what = f"'{v.name}'" if v.name else "this input"
            src = f" produced by {v.producer.op} ({v.producer.path})" if v.producer else ""
            notes.append(Note(f"{what}{src} has shape {fmt_shape(v.shape)}", v.pos))
        raise NetdslError(f"{self.op.name}: {message}", self.pos, hint=hint, notes=notes)


# ---- attribute checking, shared by every operator

def check_attr(op: OpDef, a: Attr, value, pos) -> Any:
    def bad(expect):
        return NetdslError(f"{op.name}: attribute '{a.name}' must be {expect}, got {_show(value)}", pos)
    t = a.type
    if t == "int":
        if not (isinstance(value, int) and not isinstance(value, bool)):
            raise bad("an integer")
    elif t == "dim":
        if not is_dim(value):
            raise bad("an integer or a symbolic dimension")
    elif t == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        value = float(value)
    elif t == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
    elif t == "str":
        if not isinstance(value, str):
            raise bad("a string")
    elif t == "pair":
        if isinstance(value, int) and not isinstance(value, bool):
            value = (value, value)
        elif (isinstance(value, (list, tuple)) and len(value) == 2
              and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
            value = tuple(value)
        else:
            raise bad("an integer or a pair of integers")
    elif t in ("ints", "dims"):
        ok = is_dim if t == "dims" else (lambda v: isinstance(v, int) and not isinstance(v, bool))
        if isinstance(value, (list, tuple)) and all(ok(v) for v in value):
            value = tuple(value)
        elif ok(value):
            value = (value,)
        else:
            raise bad("a list of integers")
    elif t == "floats":
        if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            value = tuple(float(v) for v in value)
        else:
            raise bad("a list of numbers")
    if a.choices is not None and value not in a.choices:
        raise NetdslError(f"{op.name}: attribute '{a.name}' must be one of "
                          f"{', '.join(map(str, a.choices))}; got {_show(value)}", pos)
    if a.check is not None:
        msg = a.check(value)
        if msg:
            raise NetdslError(f"{op.name}: attribute '{a.name}' {msg}, got {_show(value)}", pos)
    return value


def _show(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    if v is None:
        return "none"
    if isinstance(v, OpDef):
        return f"the operator '{v.name}'"
    if hasattr(v, "shape") and hasattr(v, "dtype"):
        return f"a tensor {v!r}"
    return str(v)


# ---- small helpers for shape rules

def positive(v):
    vals = v if isinstance(v, tuple) else (v,)
    return None if all((not isinstance(x, int)) or x > 0 for x in vals) else "must be positive"


def nonneg(v):
    vals = v if isinstance(v, tuple) else (v,)
    return None if all(x >= 0 for x in vals) else "must not be negative"


def prob(v):
    return None if 0.0 <= v < 1.0 else "must be in [0, 1)"


def conv_out(size, k, s, p, d=1, ceil=False):
    """Output length of a sliding window (conv or pool) along one axis."""
    eff = d * (k - 1) + 1
    span = size + 2 * p - eff
    if isinstance(span, int):
        if span < 0:
            return None
        return (-(-span // s) if ceil else span // s) + 1
    return span // s + 1


def need_rank(ctx: Ctx, i: int, *ranks: int):
    v = ctx.inputs[i]
    if v.rank not in ranks:
        want = " or ".join(str(r) for r in ranks)
        names = {4: "[N, C, H, W]", 2: "[N, F]", 3: "[N, T, F]"}
        shape_hint = " or ".join(names[r] for r in ranks if r in names)
        ctx.fail(f"input '{ctx.op.inputs[min(i, len(ctx.op.inputs) - 1)].lstrip('*')}' must have rank {want}"
                 + (f" ({shape_hint})" if shape_hint else "") + f", got rank {v.rank}", i)


def is_float(dtype: str) -> bool:
    return dtype in ("f16", "f32", "f64")
