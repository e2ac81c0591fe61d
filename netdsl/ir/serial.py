"""The graph IR as plain JSON data, for the graph cache: a format that cannot run code.

`encode(g)` gives a dict of JSON types; `decode(d)` rebuilds the graph and checks the
type of every field and the range of every reference as it goes, so a damaged or
hostile document raises `Invalid` and never yields a graph of the wrong types.

Objects shared by reference stay shared: values, parameters, frames and nodes are
kept in tables and referred to by index (a value feeds several nodes; nodes of one
block share its frames; a scan's body reads values of the enclosing graph). Other
attribute values are JSON, with tuples, dicts, dims, positions and train-section
calls tagged as one-key objects: {"t": [...]}, {"d": [[k, v], ...]}, {"s": terms},
{"p": pos}, {"c": call}, {"v": value}.
"""
from __future__ import annotations

import dataclasses

from ..errors import Pos
from .dims import Sym, _norm
from .graph import Carry, Frame, Graph, Loss, Node, Param, Value

FORMAT = 1


class Invalid(ValueError):
    """The document is not a graph this module wrote."""


class Unencodable(TypeError):
    """The graph holds a value this format has no form for (the graph is then not cached)."""


def _train_call():
    from ..lang.training import TrainCall   # no parser behind it: training.py imports errors only
    return TrainCall


# ------------------------------------------------------------------ encoding

class _Encoder:
    def __init__(self):
        self.files: dict[str, int] = {}
        self.pos: dict[Pos, int] = {}
        self.frames: dict[int, int] = {}
        self.values: dict[int, int] = {}
        self.params: dict[int, int] = {}
        self.nodes: dict[int, int] = {}
        self.out = {"format": FORMAT, "files": [], "pos": [], "frames": [], "values": [], "params": [],
                    "nodes": []}

    def p(self, pos):
        if pos is None:
            return None
        i = self.pos.get(pos)
        if i is None:
            f = self.files.setdefault(pos.file, len(self.files))
            if f == len(self.out["files"]):
                self.out["files"].append(pos.file)
            i = self.pos[pos] = len(self.out["pos"])
            self.out["pos"].append([f, pos.line, pos.col, pos.end_line, pos.end_col])
        return i

    def dim(self, d):
        if isinstance(d, Sym):
            return {"s": [[list(m), c] for m, c in d.terms.items()]}
        if isinstance(d, int) and not isinstance(d, bool):
            return d
        raise Unencodable(f"not a dimension: {d!r}")

    def any(self, v):
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, list):
            return [self.any(x) for x in v]
        if isinstance(v, tuple):
            return {"t": [self.any(x) for x in v]}
        if isinstance(v, dict):
            return {"d": [[self.any(k), self.any(x)] for k, x in v.items()]}
        if isinstance(v, Sym):
            return self.dim(v)
        if isinstance(v, Pos):
            return {"p": self.p(v)}
        if isinstance(v, Value):
            return {"v": self.value(v)}
        if type(v) is _train_call():
            return {"c": {f.name: self.any(getattr(v, f.name)) for f in dataclasses.fields(v)}}
        raise Unencodable(f"cannot store {type(v).__name__} {v!r}")

    def frame(self, f: Frame) -> int:
        i = self.frames.get(id(f))
        if i is None:
            i = self.frames[id(f)] = len(self.out["frames"])
            self.out["frames"].append([f.scope, f.kind, f.callee, self.p(f.pos), self.any(f.repeat_key)])
        return i

    def value(self, v: Value) -> int:
        i = self.values.get(id(v))
        if i is None:
            i = self.values[id(v)] = len(self.out["values"])
            rec = [[self.dim(d) for d in v.shape], v.dtype, None, v.index, v.name, self.p(v.pos), v.param]
            self.out["values"].append(rec)
            if v.producer is not None:
                rec[2] = self.node_ref(v.producer)
        return i

    def node_ref(self, n: Node) -> int:
        i = self.nodes.get(id(n))
        if i is None:
            raise Unencodable(f"{n!r} is referred to but is in no graph")
        return i

    def param(self, p: Param) -> int:
        i = self.params.get(id(p))
        if i is None:
            i = self.params[id(p)] = len(self.out["params"])
            rec = [p.name, [self.dim(d) for d in p.shape], p.dtype, p.init, None, p.role, None]
            self.out["params"].append(rec)
            if p.node is not None:
                rec[4] = self.node_ref(p.node)
            if p._value is not None:
                rec[6] = self.value(p._value)
        return i

    def number_nodes(self, g: Graph):
        """Every node gets its index first, so references to nodes can be written in any order."""
        for n in g.nodes:
            if n.body is not None:
                self.number_nodes(n.body)
            if id(n) in self.nodes:
                raise Unencodable(f"{n!r} is in two graphs")
            self.nodes[id(n)] = len(self.nodes)
            self.out["nodes"].append(None)

    def node(self, n: Node):
        self.out["nodes"][self.nodes[id(n)]] = [
            n.op, [self.value(v) for v in n.inputs], self.any(n.attrs), n.path, self.p(n.pos),
            [self.frame(f) for f in n.frames], [self.value(v) for v in n.outputs],
            [[r, self.param(p)] for r, p in n.params.items()], self.dim(n.macs),
            None if n.body is None else self.graph(n.body),
            None if n.fwd is None else self.node_ref(n.fwd)]

    def graph(self, g: Graph) -> dict:
        for n in g.nodes:
            self.node(n)
        return {
            "name": g.name,
            "inputs": [[k, self.value(v)] for k, v in g.inputs.items()],
            "outputs": [[k, self.value(v)] for k, v in g.outputs.items()],
            "losses": [[l.name, self.value(l.value), l.weight, l.phase, self.p(l.pos)] for l in g.losses],
            "nodes": [self.nodes[id(n)] for n in g.nodes],
            "params": [self.param(p) for p in g.params.values()],
            "carries": [[c.name] + [None if v is None else self.value(v)
                                    for v in (c.init, c.step_in, c.step_out, c.final)] for c in g.carries],
            "train": self.any(g.train),
            "train_pos": [[k, self.p(p)] for k, p in g.train_pos.items()],
            "symbols": [[k, self.p(p)] for k, p in g.symbols.items()],
            "args": self.any(g.args),
            "pos": self.p(g.pos),
        }


