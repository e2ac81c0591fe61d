"""Reverse-mode autodiff: a forward graph becomes a training graph, in the IR.

Each operator's vector-Jacobian product lives in its registry entry (`OpDef.vjp`):
either "kernel" (a `<op>_grad` operator, registered beside the forward one, computes
every gradient at once) or a function that writes the gradient from other operators.
So the backward pass is nodes like any other: shape-checked, fused, scheduled, drawn.

Losses are seeded with their weights; train-only heads take part while training;
non-differentiable operators (and integer tensors) stop the flow. Cheap values the
backward reads (a norm's apply + ReLU) are recomputed there rather than kept (`remat.py`).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field

from .errors import NetdslError
from .ir.graph import Graph, Node, Value
from .ops import OPS, Ctx
from .ops.registry import is_float
from . import remat


@dataclass
class TrainingGraph:
    forward: Graph
    nodes: list[Node]                               # forward then backward, in schedule order
    grads: dict[str, Value] = field(default_factory=dict)   # parameter path -> gradient
    n_forward: int = 0

    @property
    def backward(self) -> list[Node]:
        return self.nodes[self.n_forward:]

    def as_graph(self) -> Graph:
        """The training graph as a Graph (forward and backward nodes, parameter gradients
        as outputs), so it can be drawn and reported like any network."""
        g = self.forward
        outs = {f"grad {n}": v for n, v in self.grads.items()}
        return Graph(f"{g.name} (training)", inputs=g.inputs, outputs=outs, losses=g.losses,
                     nodes=self.nodes, params=g.params, train=g.train, symbols=g.symbols, pos=g.pos)

    def keep(self) -> list[Value]:
        """What a training step must hand back: outputs, losses and parameter gradients."""
        g = self.forward
        return list(g.outputs.values()) + [l.value for l in g.losses] + list(self.grads.values())


class GradBuilder:
    """Emits backward nodes; VJP functions call `emit` to write gradients as IR."""

    def __init__(self, live: set[int]):
        self.nodes: list[Node] = []
        self.count: dict[str, int] = {}
        self.live = live

    def needs(self, v: Value) -> bool:
        """Whether v depends on a trainable parameter, so its gradient is wanted."""
        return id(v) in self.live

    def emit(self, opname: str, inputs: list, attrs: dict, fwd: Node) -> list[Value]:
        op = OPS[opname]
        full = {a.name: a.default for a in op.attrs}
        full.update(attrs)
        base = f"{fwd.path}.{opname}" if fwd.op != opname else f"{fwd.path}.grad"
        k = self.count[base] = self.count.get(base, 0) + 1
        path = base if k == 1 else f"{base}{k}"
        ctx = Ctx(op, list(inputs), full, fwd.pos, path)
        outs = op.infer(ctx)
        node = Node(opname, list(inputs), ctx.attrs, path, fwd.pos, fwd.frames, fwd=fwd)
        node.outputs = [Value(tuple(s), d, node, i, pos=fwd.pos) for i, (s, d) in enumerate(outs)]
        ctx.outputs = node.outputs
        if op.macs:
            node.macs = op.macs(ctx)
        self.nodes.append(node)
        return node.outputs

    def one(self, opname, inputs, attrs, fwd) -> Value:
        return self.emit(opname, inputs, attrs, fwd)[0]

    def sum_to(self, g: Value, like: Value, fwd: Node) -> Value:
        """Undo broadcasting: sum g down to the shape of `like`."""
        if tuple(g.shape) == tuple(like.shape):
            return g
        return self.one("sum_to", [g], {"shape": tuple(like.shape)}, fwd)


def wrt_inputs(op, node: Node) -> list[int]:
    idx = op.grad_wrt if op.grad_wrt is not None else range(len(node.inputs))
    return [i for i in idx if i < len(node.inputs) and node.inputs[i] is not None and is_float(node.inputs[i].dtype)]


def trainable(node: Node):
    """(role, Param) of every parameter node trains: its own, and for a node with a body
    (scan) every parameter of the body, under its path name as the role."""
    own = [(role, p) for role, p in node.params.items() if p.role != "buffer"]
    if node.body is None:
        return own
    inner = [(p.name, p) for m in node.body.nodes for _, p in trainable(m)]
    return own + inner


def kernel_vjp(b: GradBuilder, node: Node, gys: list):
    """The generic VJP of operators with a dedicated gradient kernel."""
    op = OPS[node.op]
    for i, g in enumerate(gys):
        if g is None and is_float(node.outputs[i].dtype):
            gys[i] = b.one("zeros", [], {"shape": node.outputs[i].shape, "dtype": node.outputs[i].dtype}, node)
    gys = [g for g, v in zip(gys, node.outputs) if is_float(v.dtype)]
    wrt = [i for i in wrt_inputs(op, node) if b.needs(node.inputs[i])]
    params = trainable(node)
    ins = gys + list(node.inputs) + [p.value for _, p in params]
    like = [len(gys) + i for i in wrt] + [len(gys) + len(node.inputs) + j for j in range(len(params))]
    attrs = dict(node.attrs, like=tuple(like), ngrads=len(gys))
    outs = b.emit(f"{node.op}_grad", ins, attrs, node)
    grads = [None] * len(node.inputs)
    for i, v in zip(wrt, outs):
        grads[i] = v
    return grads, {role: v for (role, _), v in zip(params, outs[len(wrt):])}


def live_values(nodes: list[Node], live: set[int] | None = None) -> set[int]:
    """Ids of the float values that depend on a trainable parameter (or on a value
    already in `live`) through differentiable operators: those that get gradients."""
    live = set() if live is None else set(live)
    for n in nodes:
        op = OPS[n.op]
        if not op.differentiable:
            continue
        if trainable(n) or any(id(n.inputs[i]) in live for i in wrt_inputs(op, n)):
            live.update(id(v) for v in n.outputs if is_float(v.dtype))
    return live


def backprop(b: GradBuilder, nodes: list[Node], grads: dict[int, Value]) -> dict[str, Value]:
    """Reverse pass over `nodes` from the seeded gradients `grads` (value id -> gradient,
    updated in place with every value's gradient); returns parameter path -> gradient."""
    def accumulate(v: Value, gv: Value, fwd: Node):
        if id(v) in grads:
            gv = b.one("add", [grads[id(v)], gv], {}, fwd)
        grads[id(v)] = gv

    param_grads: dict[str, Value] = {}
    for n in reversed(nodes):
        gys = [grads.get(id(v)) for v in n.outputs]
        if all(gy is None for gy in gys):
            continue
        op = OPS[n.op]
        if op.vjp is None:
            raise NetdslError(f"operator '{n.op}' has no gradient yet", n.pos)
        gin, gparams = (kernel_vjp if op.vjp == "kernel" else op.vjp)(b, n, list(gys))
        for i, gv in enumerate(gin):
            if gv is not None and b.needs(n.inputs[i]):
                accumulate(n.inputs[i], gv, n)
        params = dict(trainable(n))
        for role, gv in gparams.items():
            param_grads[params[role].name] = gv
    return param_grads


def build(g: Graph, recompute: bool = True) -> TrainingGraph:
    if not g.losses:
        raise NetdslError(f"network '{g.name}' has no loss, so there is nothing to train", g.pos,
                          hint="add `loss NAME = cross_entropy(logits, label)`")
    b = GradBuilder(live_values(g.nodes))
    grads: dict[int, Value] = {}
    for loss in g.losses:
        if b.needs(loss.value):
            seed = b.one("fill", [], {"shape": (), "value": loss.weight, "dtype": loss.value.dtype},
                         loss.value.producer)
            grads[id(loss.value)] = (b.one("add", [grads[id(loss.value)], seed], {}, loss.value.producer)
                                     if id(loss.value) in grads else seed)
    param_grads = backprop(b, g.nodes, grads)
    keep = {id(v) for v in list(g.outputs.values()) + [l.value for l in g.losses]}
    backward = remat.recompute(g.nodes, b.nodes, keep) if recompute else b.nodes
    return TrainingGraph(g, list(g.nodes) + backward, param_grads, len(g.nodes))


# ---- the backward pass of a recurrence's step

@dataclass(eq=False)
class StepGrad(Graph):
    """The VJP of a scan's step graph, run once per time step in reverse.

    Fed each step with the gradients of what the step hands on (`seeds`: one per emit,
    then one per carry leaving the step) and with the forward values it reads
    (`residuals`, saved per time step by the forward scan), it gives the gradient of
    every float input of the step (`input_grads`: sequences' slices, carries entering
    the step, captured outer tensors; None where none reaches it) and of every body
    parameter in this one step (`param_grads`, summed over steps by the runtime)."""
    seeds: list = field(default_factory=list)
    residuals: list = field(default_factory=list)
    input_grads: list = field(default_factory=list)
    param_grads: dict = field(default_factory=dict)


def step_inputs(node: Node) -> list[Value]:
    """A scan's step inputs in the order of the scan node's inputs: each sequence's
    per-step slice, each carry as it enters the step, then each captured outer tensor."""
    body = node.body
    seqs = [body.inputs[n] for n in node.attrs["seq"]]
    return seqs + [c.step_in for c in body.carries] + list(node.inputs[len(seqs) + len(body.carries):])


_STEP_GRADS: "weakref.WeakKeyDictionary[Node, StepGrad]" = weakref.WeakKeyDictionary()


def step_grad(node: Node) -> StepGrad:
    """The backward graph of scan `node`'s step (built once per scan node)."""
    sg = _STEP_GRADS.get(node)
    if sg is not None:
        return sg
    body = node.body
    ins = step_inputs(node)
    b = GradBuilder(live_values(body.nodes, {id(v) for v in ins if is_float(v.dtype)}))
    outs = list(body.outputs.values()) + [c.step_out for c in body.carries]
    seeds = [Value(v.shape, v.dtype, name=f"d{v.name or 'out'}", pos=v.pos) for v in outs]
    grads: dict[int, Value] = {}
    for v, s in zip(outs, seeds):
        if not is_float(v.dtype) or not b.needs(v):
            continue
        grads[id(v)] = b.one("add", [grads[id(v)], s], {}, node) if id(v) in grads else s
    param_grads = backprop(b, body.nodes, grads)
    made = {id(o) for n in b.nodes for o in n.outputs} | {id(s) for s in seeds}
    outer = {id(v) for v in node.inputs}
    residuals, seen = [], set()
    for n in b.nodes:
        for v in n.inputs:
            if (v is not None and v.param is None and id(v) not in made and id(v) not in outer
                    and id(v) not in seen):
                seen.add(id(v))
                residuals.append(v)
    sg = StepGrad(f"{body.name} (backward)", nodes=b.nodes, pos=body.pos, seeds=seeds, residuals=residuals,
                  input_grads=[grads.get(id(v)) for v in ins], param_grads=param_grads)
    _STEP_GRADS[node] = sg
    return sg
