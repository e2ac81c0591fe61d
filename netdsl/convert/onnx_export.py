"""`netdsl export --onnx`: a network's inference graph as an ONNX model (opset 17).

The elaborated graph is walked once, outputs back to inputs, and each node needed for
the chosen outputs becomes ONNX nodes (the per-operator rules are in onnx_ops.py). The
graph is the one inference runs: batch norm reads its running statistics, dropout and
drop_path are identities, losses and what only they read are left out.

Names: inputs and outputs keep the spec's names; parameters are initializers under
their parameter paths (conv1.weight, layer1.0.bn1.running_mean: the names of `netdsl
export -o`); intermediate values are named after the node that makes them. Symbolic
dimensions (N, T, ...) are dynamic axes, dim_param named by the symbol; where a shape
needs one at run time (zeros([N, H]), a reshape to [N, T * H]) it is read from an input
that has it (Shape), so any batch size and sequence length run.

A scan becomes ONNX's own recurrence where its step is one fused cell (lstm_cell,
gru_cell, rnn_cell applied to the sequence and its carries: LSTM, GRU, RNN over the
whole sequence, gate rows reordered to ONNX's); any other step becomes a Scan whose
body is the step's nodes exported by the same rules.
"""
from __future__ import annotations

import os

import numpy as np

from ..errors import NetdslError
from ..ir.dims import Sym
from ..ir.graph import needed_by

OPSET = 17          # HardSwish (14), Shape's start/end (15), ReduceSum's axes as an input (13)
IR_VERSION = 8      # the IR version that goes with opset 17 (readable by older runtimes)
_BIG = 2 ** 31 - 1  # protobuf's limit on one message: larger models need external data

DTYPES = {"f16": np.float16, "f32": np.float32, "f64": np.float64, "i64": np.int64,
          "i32": np.int32, "i8": np.int8, "u8": np.uint8, "bool": np.bool_}


def require_onnx():
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise NetdslError("ONNX export needs the onnx package",
                          hint="pip install 'netdsl[onnx]' (or: pip install onnx)") from None
    return onnx


def np_dtype(dtype: str):
    if dtype not in DTYPES:
        raise NetdslError(f"cannot export a tensor of type {dtype} to ONNX")
    return DTYPES[dtype]


