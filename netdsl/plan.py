"""The planner: schedule, elementwise fusion, liveness and in-place reuse.

The plan is target-neutral: it says which nodes run as one fused elementwise kernel,
when each intermediate can be released, and which outputs may overwrite an input
that dies at the same step. Backends bind kernels to the steps.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from . import layer_match
from .ir.dims import product, subs
from .ir.graph import Node, Value
from .ops import OPS

# path suffix of a forward node replayed in the backward (remat.py)
REPLAY = ".recompute"

BYTES = {"f16": 2, "f32": 4, "f64": 8, "i32": 4, "i64": 8, "bool": 1}


@dataclass(eq=False)
class Step:
    nodes: list[Node]                  # one node, or a fused elementwise group in order
    inputs: list[Value]                # values read from outside the step
    outputs: list[Value]               # values the step must materialise
    inplace: dict = field(default_factory=dict)   # output index -> input index it overwrites

    @property
    def fused(self) -> bool:
        return len(self.nodes) > 1 or is_elementwise(self.nodes[0])

    @property
    def name(self) -> str:
        return "+".join(n.op if n.op != "ew_grad" else f"{n.attrs['of']}'{n.attrs['wrt']}" for n in self.nodes)


@dataclass
class Plan:
    steps: list[Step]
    free_after: list[list[Value]]      # values released after each step
    peak_naive: int                    # bytes if every intermediate were kept
    peak_planned: int                  # bytes with liveness-based release and in-place reuse
    dims: dict


def is_elementwise(n: Node) -> bool:
    op = OPS.get(n.op)     # (a scan is no registered operator yet)
    return op is not None and op.kind == "elementwise" and all(v.dtype in ("f32", "f64") for v in n.outputs)


def nbytes(v: Value, dims: dict) -> int:
    return int(subs(product(v.shape), dims)) * BYTES.get(v.dtype, 4)


# A batch norm may head an elementwise kernel (its apply is per-channel elementwise once
# the statistics are known), and its gradient may end one (it reduces the chain's result).
HEADS, TAILS = {"bn"}, {"bn_grad"}


def _fusable_edge(v: Value, consumer: Node, users: dict, keep: set, norms) -> bool:
    """Fold v's producer into consumer's kernel: v is used only there and never kept."""
    p = v.producer
    if p is None or id(v) in keep or len(users.get(id(v), ())) != 1:
        return False
    if is_elementwise(consumer):
        head = norms and p.op in HEADS and p.inputs[0].rank in (2, 4)
        return (is_elementwise(p) or head) and tuple(v.shape) == tuple(consumer.outputs[0].shape)
    if norms is True and consumer.op in TAILS and v is consumer.inputs[0]:
        return is_elementwise(p) and tuple(v.shape) == tuple(consumer.inputs[1].shape)
    return False


def plan(nodes: list[Node], keep: list[Value], dims: dict, fuse: bool = True, norms: bool | str = True) -> Plan:
    """norms: fold a batch norm into the elementwise kernel after it (head) and one before
    its gradient (tail); "heads": the heads only (CUDA, where a generated tail costs more
    launches than the hand-written gradient kernels it replaces); False: neither."""
    keep_ids = {id(v) for v in keep}
    users: dict[int, list[Node]] = {}
    for n in nodes:
        for v in n.inputs:
            if v is not None:
                users.setdefault(id(v), []).append(n)
    # fusion groups: follow single-use edges from elementwise producers into consumers
    group_of: dict[int, list[Node]] = {}
    for n in nodes:
        g = [n]
        for v in (n.inputs if fuse else []):
            if v is not None and id(v.producer) in group_of and _fusable_edge(v, n, users, keep_ids, norms):
                pg = group_of[id(v.producer)]
                if pg is g or pg[-1].op in TAILS or (n.op in TAILS and pg[0].op in HEADS):
                    continue
                if v.producer.op in HEADS and len(pg) > 1:
                    continue   # a norm heads its own kernel only
                if any(m.op in HEADS for m in pg) and any(m.op in HEADS for m in g):
                    continue   # one norm per kernel
                g = pg + [m for m in g if m not in pg]
        for m in g:
            group_of[id(m)] = g
    steps, seen = [], set()
    for n in nodes:
        g = group_of[id(n)]
        if g[-1] is not n or id(g[-1]) in seen:
            continue   # a group runs where its last node was
        seen.add(id(n))
        made = {id(v) for m in g for v in m.outputs}
        ins, outs = [], []
        own = len(g) == 1 and not is_elementwise(n)     # a kernel bound to the node: its inputs as given
        for m in g:
            for v in m.inputs:
                if v is not None and id(v) not in made and (own or all(v is not u for u in ins)):
                    ins.append(v)
            for v in m.outputs:
                # a kernel of its own returns every output, used or not, in the node's order
                if len(g) == 1 or id(v) in keep_ids or any(u not in g for u in users.get(id(v), [])):
                    outs.append(v)
        steps.append(Step(list(g), ins, outs))
    return _liveness(steps, keep_ids, dims)


def _liveness(steps: list[Step], keep_ids: set, dims: dict) -> Plan:
    last: dict[int, int] = {}
    vals: dict[int, Value] = {}
    for i, s in enumerate(steps):
        for v in s.inputs:
            last[id(v)] = i
            vals[id(v)] = v
        for v in s.outputs:
            last.setdefault(id(v), i)
            vals[id(v)] = v
    # only values made here are released (or overwritten): what is fed from outside (inputs,
    # parameters, a scan step's sequences, carries and captures) belongs to the caller
    made = {id(v) for s in steps for n in s.nodes for v in n.outputs}
    free = [[] for _ in steps]
    for vid, i in last.items():
        if vid not in keep_ids and vid in made:
            free[i].append(vals[vid])
    live = peak = naive = 0
    for i, s in enumerate(steps):
        dying = {id(v) for v in free[i]}
        for j, v in enumerate(s.outputs):
            # an elementwise step may write into an input that dies here (same shape and dtype);
            # so may a norm-gradient tail: its first pass only reduces, its second is elementwise
            if s.fused:
                for k, u in enumerate(s.inputs):
                    if (id(u) in dying and tuple(u.shape) == tuple(v.shape) and u.dtype == v.dtype
                            and k not in s.inplace.values()):
                        s.inplace[j] = k
                        break
            naive += nbytes(v, dims)
            if j not in s.inplace:
                live += nbytes(v, dims)
        peak = max(peak, live)
        reused = {id(s.inputs[k]) for k in s.inplace.values()}
        live -= sum(nbytes(v, dims) for v in free[i] if id(v) not in reused)
    return Plan(steps, free, naive, peak, dims)


def replays(p: Plan) -> list[Node]:
    """The forward nodes the plan's backward replays (remat.py), as their replay nodes."""
    return [n for s in p.steps for n in s.nodes if n.path.endswith(REPLAY)]


