"""Recurrent operators as ONNX: the fused cells and `scan` (see onnx_export.py).

Gate rows. ONNX's LSTM stacks its rows i, o, f, c (c: the candidate, netdsl's g);
lstm_cell stacks i, f, o, g (order="ifog", the notes') or i, f, g, o (order="ifgo",
torch's). ONNX's GRU stacks z, r, h where gru_cell (torch's form) has r, z, n, and
gru_cell's reset applies to W_hn h + b_hn: ONNX's linear_before_reset=1. The rows are
reordered into initializers named PATH.W / .R / .B beside the cell's own parameters.

A scan whose step is exactly one fused cell on the sequence and the carries is ONNX's
LSTM / GRU / RNN over the whole sequence (its sequences are [N, T, D], ONNX's [T, N, D]:
a transpose each way); any other step (the notes' written-out cells, attention...) is an
ONNX Scan over axis 1 whose body is the step exported node by node, a cell inside it
one time step of the ONNX op.
"""
from __future__ import annotations

import numpy as np

from ..errors import NetdslError
from .onnx_ops import rule

ONNX_OP = {"lstm_cell": "LSTM", "gru_cell": "GRU", "rnn_cell": "RNN"}
STATES = {"lstm_cell": 2, "gru_cell": 1, "rnn_cell": 1}


def _order(n) -> list[int]:
    """ONNX's row blocks as indices into the cell's."""
    if n.op == "lstm_cell":
        return [0, 2, 1, 3] if n.attrs.get("order", "ifog") == "ifog" else [0, 3, 1, 2]
    return [1, 0, 2] if n.op == "gru_cell" else [0]


def _rows(a: np.ndarray, order: list[int]) -> np.ndarray:
    blocks = np.split(a, len(order), axis=0)
    return np.concatenate([blocks[i] for i in order], axis=0)


def _weights(ex, n) -> list[str]:
    """W [1, G*H, D], R [1, G*H, H], B [1, 2*G*H] (or none) in ONNX's gate order."""
    order = _order(n)
    p = {r: q.name for r, q in n.params.items()}
    W = ex.param(p["weight_ih"], lambda a: _rows(a, order)[None], ".W")
    R = ex.param(p["weight_hh"], lambda a: _rows(a, order)[None], ".R")
    if "bias_ih" not in p:
        return [W, R]
    name = n.path + ".B"
    if name not in ex.inits:
        b = np.concatenate([_rows(ex.params[p["bias_ih"]], order), _rows(ex.params[p["bias_hh"]], order)])[None]
        ex.init(name, b)
    return [W, R, name]


def _run(ex, n, X: str, states: list[str]) -> list[str]:
    """The ONNX op of cell n over X [T, N, D] from states [1, N, H]: Y, Y_h (, Y_c)."""
    w = _weights(ex, n)
    ins = [X] + w + [""] * (3 - len(w)) + [""] + states        # (no sequence_lens: every sequence runs T steps)
    attrs = {"hidden_size": int(n.attrs["hidden"])}
    if n.op == "gru_cell":
        attrs["linear_before_reset"] = 1
    return ex.add(ONNX_OP[n.op], ins, 1 + STATES[n.op], n, **attrs)


@rule(*ONNX_OP)
def _cell(ex, n):
    """One time step: x [N, D] and states [N, H] as a sequence of length 1."""
    first = lambda v: ex.one("Unsqueeze", [ex.name(v), ex.ints([0])], n)   # noqa: E731
    outs = _run(ex, n, first(n.inputs[0]), [first(v) for v in n.inputs[1:]])
    for i, o in enumerate(outs[1:]):
        ex.add("Squeeze", [o, ex.ints([0])], [ex.out_name(n, i)], n)


def _one_cell(n):
    """The cell node when scan n's step is one fused cell on its sequence and carries,
    emitting only its h; else None."""
    body = n.body
    if len(body.nodes) != 1 or len(n.attrs["seq"]) != 1 or n.attrs["captures"]:
        return None
    c = body.nodes[0]
    if c.op not in ONNX_OP or len(body.carries) != STATES[c.op]:
        return None
    if c.inputs[0] is not body.inputs[n.attrs["seq"][0]] or c.inputs[0].rank != 2:
        return None
    for i, carry in enumerate(body.carries):
        if c.inputs[1 + i] is not carry.step_in or carry.step_out is not c.outputs[i]:
            return None
    if not all(v is c.outputs[0] for v in body.outputs.values()):
        return None
    return c


@rule("scan")
def _scan(ex, n):
    if not n.attrs["seq"]:
        raise NetdslError(f"cannot export scan {n.path} to ONNX: it reads no sequence (`over T`)", n.pos,
                          hint="ONNX's Scan runs over an input's axis; give the step a sequence")
    cell = _one_cell(n)
    if cell is not None:
        _whole_sequence(ex, n, cell)
    else:
        _onnx_scan(ex, n)


def _whole_sequence(ex, n, cell):
    seq, inits = n.inputs[0], n.inputs[1:1 + STATES[cell.op]]
    X = ex.one("Transpose", [ex.name(seq)], n, perm=[1, 0, 2])
    states = [ex.one("Unsqueeze", [ex.name(v), ex.ints([0])], n) for v in inits]
    outs = _run(ex, cell, X, states)
    ne = len(n.body.outputs)
    if ne:
        hs = ex.one("Squeeze", [outs[0], ex.ints([1])], n)                 # [T, 1, N, H] -> [T, N, H]
        for i in range(ne):
            ex.add("Transpose", [hs], [ex.out_name(n, i)], n, perm=[1, 0, 2])
    for i, o in enumerate(outs[1:]):
        ex.add("Squeeze", [o, ex.ints([0])], [ex.out_name(n, ne + i)], n)


def _onnx_scan(ex, n):
    from .onnx_export import emit_nodes
    body = n.body
    seq_names = n.attrs["seq"]
    ns, nc, ne = len(seq_names), len(body.carries), len(body.outputs)
    ins = []
    for c in body.carries:
        ex.names[id(c.step_in)] = ex.fresh(f"{c.name}/in")
        ins.append(ex.value_info(ex.names[id(c.step_in)], c.step_in))
    for s in seq_names:
        v = body.inputs[s]
        ex.names[id(v)] = ex.fresh(f"{n.path}/{s}")
        ins.append(ex.value_info(ex.names[id(v)], v))
    outer, ex.nodes = ex.nodes, []
    try:
        emit_nodes(ex, body.nodes)
        outs = []   # each through an Identity: a carry's new value may also be an emit, or an input
        for v, base in [(c.step_out, f"{c.name}/out") for c in body.carries] + \
                       [(v, f"{n.path}/{k}") for k, v in body.outputs.items()]:
            name = ex.fresh(base)
            ex.add("Identity", [ex.name(v)], [name], n)
            outs.append(ex.value_info(name, v))
        graph = ex.helper.make_graph(ex.nodes, ex.fresh(f"{n.path}/step"), ins, outs)
    finally:
        ex.nodes = outer
    finals = [ex.out_name(n, ne + i) for i in range(nc)]
    emits = [ex.out_name(n, i) for i in range(ne)]
    ex.add("Scan", [ex.name(v) for v in n.inputs[ns:ns + nc]] + [ex.name(v) for v in n.inputs[:ns]],
           finals + emits, n, body=graph, num_scan_inputs=ns, scan_input_axes=[1] * ns,
           scan_output_axes=[1] * ne)
