"""The fused elementwise IR, its backward transform, and target-neutral lowering.

A `Fused` kernel is a small DAG over numbered values: the external inputs come
first (values 0..m-1), then one value per node. A node applies one scalar
operator from `netdsl.ops.elementwise.SCALAR` (op "relu"), or the gradient of
one with respect to its i-th input (op "relu'0", arguments (a, [b], y, g)).

Input layouts:  "full"    an array of the kernel's full shape
                "channel" a vector [C] broadcast along one axis (bias, norm scale)
                "scalar"  a one-element array broadcast everywhere
                "bcastK"  any numpy broadcast of the full shape ([N, C, 1, 1], [W],
                          [N, 1, H, W]...), read in place: its kept axes, merged into
                          K runs of adjacent axes (`broadcast_runs`), give its index
                          from the flat one with K divisions; K is fixed in the code,
                          the runs' sizes are runtime arguments
Output layouts: "full" is written elementwise; "channel" / "scalar" are summed
over every other axis (the gradient of a broadcast input).

Lowering turns the DAG into straight-line scalar code shared by all targets; the
renderers (cpu.py, cuda.py) only wrap it in loops, launches and reductions.
"""
from __future__ import annotations

import ast
import functools
import re
from dataclasses import dataclass, field

from netdsl.ops.elementwise import SCALAR

LAYOUTS = ("full", "channel", "scalar")
MAX_RUNS = 8
MATH = {"exp", "log", "tanh", "sqrt", "erf"}  # -> math.<f>; float32 in, float32 out


def runs_of(layout: str) -> int | None:
    """K for a "bcastK" layout, None for the others."""
    m = re.fullmatch(r"bcast([1-9])", layout)
    return int(m.group(1)) if m and int(m.group(1)) <= MAX_RUNS else None


def valid_layout(layout: str) -> bool:
    return layout in LAYOUTS or runs_of(layout) is not None


def broadcast_runs(shape, xshape) -> list:
    """How an operand of shape `xshape` is read when broadcast (numpy rules) to `shape`.

    Returns its kept axes merged into runs of adjacent ones, outermost first, each
    (inner, extent, stride): at flat output index i the run's coordinate is
    (i // inner) % extent, and it moves the operand's flat index by `stride`. Axes of
    size 1 in `shape` neither end nor extend a run. Works on symbolic dimensions too
    (a symbol is taken to be other than 1), which is how a plan fixes K before sizes
    are known. ValueError if xshape does not broadcast to shape.
    """
    shape, xshape = tuple(shape), tuple(xshape)
    if len(xshape) > len(shape):
        raise ValueError(f"shape {xshape} has more axes than {shape}")
    xs = (1,) * (len(shape) - len(xshape)) + xshape
    runs, inner, stride, open_run = [], 1, 1, False
    for d, x in zip(reversed(shape), reversed(xs)):
        if isinstance(d, int) and d == 1:
            if not (isinstance(x, int) and x == 1):
                raise ValueError(f"shape {xshape} does not broadcast to {shape}")
            continue
        if isinstance(x, int) and x == 1:      # broadcast along this axis: a run ends
            open_run = False
        elif x == d:
            if open_run:
                i0, e, s0 = runs[-1]
                runs[-1] = (i0, e * d, s0)
            else:
                runs.append((inner, d, stride))
                open_run = True
            stride = stride * x
        else:
            raise ValueError(f"shape {xshape} does not broadcast to {shape}")
        inner = inner * d
    return runs[::-1]
BUILTIN = {"max", "min", "abs"}