def encode(g: Graph) -> dict:
    """The graph as JSON data; raises Unencodable for a value the format cannot hold."""
    e = _Encoder()
    e.number_nodes(g)
    e.out["graph"] = e.graph(g)
    return e.out


# ------------------------------------------------------------------ decoding

def _check(ok: bool, what: str):
    if not ok:
        raise Invalid(what)


def _int(x) -> int:
    _check(type(x) is int, "not an integer")
    return x


def _str(x) -> str:
    _check(type(x) is str, "not a string")
    return x


def _opt_str(x):
    return None if x is None else _str(x)


def _list(x, n: int | None = None) -> list:
    _check(type(x) is list and (n is None or len(x) == n), "not a list of the right length")
    return x


def _number(x):
    _check(type(x) in (int, float), "not a number")
    return x


_SCALARS = frozenset((type(None), bool, int, float, str))


class _Decoder:
    def __init__(self, d):
        _check(type(d) is dict and d.get("format") == FORMAT, "not a graph document of this format")
        self.d = d
        self.files = [_str(f) for f in _list(d["files"])]
        self.pos = [self._pos(r) for r in _list(d["pos"])]
        self.values: list[Value] = []
        for r in _list(d["values"]):
            shape, dtype, _, index, name, pos, param = _list(r, 7)
            self.values.append(Value(self.shape(shape), _str(dtype), None, _int(index), _str(name),
                                     self.p(pos), _opt_str(param)))
        self.frames = []
        for r in _list(d["frames"]):
            scope, kind, callee, pos, key = _list(r, 5)
            self.frames.append(Frame(_str(scope), _str(kind), _str(callee), self.p(pos), self.any(key)))
        self.params = []
        for r in _list(d["params"]):
            name, shape, dtype, init, _, role, value = _list(r, 7)
            self.params.append(Param(_str(name), self.shape(shape), _str(dtype), _str(init), None, _str(role),
                                     None if value is None else self.value(value)))
        self.node_recs = _list(d["nodes"])
        self.nodes: list[Node] = []
        for i, r in enumerate(self.node_recs):
            self.nodes.append(self.node(i, r))
        # references to nodes, now that all exist
        for v, r in zip(self.values, d["values"]):
            if r[2] is not None:
                v.producer = self.node_ref(r[2])
                outs = v.producer.outputs
                _check(v.index < len(outs) and outs[v.index] is v, "a value its producer does not output")
        for p, r in zip(self.params, d["params"]):
            if r[4] is not None:
                p.node = self.node_ref(r[4])
        for n, r in zip(self.nodes, self.node_recs):
            if r[10] is not None:
                n.fwd = self.node_ref(r[10])
        self.graph = self.graph_of(d["graph"], len(self.nodes))

    def _pos(self, r) -> Pos:
        f, line, col, end_line, end_col = _list(r, 5)
        return Pos(self.files[self.idx(f, len(self.files))], _int(line), _int(col), _int(end_line), _int(end_col))

    @staticmethod
    def idx(i, n: int) -> int:
        _check(type(i) is int and 0 <= i < n, "a reference out of range")
        return i

    def p(self, i):
        return None if i is None else self.pos[self.idx(i, len(self.pos))]

    def value(self, i) -> Value:
        if type(i) is int and i >= 0:   # the common case, checked inline (a warm start decodes ~10^4 refs)
            try:
                return self.values[i]
            except IndexError:
                pass
        raise Invalid("a value reference out of range")

    def node_ref(self, i) -> Node:
        return self.nodes[self.idx(i, len(self.nodes))]

    def dim(self, x):
        if type(x) is int:
            return x
        _check(type(x) is dict and list(x) == ["s"], "not a dimension")
        terms = {}
        for m, c in _list(x["s"]):
            terms[tuple(_str(s) for s in _list(m))] = _int(c)
        return _norm(terms)

    def shape(self, x) -> tuple:
        return tuple(self.dim(d) for d in _list(x))

    def any(self, x):
        t = type(x)
        if t in _SCALARS:
            return x
        if t is list:
            return [e if type(e) in _SCALARS else self.any(e) for e in x]
        _check(t is dict and len(x) == 1, "not a tagged value")
        (tag, v), = x.items()
        if tag == "t":
            return tuple(e if type(e) in _SCALARS else self.any(e) for e in _list(v))
        if tag == "d":
            out = {}
            for kv in _list(v):
                k, e = _list(kv, 2)
                k = self.any(k)
                _check(k is None or type(k) in (bool, int, float, str, tuple), "a dict key of the wrong type")
                out[k] = self.any(e)
            return out
        if tag == "s":
            return self.dim(x)
        if tag == "p":
            return self.pos[self.idx(v, len(self.pos))]
        if tag == "v":
            return self.value(v)
        if tag == "c":
            _check(type(v) is dict, "not a call")
            cls = _train_call()
            names = {f.name for f in dataclasses.fields(cls)}
            _check(set(v) <= names, "a call with unknown fields")
            fields = {k: self.any(e) for k, e in v.items()}
            _check(type(fields.get("name")) is str and type(fields.get("kwargs")) is dict, "a malformed call")
            return cls(**fields)
        raise Invalid(f"unknown tag {tag!r}")

    def node(self, i: int, r) -> Node:
        op, inputs, attrs, path, pos, frames, outputs, params, macs, body, _ = _list(r, 11)
        attrs = self.any(attrs)
        _check(type(attrs) is dict, "node attributes are not a dict")
        n = Node(_str(op), [self.value(v) for v in _list(inputs)], attrs, _str(path), self.p(pos),
                 tuple(self.frames[self.idx(f, len(self.frames))] for f in _list(frames)),
                 [self.value(v) for v in _list(outputs)],
                 {_str(k): self.params[self.idx(p, len(self.params))] for k, p in map(lambda e: _list(e, 2), _list(params))},
                 self.dim(macs))
        if body is not None:
            n.body = self.graph_of(body, i)     # a body's nodes come before its scan
        return n

    def graph_of(self, d, limit: int) -> Graph:
        _check(type(d) is dict, "not a graph")
        pairs = lambda k: [_list(e, 2) for e in _list(d[k])]
        g = Graph(_str(d["name"]), pos=self.p(d["pos"]))
        g.inputs = {_str(k): self.value(v) for k, v in pairs("inputs")}
        g.outputs = {_str(k): self.value(v) for k, v in pairs("outputs")}
        for r in _list(d["losses"]):
            name, v, weight, phase, pos = _list(r, 5)
            g.losses.append(Loss(_str(name), self.value(v), float(_number(weight)), _str(phase), self.p(pos)))
        g.nodes = [self.nodes[self.idx(i, limit)] for i in _list(d["nodes"])]
        for i in _list(d["params"]):
            p = self.params[self.idx(i, len(self.params))]
            g.params[p.name] = p
        for r in _list(d["carries"]):
            name, *vs = _list(r, 5)
            g.carries.append(Carry(_str(name), *(None if v is None else self.value(v) for v in vs)))
        for c in g.carries:
            _check(c.init is not None and c.step_in is not None, "a carry without its values")
        train, args = self.any(d["train"]), self.any(d["args"])
        _check(type(train) is dict and type(args) is dict, "train or args is not a dict")
        g.train, g.args = train, args
        g.train_pos = {_str(k): self.p(p) for k, p in pairs("train_pos")}
        g.symbols = {_str(k): self.p(p) for k, p in pairs("symbols")}
        return g


def decode(d) -> Graph:
    """The graph `encode` wrote; raises Invalid for anything else."""
    try:
        return _Decoder(d).graph
    except Invalid:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:   # a field missing or of the wrong shape
        raise Invalid(f"{type(e).__name__}: {e}") from None
