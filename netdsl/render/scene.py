"""What a drawing shows: boxes, the clusters they sit in, and the edges between them.

The graph is flattened (scan bodies included) and its nodes grouped into a tree of
clusters by their frames (block calls, loop iterations, recurrence steps). Then it is
simplified for reading:
  - fold: consecutive sibling calls of the same block with the same arguments (the
    frame's repeat_key) become one cluster marked ×n; the other calls' nodes are mapped
    onto the first call's, and the edges between calls of one run are dropped;
  - collapse: blocks nested deeper than `depth` become one box each;
  - stack: a norm / activation / dropout that is the only reader of the layer before
    it joins that layer's box (conv -> bn -> relu is one box of three rows).
A recurrence's backward (`scan_grad`, in a training graph) is drawn like its scan: a
loop holding the step's VJP nodes (autodiff.step_grad), the carries' gradients as its
states (handed from step t+1 to t), edges from the forward step's values it reads
(saved per step), and its parameter gradients, summed over the steps, leaving it.
dot.py turns the result into Graphviz; nothing here knows about DOT.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from ..ir.dims import product
from ..ir.graph import Carry, Frame, Graph, Loss, Node, Value
from ..ops.registry import is_float
from . import style

CLUSTER_KINDS = ("block", "step")     # the frames that count for --depth and can collapse


@dataclass(eq=False)
class Item:
    """One operator node, or one carried state of a recurrence."""
    node: Node | None
    frames: tuple                 # below the network frame, outermost first
    phase: str                    # all | train
    carry: Carry | None = None
    cluster: "Cluster | None" = None
    runs: list = field(default_factory=list)   # (folded run's first cluster, which call) per run it is in
    backward: bool = False        # in a recurrence's backward step (a state: a gradient carried t+1 -> t)

    @property
    def inputs(self) -> list:
        if self.carry:
            return [self.carry.init] if self.carry.init is not None else []
        return list(self.node.inputs)

    @property
    def params(self) -> int:
        if self.node is None:
            return 0
        return sum(product(p.shape) for p in self.node.params.values() if p.role != "buffer")


@dataclass(eq=False)
class Cluster:
    frame: Frame | None           # None: the network itself
    frames: tuple                 # the frames from the network down to this one
    level: int                    # blocks and steps above and including this one
    children: list = field(default_factory=list)    # Items and Clusters, in program order
    subs: dict = field(default_factory=dict)        # id(frame) -> Cluster
    instances: list = field(default_factory=list)   # the calls folded into this one, itself first
    collapsed: bool = False
    scan: Node | None = None      # for a step: the scan node that runs it (or its scan_grad)

    @property
    def kind(self) -> str:
        return self.frame.kind if self.frame else "network"

    @property
    def backward(self) -> bool:
        """A recurrence's backward: the step's VJP, run from the last step to the first."""
        return self.scan is not None and self.scan.op == "scan_grad"

    @property
    def path(self) -> str:
        return ".".join(f.scope for f in self.frames if f.scope)

    def items(self):
        for c in self.children:
            if isinstance(c, Cluster):
                yield from c.items()
            else:
                yield c

    def all_items(self):
        """Items of every call folded into this one (at every level), for totals."""
        for inst in self.instances:
            for c in inst.children:
                if isinstance(c, Cluster):
                    yield from c.all_items()
                else:
                    yield c

    @property
    def params(self) -> int:
        return sum(it.params for it in self.all_items())

    @property
    def train_only(self) -> bool:
        its = list(self.items())
        return bool(its) and all(it.phase == "train" for it in its)


@dataclass(eq=False)
class Box:
    """One Graphviz node."""
    id: str
    kind: str                     # ops | state | block | input | output | loss
    parent: Cluster | None        # the drawn cluster holding it (None: top level)
    items: list = field(default_factory=list)   # ops stacked in it; for a block, all its items
    block: Cluster | None = None
    name: str = ""
    value: Value | None = None
    loss: Loss | None = None      # a loss drawn here (its own box, or merged into the loss op's box)
    out_shapes: list = field(default_factory=list)

    @property
    def train_only(self) -> bool:
        if self.kind in ("input", "output"):
            return False
        if self.kind == "loss":
            return self.loss.phase == "train"
        return bool(self.items) and all(it.phase == "train" for it in self.items)

    @property
    def no_grad(self) -> bool:
        return any(it.node is not None and not style.differentiable(it.node) for it in self.items)

    @property
    def params(self) -> int:
        return sum(it.params for it in self.items)


@dataclass
class Edge:
    src: Box
    dst: Box
    label: str
    back: bool = False            # a carried state going round to the next step (backward: the step before)
    reverse: bool = False         # back edge of a backward loop: a state's gradient, step t+1 to t
    saved: bool = False           # a forward step's value, saved per step, read by its backward


def _below_network(frames) -> tuple:
    return tuple(frames[1:]) if frames and frames[0].kind == "network" else tuple(frames)


def _drawn_at(n: Node) -> tuple:
    """The frames a node is drawn in: its own, but a carry's initial value written in the
    step (`carry h = init_h(mean(feats))`) is drawn in the forward loop while its gradient,
    computed once after the backward loop, is drawn beside the loops."""
    if n.fwd is None:
        return tuple(n.frames)
    steps = [i for i, f in enumerate(n.frames) if f.kind == "step"]
    return tuple(n.frames[:steps[0]] if steps else n.frames)


def _step_frame(scan: Node) -> Frame:
    """The frame elaboration pushed for a scan's step (its body nodes all carry it)."""
    stack = list(scan.body.nodes)
    while stack:
        m = stack.pop(0)
        if len(m.frames) > len(scan.frames):
            return m.frames[len(scan.frames)]
    return Frame(scan.path.rsplit(".", 1)[-1], "step", scan.attrs.get("step", "step"), scan.pos)