def loops(p: Plan) -> list[dict]:
    """Each scan of the plan as the loop it runs: T steps of its step's own plan, and the
    values its backward reads, saved at every step (bytes per step and over T)."""
    from .autodiff import step_grad
    out = []
    for s in p.steps:
        n = s.nodes[0]
        if n.op != "scan":
            continue
        T = int(subs(n.attrs["length"], p.dims))
        body = n.body.nodes
        train = any(m.op == "scan_grad" and m.fwd is n for t in p.steps for m in t.nodes)
        residuals = step_grad(n).residuals if train else []
        saved = sum(nbytes(v, p.dims) for v in residuals)
        inner = plan(body, list(n.body.outputs.values()) + [c.step_out for c in n.body.carries] + residuals,
                     p.dims)
        entry = {"path": n.path, "steps": T, "nodes": len(body), "kernels": len(inner.steps),
                 "saved_per_step": saved, "saved": saved * T}
        lay = layer_match.match(n)
        if lay is not None:     # on the CPU: the layer kernel's [h; x; 1] columns (and an lstm's gates and c)
            hv = n.body.carries[0].step_out
            h, x = nbytes(hv, p.dims), nbytes(n.body.inputs[n.attrs["seq"][0]], p.dims)
            one = h // int(subs(hv.shape[-1], p.dims))
            entry["cpu_layer_saved_per_step"] = (h + x + one + (6 * h if lay.kind == "lstm" else 0)) if train else 0
        out.append(entry)
    return out


def explain(p: Plan) -> str:
    lines = []
    fused = [s for s in p.steps if len(s.nodes) > 1]
    lines.append(f"steps        {len(p.steps)} ({sum(len(s.nodes) for s in p.steps)} nodes)")
    lines.append(f"fused        {len(fused)} elementwise groups of 2+ nodes")
    for s in fused:
        lines.append(f"  {s.nodes[-1].path}: {s.name}")
    inpl = [s for s in p.steps if s.inplace]
    lines.append(f"in place     {len(inpl)} steps write into a dying input")
    again = replays(p)
    lines.append(f"recomputed   {len(again)} forward nodes replayed in the backward instead of kept (remat.py)")
    held = 0
    for l in loops(p):
        lines.append(f"loop         {l['path']}: {l['steps']} steps of a {l['nodes']}-node step ({l['kernels']} kernels)"
                     + (f"; saves {l['saved_per_step'] / 2**10:.1f} KiB per step for the backward "
                        f"({l['saved'] / 2**20:.1f} MiB over the sequence)" if l["saved"] else "")
                     + ("; on the CPU one layer kernel each way"
                        + (f", keeping {l['cpu_layer_saved_per_step'] / 2**10:.1f} KiB per step "
                           f"({l['cpu_layer_saved_per_step'] * l['steps'] / 2**20:.1f} MiB)"
                           if l["cpu_layer_saved_per_step"] else "") if "cpu_layer_saved_per_step" in l else ""))
        held += l["saved"]
    lines.append(f"peak memory  {p.peak_naive / 2**20:.1f} MiB with every intermediate kept; "
                 f"{p.peak_planned / 2**20:.1f} MiB planned"
                 + (f", plus {held / 2**20:.1f} MiB the loops keep for their backward" if held else ""))
    return "\n".join(lines)