class Exporter:
    """The state of one export: the node list being filled (a Scan body has its own),
    initializers, and the ONNX name of every graph value."""

    def __init__(self, g, params: dict[str, np.ndarray]):
        require_onnx()
        from onnx import helper, numpy_helper
        self.helper, self.numpy_helper = helper, numpy_helper
        self.g, self.params = g, params
        self.nodes: list = []                   # the graph being filled (a Scan body's while in one)
        self.root = self.nodes                  # the main graph's
        self.inits: dict[str, np.ndarray] = {}  # initializers, written into the model at the end
        self.names: dict[int, str] = {}         # id(Value) -> ONNX name
        self.taken: set[str] = set(g.params)     # parameter paths are initializer names
        self._next: dict[str, int] = {}         # base name -> the next suffix to try
        self.dims: dict[str, tuple[str, int]] = {}   # symbol -> (input name, axis)
        self.cache: dict = {}                   # constants and shape pieces made once
        self.aux: dict[int, str] = {}           # id(Value) -> a second ONNX form (MaxPool's indices)
        self.consumers: dict[int, list] = {}

    # ---- names

    def fresh(self, base: str) -> str:
        """A name not used yet: base, else base_2, base_3, ..."""
        base = base or "v"
        name, i = base, self._next.get(base, 1)
        while name in self.taken:
            i += 1
            name = f"{base}_{i}"
        self._next[base] = i
        self.taken.add(name)
        return name

    def name(self, v) -> str:
        """The ONNX name of a graph value (an input, a node's output or a parameter)."""
        if v.param is not None:
            return self.param(v.param)
        if id(v) not in self.names:
            raise AssertionError(f"value {v!r} used before it is made")
        return self.names[id(v)]

    def out_name(self, node, i: int) -> str:
        v = node.outputs[i]
        if id(v) not in self.names:
            self.names[id(v)] = self.fresh(node.path if len(node.outputs) == 1 else f"{node.path}:{i}")
        return self.names[id(v)]

    # ---- nodes and constants

    def add(self, op_type: str, inputs: list[str], outputs=1, node=None, **attrs) -> list[str]:
        """Append an ONNX node; `outputs` is a count (fresh names) or a list of names."""
        base = node.path if node is not None else op_type.lower()
        if isinstance(outputs, int):
            outputs = [self.fresh(f"{base}/{op_type}") for _ in range(outputs)]
        self.nodes.append(self.helper.make_node(op_type, list(inputs), list(outputs),
                                                name=self.fresh(f"{base}/{op_type}#"), **attrs))
        return outputs

    def one(self, op_type: str, inputs: list[str], node=None, **attrs) -> str:
        return self.add(op_type, inputs, 1, node, **attrs)[0]

    def const(self, value, dtype=None, base: str = "const") -> str:
        """An initializer holding `value` (made once per value and dtype)."""
        a = np.asarray(value, dtype=dtype)
        key = ("const", a.dtype.str, a.shape, a.tobytes())
        if key not in self.cache:
            self.cache[key] = self.init(self.fresh(base), a)
        return self.cache[key]

    def ints(self, values) -> str:
        return self.const(np.asarray(list(values), dtype=np.int64), base="ints")

    def param(self, path: str, transform=None, suffix: str = "") -> str:
        """A parameter as an initializer under its path (transformed, under path+suffix)."""
        name = path + suffix
        if name not in self.inits:
            a = self.params[path]
            self.init(name, transform(a) if transform is not None else a)
        return name

    def init(self, name: str, a: np.ndarray) -> str:
        """Register an initializer (asarray, not ascontiguousarray: that makes a 0-d array 1-d)."""
        self.inits[name] = np.asarray(a, order="C")
        self.taken.add(name)
        return name

    # ---- dimensions at run time

    def dim(self, d) -> str:
        """A dimension as an int64 [1] tensor: a constant, or computed from the inputs'
        shapes for a symbolic one (each term's symbols multiplied, the terms added).
        Computed in the main graph, where a Scan body sees it too, once."""
        if isinstance(d, int):
            return self.ints([d])
        key = ("dim", str(d))
        if key in self.cache:
            return self.cache[key]
        here, self.nodes = self.nodes, self.root
        try:
            return self._dim(d, key)
        finally:
            self.nodes = here

    def _dim(self, d, key) -> str:
        total = None
        for mono, coef in sorted(d.terms.items()):
            term = self.ints([coef]) if coef != 1 or not mono else None
            for s in mono:
                if s not in self.dims:
                    raise NetdslError(f"cannot export: the dimension {d} needs '{s}', which no exported input has",
                                      self.g.pos, hint=f"fix it with --set {s}=VALUE" if s.isidentifier() else None)
                src, axis = self.dims[s]
                sk = ("sym", s)
                if sk not in self.cache:
                    self.cache[sk] = self.one("Shape", [src], start=axis, end=axis + 1)
                term = self.cache[sk] if term is None else self.one("Mul", [term, self.cache[sk]])
            total = term if total is None else self.one("Add", [total, term])
        self.cache[key] = total
        return total

    def shape(self, dims) -> str:
        """A whole shape as an int64 [rank] tensor."""
        if all(isinstance(d, int) for d in dims):
            return self.ints(dims)
        return self.one("Concat", [self.dim(d) for d in dims], axis=0)

    # ---- value types

    def value_info(self, name: str, v):
        elem = self.helper.np_dtype_to_tensor_dtype(np.dtype(np_dtype(v.dtype)))
        shape = [d if isinstance(d, int) else str(d) for d in v.shape]
        return self.helper.make_tensor_value_info(name, elem, shape)


def needed_nodes(nodes, keep) -> list:
    """The nodes that the values in `keep` depend on, in graph order."""
    need = needed_by(nodes, keep)
    return [n for n in nodes if id(n) in need]


def emit_nodes(ex: Exporter, nodes) -> None:
    from .onnx_ops import emit
    for n in nodes:
        for v in n.inputs:
            if v is not None:
                ex.consumers.setdefault(id(v), []).append(n)
    for n in nodes:
        emit(ex, n)


def _check_exportable(g, nodes, wanted) -> None:
    """The first operator with no ONNX rule is an error at its spec line; the hint names
    the outputs that do not need it, which --outputs can export alone."""
    from ..ir.graph import walk
    from .onnx_ops import RULES
    bad = next((n for n in walk(nodes) if n.op not in RULES), None)
    if bad is None:
        return
    ok = [o for o in wanted if all(n.op in RULES for n in walk(needed_nodes(g.nodes, [g.outputs[o]])))]
    raise NetdslError(f"cannot export operator '{bad.op}' ({bad.path}) to ONNX: it has no ONNX form here", bad.pos,
                      hint=f"--outputs {','.join(ok)} exports the outputs that do not need it" if ok else
                      "see docs/cli.md (ONNX export) for the operators that export")