class Scene:
    def __init__(self, g: Graph, depth: int | None = None, expand: bool = False, stack: bool = True):
        self.graph = g
        self.items: list[Item] = []
        self.item_of: dict[int, Item] = {}   # id(value) -> the item producing it (carry state: its state)
        self.alias: dict[int, Value] = {}    # step input -> outer sequence; scan output -> value in the body
        self.steps: dict[int, Node] = {}     # id(step frame) -> scan node
        self.step_inputs: dict[int, str] = {}   # per-step slice (x_t, dh_t) -> the name it is shown by
        self.saved: set[int] = set()         # forward step values a backward step reads (residuals)
        self.summed: set[int] = set()        # scan_grad outputs summed over the steps (params, captures)
        self.uses: Counter = Counter()       # id(value) -> readers (scan nodes included)
        self.exported = {id(v) for v in g.outputs.values()} | {id(l.value) for l in g.losses}
        self._flatten(g.nodes, g.phase_of_nodes())
        self.root = Cluster(None, (), 0, instances=[])
        self.root.instances = [self.root]
        for it in self.items:
            self._place(it)
        self.rep: dict[int, Item] = {}      # id(item) in a folded-away call -> same item in the first call
        if not expand:
            self._fold(self.root)
        self._collapse(self.root, depth)
        self.boxes: list[Box] = []
        self.box_of: dict[int, Box] = {}
        self.inputs = {id(v): self._box("input", None, name=k, value=v) for k, v in g.inputs.items()}
        self._make_boxes(self.root, stack)
        self.edges: list[Edge] = []
        self._seen: set = set()
        self._connect()

    # ------------------------------------------------------------ flatten and group
    def _flatten(self, nodes: list, phases: dict, phase: str | None = None, where=None, backward=False):
        """Items for `nodes`; `where` gives the frames a node is drawn in (inside a backward
        step, the step's VJP nodes carry the forward step's frames)."""
        where = where or _drawn_at
        for n in nodes:
            for v in n.inputs:
                self.uses[id(v)] += 1
            ph = phase or phases.get(id(n), "all")
            if n.op == "scan_grad" and n.fwd is not None and n.fwd.body is not None:
                self._flatten_backward(n, phases, ph, where)
                continue
            if n.body is None:
                it = Item(n, _below_network(where(n)), ph, backward=backward)
                self.items.append(it)
                for o in n.outputs:
                    self.item_of[id(o)] = it
                continue
            body, step = n.body, _step_frame(n)
            self.steps[id(step)] = n
            for name, outer in zip(n.attrs.get("seq", []), n.inputs):
                self.alias[id(body.inputs[name])] = outer
                self.step_inputs[id(body.inputs[name])] = body.inputs[name].name
            emits = list(body.outputs.values())
            for o, inner in zip(n.outputs, emits + [c.step_out for c in body.carries]):
                self.alias[id(o)] = inner
            self.exported |= {id(v) for v in emits} | {id(c.step_out) for c in body.carries}
            for c in body.carries:
                it = Item(None, _below_network(where(n)) + (step,), ph, carry=c)
                self.items.append(it)
                self.item_of[id(c.step_in)] = it
            self._flatten(body.nodes, phases, ph, where, backward)

    def _flatten_backward(self, g: Node, phases: dict, ph: str, where):
        """A scan_grad as a loop of its own: the step's VJP nodes, moved from the forward
        step's frame into a backward step frame beside it."""
        from ..autodiff import step_grad, trainable
        scan, sg = g.fwd, step_grad(g.fwd)
        fstep = _step_frame(scan)
        step = Frame(fstep.scope, "step", fstep.callee, fstep.pos)
        self.steps[id(step)] = g
        outer, depth = where(g) + (step,), len(scan.frames)

        def inside(m: Node) -> tuple:   # the backward step, then what lies below the forward step
            return outer + tuple(m.frames[depth + 1:])

        body = scan.body
        ns, nc, ne, k = len(scan.attrs["seq"]), len(body.carries), len(body.outputs), g.attrs["ngrads"]
        gy = dict(zip([i for i, v in enumerate(scan.outputs) if is_float(v.dtype)], g.inputs[:k]))
        for j, s in enumerate(sg.seeds[:ne]):      # each emit's gradient, one time slice per step
            if j in gy:
                self.alias[id(s)] = gy[j]
                self.step_inputs[id(s)] = f"{s.name}_t"
        read = {id(v) for m in sg.nodes for v in m.inputs}
        for j, c in enumerate(body.carries):        # each carry's gradient goes round, t+1 -> t
            seed, out = sg.seeds[ne + j], sg.input_grads[ns + j]
            if out is None and id(seed) not in read:
                continue
            head, _, tail = c.name.rpartition(".")
            dc = Carry(f"{head}.d{tail}" if head else f"d{tail}", gy.get(ne + j), seed, out)
            it = Item(None, _below_network(outer), ph, carry=dc, backward=True)
            self.items.append(it)
            self.item_of[id(seed)] = it
        self.saved |= {id(v) for v in sg.residuals}
        params, nin = trainable(scan), len(scan.inputs)
        for o, j in zip(g.outputs, g.attrs["like"]):     # as runtime/scan.py hands them out
            i = j - k
            inner = sg.input_grads[i] if i < nin else sg.param_grads.get(params[i - nin][1].name)
            if inner is None:
                continue
            self.alias[id(o)] = inner
            self.exported.add(id(inner))
            if i >= ns + nc:
                self.summed.add(id(o))     # captures' and parameters' gradients: summed over the steps
        self._flatten(sg.nodes, phases, ph, inside, backward=True)

    def _place(self, it: Item):
        cur = self.root
        for f in it.frames:
            sub = cur.subs.get(id(f))
            if sub is None:
                sub = Cluster(f, cur.frames + (f,), cur.level + (f.kind in CLUSTER_KINDS),
                              scan=self.steps.get(id(f)))
                sub.instances = [sub]
                cur.subs[id(f)] = sub
                cur.children.append(sub)
            cur = sub
        cur.children.append(it)
        it.cluster = cur

    # ------------------------------------------------------------ simplify
    def _fold(self, cluster: Cluster):
        kept = []
        for c in cluster.children:
            prev = kept[-1] if kept else None
            if isinstance(c, Cluster) and isinstance(prev, Cluster) and self._repeats(prev.instances[-1], c):
                prev.instances.append(c)
            else:
                kept.append(c)
        cluster.children = kept
        for c in kept:
            if not isinstance(c, Cluster):
                continue
            if len(c.instances) > 1:
                first = list(c.items())
                for k, inst in enumerate(c.instances):
                    for a, b in zip(inst.items(), first):
                        a.runs.append((c, k))
                        if k:
                            self.rep[id(a)] = b
            self._fold(c)

    def _collapse(self, cluster: Cluster, depth: int | None):
        for c in cluster.children:
            if isinstance(c, Cluster):
                if depth is not None and c.kind in CLUSTER_KINDS and c.level > depth:
                    c.collapsed = True
                else:
                    self._collapse(c, depth)

    def canon(self, it: Item) -> Item:
        while id(it) in self.rep:
            it = self.rep[id(it)]
        return it

    def _apart(self, a: Item, b: Item) -> bool:
        """True when a and b lie in different calls of one folded run (the edge between is dropped)."""
        while True:
            ka = {id(c): k for c, k in a.runs}
            if any(ka.get(id(c), k) != k for c, k in b.runs):
                return True
            a2, b2 = self.rep.get(id(a), a), self.rep.get(id(b), b)
            if a2 is a and b2 is b:
                return False
            a, b = a2, b2

    # ------------------------------------------------------------ boxes
    def _box(self, kind, parent, **kw) -> Box:
        b = Box(f"n{len(self.boxes)}", kind, parent, **kw)
        self.boxes.append(b)
        return b

    def _make_boxes(self, cluster: Cluster, stack: bool):
        for c in cluster.children:
            if isinstance(c, Cluster):
                if not c.collapsed:
                    self._make_boxes(c, stack)
                    continue
                b = self._box("block", cluster, block=c, items=list(c.all_items()))
                for it in c.items():
                    self.box_of[id(it)] = b
                continue
            b = self._stack_onto(c) if stack else None
            if b is not None:
                b.items.append(c)
            else:
                b = self._box("state" if c.carry else "ops", cluster, items=[c])
            self.box_of[id(c)] = b

    def _stack_onto(self, it: Item) -> Box | None:
        """The box of the layer `it` follows, when `it` reads as a suffix of it (conv -> bn -> relu)."""
        n = it.node
        if n is None or len(n.inputs) != 1 or style.family(n.op) not in style.FOLLOWERS:
            return None
        v = n.inputs[0]
        if id(v) in self.alias or id(v) in self.exported or self.uses[id(v)] != 1:
            return None
        prev = self.item_of.get(id(v))
        if prev is None or prev.node is None or len(prev.node.outputs) != 1:
            return None
        b = self.box_of.get(id(prev))
        if b is None or b.kind != "ops" or b.items[-1] is not prev or prev.cluster is not it.cluster:
            return None
        if prev.phase != it.phase or style.differentiable(prev.node) != style.differentiable(n):
            return None
        return b

    # ------------------------------------------------------------ edges
    def _source(self, v: Value):
        while id(v) in self.alias:
            v = self.alias[id(v)]
        if id(v) in self.inputs:
            return None, self.inputs[id(v)]
        it = self.item_of.get(id(v))
        return (it, self.box_of[id(self.canon(it))]) if it is not None else (None, None)

    def _edge(self, v: Value, dst: Box, dst_item: Item | None = None, back: bool = False):
        src_item, src = self._source(v)
        if src is None or src is dst:
            return
        if src_item is not None and dst_item is not None and self._apart(src_item, dst_item):
            return
        label = dst_item.carry.name.rsplit(".", 1)[-1] if back else style.shape_label(v.shape, v.dtype)
        if id(v) in self.step_inputs:
            label = f"{self.step_inputs[id(v)]} {label}"      # one step's slice of the sequence
        elif id(v) in self.summed:
            label = f"Σt {label}"
        if src.kind == "block" and not back and label not in src.out_shapes:
            src.out_shapes.append(label)
        saved = not back and id(v) in self.saved and dst_item is not None and dst_item.backward
        key = (src.id, dst.id, back)
        if key not in self._seen:
            self._seen.add(key)
            self.edges.append(Edge(src, dst, label, back, back and dst_item.backward, saved))

    def _connect(self):
        for it in self.items:
            dst = self.box_of[id(self.canon(it))]
            for v in it.inputs:
                self._edge(v, dst, it)
            if it.carry is not None and it.carry.step_out is not None:
                self._edge(it.carry.step_out, dst, it, back=True)
        for name, v in self.graph.outputs.items():
            self._edge(v, self._box("output", None, name=name, value=v))
        for loss in self.graph.losses:
            _, src = self._source(loss.value)
            if (src is not None and src.kind == "ops" and len(src.items) == 1 and src.loss is None
                    and style.family(src.items[0].node.op) == "loss"):
                src.loss = loss          # the loss op's own box becomes the loss
            else:
                self._edge(loss.value, self._box("loss", None, name=loss.name, loss=loss, value=loss.value))

    # ------------------------------------------------------------ what tests and the CLI report
    def clusters(self):
        """Every drawn cluster (open, below the network), outermost first."""
        stack = [self.root]
        while stack:
            c = stack.pop(0)
            for s in c.children:
                if isinstance(s, Cluster) and not s.collapsed:
                    yield s
                    stack.append(s)


    def _repeats(self, a: Cluster, b: Cluster) -> bool:
        """b repeats a: the same block with the same arguments, making the same nodes, reading
        what a made (parallel branches that happen to be alike are not a repetition)."""
        if a.kind != "block" or b.kind != "block" or b.frame.repeat_key is None:
            return False
        if b.frame.repeat_key != a.frame.repeat_key or _signature(a) != _signature(b):
            return False
        made = {id(it) for it in a.items()}
        return any(id(self.producer(v)) in made for it in b.items() for v in it.inputs)

    def producer(self, v: Value) -> Item | None:
        while id(v) in self.alias:
            v = self.alias[id(v)]
        return self.item_of.get(id(v))


def _signature(c: Cluster) -> tuple:
    return tuple((it.node.op if it.node else "carry", len(it.frames)) for it in c.items())
