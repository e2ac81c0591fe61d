"""Which scans run as a recurrent layer kernel on the CPU (kernels/cpu/recurrent_layer.py):
those whose whole step is one LSTM or vanilla RNN reading the scanned sequence, carrying
its state (h, and c for an LSTM) and emitting h at most. The step may be the fused cell
(lstm_cell, rnn_cell) or the notes' LSTM written out, as lib/rnn.net's `lstm` step has it:

    i, f, o, g = split(linear(concat(h, x_t), 4 * H), 4)
    c = sigmoid(f) * c + sigmoid(i) * tanh(g)
    h = sigmoid(o) * tanh(c)

whose one W over [h; x] is [W_hh | W_ih] and whose bias is b_ih. The planner reports
these loops (plan.loops) and runtime/scan.py runs them; anything else runs its step
program, as does any of these where a per-step value is asked for (--grad-flow).
"""
from __future__ import annotations

from dataclasses import dataclass

from .ir.graph import Node

CELLS = {"lstm_cell": ("lstm", 2), "rnn_cell": ("rnn", 1)}     # op -> (kind, carries)


@dataclass(frozen=True)
class Layer:
    kind: str               # "lstm" or "rnn"
    node: Node              # the fused cell, or the written-out LSTM's linear over [h; x]
    written: bool           # the notes' equations (one W over [h; x], gate order i, f, o, g)


def match(n: Node) -> Layer | None:
    """The layer kernel that can run scan n, or None."""
    body = n.body
    if len(n.attrs["seq"]) != 1 or len(n.inputs) != 1 + len(body.carries):
        return None
    x = body.inputs[n.attrs["seq"][0]]
    hout = body.carries[0].step_out if body.carries else None
    if len(body.outputs) > 1 or any(v is not hout for v in body.outputs.values()):
        return None
    if len(body.nodes) == 1:
        m = body.nodes[0]
        kind, nc = CELLS.get(m.op, (None, 0))
        if kind is None or len(body.carries) != nc or m.inputs[0] is not x or any(
                m.inputs[1 + i] is not c.step_in or c.step_out is not m.outputs[i] for i, c in enumerate(body.carries)):
            return None
        return Layer(kind, m, False)
    lin = _written_lstm(body, x)
    return Layer("lstm", lin, True) if lin is not None else None


def _written_lstm(body, x) -> Node | None:
    """The linear node of a step that is exactly the notes' LSTM (module doc), or None."""
    if len(body.carries) != 2 or len(body.nodes) != 12:
        return None
    (ch, cc) = body.carries
    made = {id(v): m for m in body.nodes for v in m.outputs}
    seen: list[Node] = []

    def node(v, op):
        m = made.get(id(v))
        if m is None or m.op != op:
            raise LookupError
        seen.append(m)
        return m

    def pair(m, ops):
        """m's two inputs as the producers of ops (in either order), or LookupError."""
        a, b = m.inputs
        for u, w in ((a, b), (b, a)):
            try:
                mark = len(seen)
                return node(u, ops[0]) if ops[0] else u, node(w, ops[1]) if ops[1] else w
            except LookupError:
                del seen[mark:]
        raise LookupError

    try:
        so, tc = pair(node(ch.step_out, "mul"), ("sigmoid", "tanh"))       # h' = sigmoid(o) * tanh(c')
        if tc.inputs[0] is not cc.step_out:
            return None
        m1, m2 = pair(node(cc.step_out, "add"), ("mul", "mul"))             # c' = f c + i g
        try:
            mark = len(seen)
            sf, c = pair(m1, ("sigmoid", None))
            si, tg = pair(m2, ("sigmoid", "tanh"))
        except LookupError:
            del seen[mark:]
            sf, c = pair(m2, ("sigmoid", None))
            si, tg = pair(m1, ("sigmoid", "tanh"))
        if c is not cc.step_in:
            return None
        sp = node(si.inputs[0], "split")
        if [v for v in sp.outputs] != [si.inputs[0], sf.inputs[0], so.inputs[0], tg.inputs[0]] \
                or tuple(sp.attrs["parts"]) != (4,) or sp.attrs["axis"] not in (1, -1):
            return None
        lin = node(sp.inputs[0], "linear")
        cat = node(lin.inputs[0], "concat")
    except LookupError:
        return None
    if list(cat.inputs) != [ch.step_in, x] or cat.attrs.get("axis") not in (1, -1):
        return None
    if {id(m) for m in seen} != {id(m) for m in body.nodes}:
        return None
    return lin
