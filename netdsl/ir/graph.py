"""The graph IR: typed values, nodes with source positions and block paths.

Shape, parameter and FLOP rules belong to operators (netdsl/ops), not to the graph;
the graph only records what elaboration produced.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import Pos
from .dims import Dim, fmt_shape


@dataclass(eq=False)
class Value:
    """One tensor: an input, a node output, or a parameter."""
    shape: tuple[Dim, ...]
    dtype: str
    producer: "Node | None" = None
    index: int = 0
    name: str = ""            # user-visible name where there is one (input, assigned variable)
    pos: Pos | None = None    # where it was produced
    param: str | None = None  # set when this value is a parameter, by its path name

    @property
    def rank(self) -> int:
        return len(self.shape)

    def __repr__(self):
        return f"{self.dtype}{fmt_shape(self.shape)}"


@dataclass
class Param:
    name: str                 # full path, e.g. layer1.0.conv1.weight
    shape: tuple[int, ...]
    dtype: str
    init: str                 # initialiser name, see the op's registry entry
    node: "Node | None" = None
    role: str = "weight"      # weight | bias | scale | shift | buffer (buffers are not trained)
    _value: "Value | None" = None

    @property
    def value(self) -> Value:
        """The parameter as a graph value, so backward nodes can take it as an input."""
        if self._value is None:
            self._value = Value(self.shape, self.dtype, name=self.name, param=self.name)
        return self._value


@dataclass(eq=False)
class Frame:
    """One level of block nesting, kept on every node for rendering and naming."""
    scope: str                # path component, e.g. "layer1" or "0"
    kind: str                 # block | loop | step | network
    callee: str               # block name, loop var, ...
    pos: Pos | None = None
    repeat_key: Any = None    # identifies repetitions of the same block for folding

@dataclass(eq=False)
class Node:
    op: str
    inputs: list[Value]
    attrs: dict[str, Any]
    path: str                 # e.g. layer1.0.conv1
    pos: Pos | None
    frames: tuple[Frame, ...] = ()
    outputs: list[Value] = field(default_factory=list)
    params: dict[str, Param] = field(default_factory=dict)   # role name -> Param
    macs: Dim = 0
    body: "Graph | None" = None   # for scan: the step graph
    fwd: "Node | None" = None     # for backward nodes: the forward node they differentiate

    def __repr__(self):
        return f"Node({self.op} {self.path})"


def walk(nodes):
    """Every node of `nodes` and of the step bodies inside them, each body's nodes
    just before the scan that runs them."""
    for n in nodes:
        if n.body is not None:
            yield from walk(n.body.nodes)
        yield n


@dataclass
class Loss:
    name: str
    value: Value
    weight: float
    phase: str                # "all" or "train"
    pos: Pos | None = None


@dataclass
class Carry:
    """State of a recurrence: carried across steps, and across chunks in truncated BPTT."""
    name: str                 # path name, e.g. rnn1.h
    init: Value               # the value at step 0
    step_in: Value            # inside the body: the state entering the step
    step_out: Value | None = None   # inside the body: the state leaving the step
    final: Value | None = None      # outside: the state after the last step


@dataclass
class Graph:
    name: str
    inputs: dict[str, Value] = field(default_factory=dict)
    outputs: dict[str, Value] = field(default_factory=dict)
    losses: list[Loss] = field(default_factory=list)
    nodes: list[Node] = field(default_factory=list)
    params: dict[str, Param] = field(default_factory=dict)
    carries: list[Carry] = field(default_factory=list)
    train: dict[str, Any] = field(default_factory=dict)
    train_pos: dict[str, Pos] = field(default_factory=dict)
    symbols: dict[str, Pos] = field(default_factory=dict)
    args: dict[str, Any] = field(default_factory=dict)
    pos: Pos | None = None

    def consumers(self) -> dict[int, list[Node]]:
        out: dict[int, list[Node]] = {}
        for n in self.nodes:
            for v in n.inputs:
                out.setdefault(id(v), []).append(n)
        return out

    def param_count(self, trainable_only: bool = True) -> int:
        from .dims import product
        return sum(product(p.shape) for p in self.params.values()
                   if not trainable_only or p.role != "buffer")

    def phase_of_nodes(self) -> dict[int, str]:
        """'all' for nodes needed at inference (outputs, all-phase losses), else 'train'."""
        needed = needed_by(self.nodes, [v for v in self.outputs.values()]
                           + [l.value for l in self.losses if l.phase == "all"])
        return {id(n): ("all" if id(n) in needed else "train") for n in self.nodes}


def needed_by(nodes, values) -> set[int]:
    """The ids of the nodes among `nodes` that `values` depend on."""
    need: set[int] = set()
    by_value = {id(o): n for n in nodes for o in n.outputs}
    stack = list(values)
    while stack:
        n = by_value.get(id(stack.pop()))
        if n is None or id(n) in need:
            continue
        need.add(id(n))
        stack.extend(i for i in n.inputs if i is not None)
    return need