@dataclass(frozen=True)
class Fused:
    inputs: tuple          # ((name, layout), ...)
    nodes: tuple           # ((op, (value, ...), ((attr, value), ...)), ...)
    outputs: tuple         # ((value, layout), ...)

    @staticmethod
    def build(inputs, nodes, outputs) -> "Fused":
        """Friendly constructor.

        inputs:  {"x": "full", "bias": "channel"} (or a list of names, all full)
        nodes:   [("add", "x", "bias"), ("leaky_relu", 0, {"slope": 0.1})]
                 a str argument names an input, an int an earlier node
        outputs: [1] or [(1, "full")], node indices
        """
        if not isinstance(inputs, dict):
            inputs = {name: "full" for name in inputs}
        names = list(inputs)
        m = len(names)

        def ref(r, k):
            if isinstance(r, str):
                if r not in inputs:
                    raise ValueError(f"node {k}: unknown input {r!r}; inputs are {names}")
                return names.index(r)
            if not 0 <= r < k:
                raise ValueError(f"node {k}: argument {r} must name an earlier node")
            return m + r

        ns = []
        for k, (op, *args) in enumerate(nodes):
            attrs = args.pop() if args and isinstance(args[-1], dict) else {}
            ns.append((op, tuple(ref(a, k) for a in args), tuple(sorted(attrs.items()))))
        outs = tuple((m + o, "full") if isinstance(o, int) else (m + o[0], o[1]) for o in outputs)
        f = Fused(tuple(inputs.items()), tuple(ns), outs)
        f.check()
        return f

    @staticmethod
    def single(op: str, layouts=None, **attrs) -> "Fused":
        """One operator as a kernel; `layouts` gives the input layouts (default full)."""
        arity = SCALAR[op][0]
        layouts = layouts or ("full",) * arity
        names = ("a", "b")[:arity]
        return Fused.build(dict(zip(names, layouts)), [(op, *names, attrs)], [0])

    def check(self):
        m = len(self.inputs)
        for name, layout in self.inputs:
            if not valid_layout(layout):
                raise ValueError(f"input {name!r}: layout {layout!r} is not one of {LAYOUTS} "
                                 f"or bcast1..bcast{MAX_RUNS}")
        if not any(layout == "full" or runs_of(layout) for _, layout in self.inputs):
            raise ValueError("a fused kernel needs at least one full-shape or broadcast input")
        for k, (op, args, _) in enumerate(self.nodes):
            params, _, _ = scalar_op(op)
            if len(args) != len(params):
                raise ValueError(f"node {k}: {op} takes {len(params)} arguments, got {len(args)}")
            if any(not 0 <= a < m + k for a in args):
                raise ValueError(f"node {k}: arguments must be inputs or earlier nodes")
        for v, layout in self.outputs:
            if layout not in LAYOUTS or not 0 <= v < m + len(self.nodes):
                raise ValueError(f"bad output {(v, layout)}")

    def structure(self):
        """Everything that shapes the generated code: attribute values are
        runtime arguments, so kernels differing only in them share code."""
        return (tuple(l for _, l in self.inputs),
                tuple((op, args, tuple(n for n, _ in attrs)) for op, args, attrs in self.nodes),
                self.outputs)

    @property
    def reduces(self) -> bool:
        return any(layout != "full" for _, layout in self.outputs)


@functools.lru_cache(maxsize=None)
def scalar_op(op: str):
    """(parameter names, expression, attrs) for a forward op or a gradient op "name'i".

    A gradient op takes the incoming gradient g, then only those of (a, b, y)
    its expression reads, in that order: the convention of the autodiff's
    `ew_grad(g, *xs; of, wrt, uses)` nodes, so the planner can hand them over as-is.
    """
    name, _, which = op.partition("'")
    if name not in SCALAR:
        raise ValueError(f"unknown elementwise operator {name!r}")
    arity, expr, grads, attrs = SCALAR[name]
    if not which:
        return ("a", "b")[:arity], expr, attrs
    expr = grads[int(which)]
    return ("g", *grad_uses(expr)), expr, attrs


def grad_uses(expr: str) -> tuple:
    names = {n.id for n in ast.walk(ast.parse(expr, mode="eval")) if isinstance(n, ast.Name)}
    return tuple(k for k in ("a", "b", "y") if k in names)


def backward(f: Fused, wrt=None) -> Fused:
    """The fused kernel computing the gradients of `f`'s inputs in one pass.

    Its inputs are f's inputs followed by one incoming gradient per output
    ("g0", "g1", ... full shape); forward intermediates are recomputed in
    registers rather than saved. The gradient of a channel or scalar input is a
    reduced output; that of a "bcastK" input is a full one, which the caller sums
    over the broadcast axes (the runtime's `sum_to` does). `wrt` lists input indices
    or names (default: all).
    """
    if f.reduces:
        raise ValueError("backward of a kernel with reduced outputs is not supported")
    m, k = len(f.inputs), len(f.outputs)
    names = [n for n, _ in f.inputs]
    wrt = list(range(m)) if wrt is None else [names.index(w) if isinstance(w, str) else w for w in wrt]
    inputs = f.inputs + tuple((f"g{j}", "full") for j in range(k))
    nodes = []

    def fv(v):  # forward value id in the backward kernel
        return v if v < m else v + k

    def emit(op, args, attrs=()):
        nodes.append((op, tuple(args), attrs))
        return m + k + len(nodes) - 1

    for op, args, attrs in f.nodes:
        emit(op, [fv(a) for a in args], attrs)

    # values whose gradient is wanted: the wrt inputs and everything they feed
    live = set(wrt)
    for j, (_, args, _) in enumerate(f.nodes):
        if live & set(args):
            live.add(m + j)

    grad = {}

    def accumulate(v, g):
        grad[v] = emit("add", (grad[v], g)) if v in grad else g

    for j, (v, _) in enumerate(f.outputs):
        accumulate(v, m + j)
    for j in reversed(range(len(f.nodes))):
        op, args, attrs = f.nodes[j]
        if m + j not in grad:
            continue
        named = dict(zip("ab", map(fv, args)), y=fv(m + j))
        for i, a in enumerate(args):
            if a in live:
                params = scalar_op(f"{op}'{i}")[0]
                accumulate(a, emit(f"{op}'{i}", [grad[m + j]] + [named[p] for p in params[1:]], attrs))
    outs = []
    for w in wrt:
        if w not in grad:
            raise ValueError(f"input {names[w]!r} does not reach any output")
        layout = f.inputs[w][1]
        outs.append((grad[w], "full" if runs_of(layout) else layout))
    return Fused(inputs, tuple(nodes), tuple(outs))


