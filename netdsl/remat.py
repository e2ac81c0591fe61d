"""Rematerialisation: values the backward reads that are cheaper to compute again
than to keep from the forward pass to the end of the step.

Two kinds, both exact (the same kernels on the same inputs give the same bits):
  - an elementwise node whose inputs are kept for the backward anyway, or are the
    output of a batch norm used only by it whose input is kept (the norm is replayed
    with its saved statistics: no new reduction, no second running-statistics update).
    ResNet's norm + ReLU outputs: the ReLU's gradient and the next conv's weight
    gradient read them; the norm's gradient reads the norm's input.
  - a convolution that reads only the step's inputs and parameters (alive all step):
    a network's first conv, whose output is its largest tensor and costs a few percent
    of the step's FLOPs to compute again.
Each replay is a node of the backward graph (path `<forward path>.recompute`, `fwd`
set to the node it replays), placed just before its first reader. A recomputed value
is no longer kept, so nothing is recomputed from a recomputed value of its own kind.
"""
from __future__ import annotations

from .ir.graph import Node, Value
from .plan import REPLAY, is_elementwise


def recompute(forward: list[Node], backward: list[Node], keep: set[int]) -> list[Node]:
    """The backward node list with replays inserted and readers rewired (the forward
    nodes are not touched); keep: ids of values the step hands back."""
    readers: dict[int, list[Node]] = {}
    for n in backward:
        for v in n.inputs:
            if v is not None:
                readers.setdefault(id(v), []).append(n)
    fwd_users: dict[int, int] = {}
    for n in forward:
        for v in n.inputs:
            if v is not None:
                fwd_users[id(v)] = fwd_users.get(id(v), 0) + 1
    always = lambda u: u.param is not None or u.producer is None       # parameters and feeds
    kept = lambda u: always(u) or id(u) in readers
    out = list(backward)

    def replay(chain: list[Node], v: Value):
        made: dict[int, Value] = {}
        clones = []
        for m in chain:
            c = Node(m.op, [made.get(id(u), u) if u is not None else None for u in m.inputs], m.attrs,
                     m.path + REPLAY, m.pos, m.frames, params=m.params, macs=m.macs, fwd=m)
            c.outputs = [Value(o.shape, o.dtype, c, o.index, pos=o.pos) for o in m.outputs]
            made.update((id(o), co) for o, co in zip(m.outputs, c.outputs))
            clones.append(c)
        users = readers.pop(id(v))
        for n in users:
            n.inputs = [made[id(v)] if u is v else u for u in n.inputs]
        for c in clones:
            for u in c.inputs:
                if u is not None:
                    readers.setdefault(id(u), []).append(c)
        at = min(out.index(n) for n in users)
        out[at:at] = clones

    for p in forward:       # elementwise (+ replayed norm) first: they read the convs' outputs
        if not is_elementwise(p) or len(p.outputs) != 1:
            continue
        v = p.outputs[0]
        if id(v) in keep or id(v) not in readers:
            continue
        norms = [u.producer for u in p.inputs if u is not None and not kept(u)]
        if all(m.op == "bn" and fwd_users[id(m.outputs[0])] == 1 and id(m.outputs[0]) not in keep
               and kept(m.inputs[0]) for m in norms):
            replay(norms + [p], v)
    for p in forward:       # then first convs, whose outputs those replays now read
        v = p.outputs[0] if len(p.outputs) == 1 else None
        if (p.op == "conv" and v is not None and id(v) not in keep and id(v) in readers
                and all(u is None or always(u) for u in p.inputs)):
            replay([p], v)
    return out