def build_model(g, params: dict[str, np.ndarray], outputs: list[str] | None = None):
    """The ModelProto of g's inference graph for the named outputs (default: all)."""
    wanted = list(g.outputs) if not outputs else outputs
    for o in wanted:
        if o not in g.outputs:
            raise NetdslError(f"the network has no output '{o}'", g.pos, hint="outputs: " + ", ".join(g.outputs))
    keep = [g.outputs[o] for o in wanted]
    nodes = needed_nodes(g.nodes, keep)
    _check_exportable(g, nodes, wanted)
    missing = sorted(set(g.params) - set(params))
    if missing:
        raise NetdslError(f"no weights for {len(missing)} parameter(s) of {g.name}: {', '.join(missing[:5])}"
                          + (" ..." if len(missing) > 5 else ""), g.pos)
    ex = Exporter(g, {k: np.asarray(params[k], dtype=np_dtype(p.dtype)) for k, p in g.params.items()})
    used = {id(v) for n in nodes for v in n.inputs if v is not None} | {id(v) for v in keep}
    inputs = [(k, v) for k, v in g.inputs.items() if id(v) in used]
    for k, v in inputs:
        ex.names[id(v)] = k
        ex.taken.add(k)
        for axis, d in enumerate(v.shape):     # where each symbol can be read at run time
            if isinstance(d, Sym) and len(d.terms) == 1:
                (mono, coef), = d.terms.items()
                if coef == 1 and len(mono) == 1:
                    ex.dims.setdefault(mono[0], (k, axis))
    ex.taken.update(wanted)
    for o in wanted:    # a node's output that is an output of the network takes its name
        v = g.outputs[o]
        if v.producer is not None and id(v) not in ex.names:
            ex.names[id(v)] = o
    emit_nodes(ex, nodes)
    graph_outputs = []
    for o in wanted:
        v = g.outputs[o]
        src = ex.name(v)
        if src != o:
            ex.nodes.append(ex.helper.make_node("Identity", [src], [o], name=ex.fresh(f"{o}/Identity#")))
        graph_outputs.append(ex.value_info(o, v))
    graph = ex.helper.make_graph(ex.nodes, g.name, [ex.value_info(k, v) for k, v in inputs], graph_outputs,
                                 doc_string=f"netdsl network {g.name}, inference graph")
    model = ex.helper.make_model(graph, producer_name="netdsl", opset_imports=[ex.helper.make_opsetid("", OPSET)],
                                 doc_string=f"exported by netdsl from {g.pos.file if g.pos else g.name}")
    model.ir_version = IR_VERSION
    # the weights go straight into the model's graph: make_graph and make_model copy
    # every initializer they are given (seconds for VGG's half gigabyte)
    for name, a in ex.inits.items():
        t = model.graph.initializer.add()
        t.name, t.data_type = name, ex.helper.np_dtype_to_tensor_dtype(a.dtype)
        t.dims.extend(a.shape)
        t.raw_data = np.asarray(a, dtype=a.dtype.newbyteorder("<")).tobytes()    # ONNX's raw data is little-endian
    return model


def export_onnx(g, params: dict[str, np.ndarray], path, outputs: list[str] | None = None):
    """Write g's inference graph with `params` to `path`, atomically, after
    onnx.checker accepts it. Returns the model."""
    from ..runtime.checkpoint import atomic_write
    onnx = require_onnx()
    nbytes = sum(int(np.asarray(params[p]).nbytes) for p in g.params if p in params)
    if nbytes > _BIG:
        raise NetdslError(f"{g.name}'s parameters take {nbytes / 2 ** 30:.1f} GiB, more than one ONNX file holds "
                          "(2 GiB, protobuf's limit)", g.pos)
    model = build_model(g, params, outputs)
    blob = model.SerializeToString()     # once: the checker reads these bytes too
    try:
        onnx.checker.check_model(blob)
    except onnx.checker.ValidationError as e:   # a bug in the rules, not the user's: say what ONNX said
        raise RuntimeError(f"the exported ONNX graph of {g.name} does not check: {e}") from None
    atomic_write(os.fspath(path), lambda f: f.write(blob))
    return model