# ---------------------------------------------------------------- lowering

@dataclass
class Lowered:
    """Straight-line scalar code for one element, shared by every renderer.

    Within the body, `i` is the flat element index and `c` the channel index.
    """
    arrays: list                      # [(param, layout)] inputs, in order
    scalars: list                     # [(param, attr name, default)] one per node attribute
    ints: list = field(default_factory=list)      # [(param, input index, run, field)] broadcast geometry
    consts: dict = field(default_factory=dict)    # float value -> module-level name
    body: list = field(default_factory=list)      # "v3 = ..." lines
    outputs: list = field(default_factory=list)   # [(param, var, layout)]
    uses_channel: bool = False

    @property
    def params(self) -> list[str]:
        """The kernel's input parameters in call order: arrays, attribute scalars, index sizes."""
        return [p for p, _ in self.arrays] + [s for s, _, _ in self.scalars] + [p for p, _, _, _ in self.ints]

    def const(self, value: float) -> str:
        return self.consts.setdefault(float(value), f"K{len(self.consts)}")


class _Expr(ast.NodeTransformer):
    """Rewrites one scalar expression into target-neutral, dtype-exact code."""

    def __init__(self, low: Lowered, env: dict):
        self.low, self.env = low, env

    def visit_Name(self, node):
        if node.id not in self.env:
            raise ValueError(f"unknown name {node.id!r} in elementwise expression")
        return ast.Name(self.env[node.id], ast.Load())

    def visit_Constant(self, node):
        # Typed module-level constants: a bare 0.1 is float64 in Numba and would
        # promote a float32 computation.
        return ast.Name(self.low.const(node.value), ast.Load())

    def visit_Call(self, node):
        fn = node.func.id if isinstance(node.func, ast.Name) else None
        node.args = [self.visit(a) for a in node.args]
        if fn in MATH:
            node.func = ast.Attribute(ast.Name("math", ast.Load()), fn, ast.Load())
        elif fn not in BUILTIN:
            raise ValueError(f"unsupported function {fn!r} in elementwise expression")
        return node

    def visit_Compare(self, node):
        # A comparison used as a number (g * (a > 0)): bool * float promotes
        # differently per target, so make it an explicit 1/0 of the array dtype.
        self.generic_visit(node)
        return ast.IfExp(node, ast.Name(self.low.const(1.0), ast.Load()),
                         ast.Name(self.low.const(0.0), ast.Load()))

    def visit_IfExp(self, node):
        node.test = self.generic_visit(node.test) if isinstance(node.test, ast.Compare) else self.visit(node.test)
        node.body, node.orelse = self.visit(node.body), self.visit(node.orelse)
        return node


def _needed(f: Fused) -> set:
    """Values some output depends on; the rest is never emitted."""
    m, need = len(f.inputs), {v for v, _ in f.outputs}
    for j in reversed(range(len(f.nodes))):
        if m + j in need:
            need.update(f.nodes[j][1])
    return need


def _index(low: Lowered, j: int, layout: str) -> str:
    """Input j's element index at flat index i (and channel c)."""
    k = runs_of(layout)
    if k is None:
        return {"full": "i", "channel": "c", "scalar": "0"}[layout]
    terms = []
    for r in range(k):
        names = [f"x{j}{w}{r}" for w in "des"]    # inner (divisor), extent, stride
        low.ints += [(n, j, r, w) for n, w in zip(names, ("inner", "extent", "stride"))]
        terms.append(f"(i // {names[0]} % {names[1]}) * {names[2]}")
    return " + ".join(terms)


def lower(f: Fused) -> Lowered:
    low = Lowered(arrays=[(f"x{j}", layout) for j, (_, layout) in enumerate(f.inputs)], scalars=[])
    need, var = _needed(f), []
    for j, (_, layout) in enumerate(f.inputs):
        var.append(f"v{j}")
        if j in need:
            low.uses_channel |= layout == "channel"
            low.body.append(f"v{j} = x{j}[{_index(low, j, layout)}]")
    for op, args, attrs in f.nodes:
        if len(var) not in need:
            var.append(None)
            continue
        params, expr, attr_defs = scalar_op(op)
        env = dict(zip(params, (var[a] for a in args)))
        given = dict(attrs)
        for a in attr_defs:
            if a.name not in given and a.default is None:
                raise ValueError(f"{op}: attribute {a.name!r} is required")
            env[a.name] = f"s{len(low.scalars)}"
            low.scalars.append((env[a.name], a.name, given.get(a.name, a.default)))
        tree = _Expr(low, env).visit(ast.parse(expr, mode="eval").body)
        if isinstance(tree, ast.Name):      # a pass-through such as add's gradient g
            var.append(tree.id)
            continue
        var.append(f"v{len(var)}")
        low.body.append(f"{var[-1]} = {ast.unparse(tree)}")
    low.outputs = [(f"o{j}", var[v], layout) for j, (v, layout) in enumerate(f.outputs)]
    return low
