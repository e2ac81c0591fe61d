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
    return [(role, p) for role, p in node.params.items() if p.role != "buffer"]


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


def build(g: Graph, recompute: bool = True) -> TrainingGraph:
    if not g.losses:
        raise NetdslError(f"network '{g.name}' has no loss, so there is nothing to train", g.pos,
                          hint="add `loss NAME = cross_entropy(logits, label)`")
    for n in g.nodes:
        if n.op == "scan":
            raise NetdslError("training recurrent networks (scan) is not supported by this version of "
                              "the CPU runtime yet", n.pos, hint="netdsl compile and render work for it")
    # which values depend on a trainable parameter through differentiable ops
    live: set[int] = set()
    for n in g.nodes:
        op = OPS[n.op]
        if not op.differentiable:
            continue
        if trainable(n) or any(id(n.inputs[i]) in live for i in wrt_inputs(op, n)):
            live.update(id(v) for v in n.outputs if is_float(v.dtype))
    b = GradBuilder(live)
    grads: dict[int, Value] = {}

    def accumulate(v: Value, gv: Value, fwd: Node):
        if id(v) in grads:
            gv = b.one("add", [grads[id(v)], gv], {}, fwd)
        grads[id(v)] = gv

    for loss in g.losses:
        if id(loss.value) in live:
            seed = b.one("fill", [], {"shape": (), "value": loss.weight, "dtype": loss.value.dtype},
                         loss.value.producer)
            accumulate(loss.value, seed, loss.value.producer)
    param_grads: dict[str, Value] = {}
    for n in reversed(g.nodes):
        gys = [grads.get(id(v)) for v in n.outputs]
        if all(gy is None for gy in gys):
            continue
        op = OPS[n.op]
        if op.vjp is None:
            raise NetdslError(f"operator '{n.op}' has no gradient yet", n.pos)
        gin, gparams = (kernel_vjp if op.vjp == "kernel" else op.vjp)(b, n, list(gys))
        for i, gv in enumerate(gin):
            if gv is not None and id(n.inputs[i]) in live:
                accumulate(n.inputs[i], gv, n)
        for role, gv in gparams.items():
            param_grads[n.params[role].name] = gv
    keep = {id(v) for v in list(g.outputs.values()) + [l.value for l in g.losses]}
    backward = remat.recompute(g.nodes, b.nodes, keep) if recompute else b.nodes
    return TrainingGraph(g, list(g.nodes) + backward, param_grads, len(g.nodes))
