"""Expressions of the language: values a name can stand for, evaluation, calls, operators.

The statement side (elaborate.py) mixes this in; everything here evaluates one
expression in an environment and, for tensors, records nodes through the operator
registry.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from lark import Token, Tree

from ..errors import NetdslError, Pos, did_you_mean
from ..ir.dims import Sym, fmt_shape, is_dim
from ..ir.graph import Carry, Graph, Node, Param, Value
from ..ops import OPS, REQUIRED, Ctx, OpDef
from ..ops.elementwise import BINARY_SYMBOLS
from ..ops import registry
from ..ops.registry import check_attr
from . import limits, training
from .limits import MAX_EXPONENT, MAX_INT, MAX_LIST, MAX_STRING
from .parser import Module


def _show(v) -> str:
    """A value as messages show it, cut short: a value that hit a size limit can be huge."""
    s = registry._show(v)
    return s if len(s) <= 120 else s[:100] + " ... " + s[-15:]

# ---- things a name can stand for

@dataclass
class Def:
    kind: str            # block_def | step_def | network_def
    tree: Tree
    module: Module

    @property
    def name(self):
        return self.tree.children[0].value

    def __repr__(self):
        return f"{self.kind[:-4]} '{self.name}'"


@dataclass
class Namespace:
    module: Module

    def __repr__(self):
        return f"the module '{self.module.path}'"


@dataclass
class Builtin:
    name: str
    fn: object

    def __repr__(self):
        return f"the built-in '{self.name}'"


class ScanResult:
    """Per-step outputs of a scan, with the final carried states beside them."""

    def __init__(self, emits, finals):
        self.emits, self.finals = emits, finals

    def unwrap(self):
        return self.emits[0] if len(self.emits) == 1 else tuple(self.emits)

    def __repr__(self):
        return f"the result of a scan {self.unwrap()!r}"


class _Return(Exception):
    def __init__(self, value, pos=None):
        self.value, self.pos = value, pos


def _builtin_range(*a):
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in a) or not 1 <= len(a) <= 3:
        raise TypeError("range() takes 1 to 3 integers")
    r = range(*a)
    if len(r) > MAX_LIST:
        raise ValueError(f"{len(r)} items is more than the {MAX_LIST} a spec may use")
    return list(r)


BUILTINS = {
    "range": _builtin_range,
    "len": lambda x: len(x),
    "min": lambda *a: min(a[0] if len(a) == 1 else a),
    "max": lambda *a: max(a[0] if len(a) == 1 else a),
    "int": int, "float": float, "abs": abs,
    "sqrt": math.sqrt, "ceil": math.ceil, "floor": math.floor,
    "str": lambda v: v if isinstance(v, str) else registry._show(v),   # e.g. name="features." + str(i)
}


def _chain(env):
    while env is not None:
        yield env
        env = env.parent


class Env:
    def __init__(self, parent=None):
        self.vars: dict = {}
        self.parent = parent

    def lookup(self, name):
        e = self
        while e is not None:
            if name in e.vars:
                return e.vars[name]
            e = e.parent
        raise KeyError(name)

    def names(self):
        e, out = self, set()
        while e is not None:
            out |= set(e.vars)
            e = e.parent
        return out


class StepState:
    """What a step body is building: its graph, carries and emits."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.carries: list[tuple[str, Carry, Pos]] = []
        self.emits: list[tuple[Value, Pos]] = []


_MISSING = object()
_ESCAPE = re.compile(r'\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|.)', re.S)
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "0": "\0", "\\": "\\", '"': '"', "'": "'"}


def _unescape(body: str) -> str:
    """A string literal's text with its escapes (\\n \\t \\r \\0 \\\\ \\" \\xHH \\uHHHH \\UHHHHHHHH) decoded;
    anything else after a backslash is an error (ValueError)."""
    def one(m):
        e = m.group(1)
        if e in _ESCAPES:
            return _ESCAPES[e]
        if e[0] in "xuU" and len(e) > 1:
            c = int(e[1:], 16)
            if c > 0x10FFFF or 0xD800 <= c <= 0xDFFF:
                raise ValueError(f"\\{e} is not a character")
            return chr(c)
        raise ValueError(f"unknown escape '\\{e}'")
    return _ESCAPE.sub(one, body) if "\\" in body else body


def check_label(label, pos):
    """A name= value: a string that can be a path component (no control characters)."""
    if label is None:
        return None
    if not isinstance(label, str):
        raise NetdslError(f"name= must be a string, got {_show(label)}", pos)
    if any(ord(c) < 32 or ord(c) == 127 for c in label):
        raise NetdslError(f"name= '{label.encode('unicode_escape').decode()[:60]}' contains a control character "
                          f"(a newline, a tab...)", pos,
                          hint="names become parameter paths like layer1.0.conv1.weight")
    return label


def check_elements(shape, what: str, pos):
    """A tensor's fixed dimensions must multiply to at most limits.MAX_ELEMENTS (int64)."""
    n = 1
    for d in shape:
        if isinstance(d, int):
            n *= d
    if n > limits.MAX_ELEMENTS:
        raise NetdslError(f"{what} {fmt_shape(shape)} would have more than 2**63 elements", pos,
                          hint="a dimension is far larger than intended")


class _Sized:
    """Stands for a list or string of `n` items before it is built, for `checked`."""

    def __init__(self, kind, n):
        self.kind, self.n = kind, n


def _terms_of(v):
    return v.terms if isinstance(v, Sym) else (1,)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _sig(v):
    if isinstance(v, Value):
        return ("tensor", tuple(str(d) for d in v.shape))
    if isinstance(v, (list, tuple)):
        return tuple(_sig(x) for x in v)
    return v if isinstance(v, (int, float, str, bool, type(None))) else str(v)


class Expressions:
    """Expression evaluation; expects the host to provide pos, fresh, claim, scope_path,
    frames, graph, target, symvals, call_block and run_scan."""
    # ------------------------------------------------------------ expressions
    def resolve(self, n: str, env: Env):
        """What a name stands for: the scope's own names (a block's parameters and locals,
        then its file's definitions), operators, built-ins, the parameters of the network
        being elaborated, symbolic dimensions; _MISSING if none."""
        try:
            return env.lookup(n)
        except KeyError:
            pass
        if n in OPS:
            return OPS[n]
        if n in BUILTINS:
            return Builtin(n, BUILTINS[n])
        if n in self.net_params:
            return self.net_params[n]
        if n in self.symvals:
            return self.symvals[n]
        return _MISSING

    def lookup(self, tok: Token, env: Env, mod: Module):
        v = self.resolve(tok.value, env)
        if v is _MISSING:
            n = tok.value
            cands = env.names() | set(OPS) | set(BUILTINS) | set(self.net_params)
            hint = did_you_mean(n, cands)
            if hint is None and n in self.net_locals:
                hint = (f"'{n}' is a variable of network '{self.graph.name}': blocks see the network's "
                        f"parameters, not its variables; pass it to the block as an argument")
            raise NetdslError(f"unknown name '{n}'", self.pos(tok, mod), hint=hint)
        return v

    def callee(self, t, env: Env, mod: Module):
        """The function of a call or a pipeline stage; an unknown name there is an unknown
        operator or block, with the closest ones in scope as the hint."""
        if isinstance(t, Tree) and t.data == "name":
            tok = t.children[0]
            v = self.resolve(tok.value, env)
            if v is _MISSING:
                defs = {n for e in _chain(env) for n, d in e.vars.items() if isinstance(d, Def)}
                raise NetdslError(f"unknown operator or block '{tok.value}'", self.pos(tok, mod),
                                  hint=did_you_mean(tok.value, set(OPS) | set(BUILTINS) | defs) or
                                  "`netdsl ops` lists the operators")
            return v
        return self.eval(t, env, mod)

    # ------------------------------------------------------------ limits
    def checked(self, v, pos):
        """`v` if it is within the limits on compile-time values (netdsl/lang/limits.py)."""
        t = type(v)
        if t is int:
            if -MAX_INT <= v <= MAX_INT:
                return v
            raise NetdslError(f"an integer of {len(str(abs(v)))} digits is too large", pos,
                              hint=f"compile-time integers are 64-bit (at most {MAX_INT:,})")
        if t is float:
            if math.isfinite(v):
                return v
            raise NetdslError(f"the result is {v}, not a finite number", pos)
        if t is str:
            if len(v) > MAX_STRING:
                raise NetdslError(f"a string of {len(v):,} characters is longer than the {MAX_STRING:,} "
                                  f"a spec may build", pos)
        elif t is list or t is tuple:
            if len(v) > MAX_LIST:
                raise NetdslError(f"a list of {len(v):,} items is longer than the {MAX_LIST:,} a spec may build", pos)
        elif t is _Sized:
            limit, what = (MAX_STRING, "string") if v.kind is str else (MAX_LIST, "list")
            if v.n > limit:
                raise NetdslError(f"this {what} would have {v.n:,} {'characters' if v.kind is str else 'items'}, "
                                  f"more than the {limit:,} a spec may build", pos,
                                  hint=f"a {what} grows in a loop far more than intended")
        elif t is Sym:
            if len(v.terms) > limits.MAX_DIM_TERMS or any(len(m) > limits.MAX_DIM_DEGREE for m in v.terms):
                raise NetdslError(f"a symbolic dimension grows too large ({len(v.terms)} terms, degree "
                                  f"{max(len(m) for m in v.terms)})", pos,
                                  hint=f"limits: {limits.MAX_DIM_TERMS} terms of degree {limits.MAX_DIM_DEGREE}")
            if any(not -MAX_INT <= c <= MAX_INT for c in v.terms.values()):
                raise NetdslError(f"a coefficient of the symbolic dimension is too large", pos,
                                  hint=f"compile-time integers are 64-bit (at most {MAX_INT:,})")
            if sum(len(x) for m in v.terms for x in m) > limits.MAX_DIM_TEXT:
                raise NetdslError(f"a symbolic dimension's expression is longer than {limits.MAX_DIM_TEXT:,} "
                                  f"characters", pos)
        return v

    def grow(self, n: int, pos):
        """Count `n` items or characters built toward the total a spec may build."""
        self.work += n
        if self.work > limits.MAX_WORK:
            raise NetdslError(f"the spec builds more than {limits.MAX_WORK:,} list items and string "
                              f"characters in all", pos, hint="a list or string grows in a loop far more than intended")

    def eval(self, t, env: Env, mod: Module, train: bool = False):
        if isinstance(t, Token):
            return self.lookup(t, env, mod)
        fn = getattr(self, "ex_" + t.data)
        return (fn(t, env, mod, train) if t.data in ("call", "pipe", "if_expr", "list", "tuple")
                else fn(t, env, mod))

    def ex_name(self, t, env, mod):
        return self.lookup(t.children[0], env, mod)

    def ex_number(self, t, env, mod):
        s = t.children[0].value
        if any(c in s for c in ".eE"):
            return self.checked(float(s), self.pos(t, mod))
        if len(s) > 19:   # past 64 bits: say so before Python's own limit on digits is reached
            raise NetdslError(f"the number {s[:20]}{'...' if len(s) > 20 else ''} ({len(s)} digits) is too large",
                              self.pos(t, mod), hint=f"compile-time integers are 64-bit (at most {MAX_INT:,})")
        return self.checked(int(s), self.pos(t, mod))

    def ex_string(self, t, env, mod):
        try:
            v = _unescape(t.children[0].value[1:-1])
        except ValueError as e:
            raise NetdslError(f"in this string: {e}", self.pos(t, mod),
                              hint='escapes: \\n \\t \\r \\0 \\\\ \\" \\xHH \\uHHHH \\UHHHHHHHH') from None
        self.grow(len(v), self.pos(t, mod))
        return self.checked(v, self.pos(t, mod))

    def ex_true(self, t, env, mod):
        return True

    def ex_false(self, t, env, mod):
        return False

    def ex_none(self, t, env, mod):
        return None

    def ex_tuple(self, t, env, mod, train=False):
        self.checked(_Sized(tuple, len(t.children)), self.pos(t, mod))
        self.grow(len(t.children), self.pos(t, mod))
        return tuple(self.eval(c, env, mod, train) for c in t.children if c is not None)

    def ex_list(self, t, env, mod, train=False):   # train: e.g. augment = [crop(pad = 4), flip]
        self.checked(_Sized(list, len(t.children)), self.pos(t, mod))
        self.grow(len(t.children), self.pos(t, mod))
        return [self.eval(c, env, mod, train) for c in t.children if c is not None]

    def ex_if_expr(self, t, env, mod, train=False):
        # `train` passes through so a train setting can choose, e.g. bptt = if f { full } else { truncated(...) }
        ch = t.children
        for i in range(0, len(ch) - 1, 2):
            if self.cond(ch[i], env, mod):
                return self.eval(ch[i + 1], env, mod, train)
        return self.eval(ch[-1], env, mod, train)

    def ex_or_(self, t, env, mod):
        return self.cond(t.children[0], env, mod) or self.cond(t.children[1], env, mod)

    def ex_and_(self, t, env, mod):
        return self.cond(t.children[0], env, mod) and self.cond(t.children[1], env, mod)

    def ex_not_(self, t, env, mod):
        return not self.cond(t.children[0], env, mod)

    def ex_compare(self, t, env, mod):
        a, op, b = t.children
        x, y = self.eval(a, env, mod), self.eval(b, env, mod)
        if isinstance(x, Value) or isinstance(y, Value):
            raise NetdslError("tensors cannot be compared at compile time", self.pos(t, mod),
                              hint="compare shapes instead, e.g. x.C != c")
        if op.value in ("==", "!="):
            eq = x == y
            return eq if op.value == "==" else not eq
        if isinstance(x, Sym) or isinstance(y, Sym):
            raise NetdslError(f"cannot order symbolic dimensions ({x} {op.value} {y})", self.pos(t, mod),
                              hint="give the dimension a value with --set")
        try:
            return {"<": x < y, ">": x > y, "<=": x <= y, ">=": x >= y}[op.value]
        except TypeError:
            raise NetdslError(f"cannot compare {_show(x)} with {_show(y)}", self.pos(t, mod)) from None

    def ex_unary(self, t, env, mod):
        op, a = t.children
        v = self.eval(a, env, mod)
        if isinstance(v, Value):
            return v if op.value == "+" else self.apply_op(OPS["neg"], [v], {}, self.pos(t, mod))
        if not _is_number(v):
            raise NetdslError(f"'{op.value}' needs a number, got {_show(v)}", self.pos(t, mod))
        return v if op.value == "+" else self.checked(-v, self.pos(t, mod))

    def ex_power(self, t, env, mod):
        a, b = (self.eval(c, env, mod) for c in t.children)
        if not (_is_number(a) and _is_number(b)):
            raise NetdslError(f"'**' needs numbers, got {_show(a)} and {_show(b)}", self.pos(t, mod))
        if isinstance(a, int) and isinstance(b, int) and abs(a) > 1 and b > 0 and \
                (b > MAX_EXPONENT or b * math.log2(abs(a)) > 64):   # known too large before computing it
            raise NetdslError(f"{a} ** {b} is too large to compute", self.pos(t, mod),
                              hint=f"compile-time integers are 64-bit (at most {MAX_INT:,})")
        try:
            v = a ** b
        except (OverflowError, ZeroDivisionError) as e:
            raise NetdslError(f"{_show(a)} ** {_show(b)}: {e}", self.pos(t, mod)) from None
        if isinstance(v, complex):
            raise NetdslError(f"{_show(a)} ** {_show(b)} has no real value", self.pos(t, mod))
        return self.checked(v, self.pos(t, mod))

    def ex_binop(self, t, env, mod):
        a, op, b = t.children
        x, y = self.eval(a, env, mod), self.eval(b, env, mod)
        pos = self.pos(t, mod)
        if isinstance(x, Value) or isinstance(y, Value):
            return self.tensor_arith(op.value, x, y, pos)
        if op.value == "+" and (isinstance(x, (list, tuple)) and isinstance(y, (list, tuple))
                                or isinstance(x, str) and isinstance(y, str)):
            # sized before it is built: a list doubled in a loop must stop here, not in MemoryError
            self.checked(_Sized(type(x), len(x) + len(y)), pos)
            self.grow(len(x) + len(y), pos)
            return x + y if type(x) is type(y) else type(x)(list(x) + list(y))
        if not ((_is_number(x) or isinstance(x, Sym)) and (_is_number(y) or isinstance(y, Sym))):
            raise NetdslError(f"'{op.value}' cannot combine {_show(x)} and {_show(y)}", pos)
        if op.value in ("//", "%", "/") and isinstance(y, (int, float)) and y == 0:
            raise NetdslError("division by zero", pos)
        if isinstance(x, Sym) or isinstance(y, Sym):   # the work of polynomial arithmetic, counted
            self.grow(len(_terms_of(x)) * len(_terms_of(y)), pos)
        try:
            if op.value == "+": v = x + y
            elif op.value == "-": v = x - y
            elif op.value == "*": v = x * y
            elif op.value == "//": v = x // y
            elif op.value == "%": v = x % y
            else:
                if isinstance(x, Sym) or isinstance(y, Sym):
                    raise NetdslError("use '//' to divide dimensions", pos)
                v = x / y
        except ZeroDivisionError:
            raise NetdslError("division by zero", pos) from None
        except OverflowError as e:
            raise NetdslError(f"'{op.value}': {e}", pos) from None
        except TypeError:
            raise NetdslError(f"'{op.value}' cannot combine {_show(x)} and {_show(y)}", pos) from None
        return self.checked(v, pos)

    def tensor_arith(self, op, x, y, pos):
        if isinstance(x, Value) and isinstance(y, Value):
            if op not in BINARY_SYMBOLS:
                raise NetdslError(f"'{op}' is not defined on tensors", pos)
            return self.apply_op(OPS[BINARY_SYMBOLS[op]], [x, y], {}, pos)
        t, n = (x, y) if isinstance(x, Value) else (y, x)
        if not _is_number(n):
            raise NetdslError(f"'{op}' cannot combine a tensor with {_show(n)}", pos)
        if op == "*":
            return self.apply_op(OPS["scale"], [t], {"factor": float(n)}, pos)
        if op == "/" and t is x:
            if n == 0:
                raise NetdslError("division by zero", pos)
            return self.apply_op(OPS["scale"], [t], {"factor": 1.0 / n}, pos)
        if op == "+":
            return self.apply_op(OPS["shift"], [t], {"amount": float(n)}, pos)
        if op == "-":
            if t is x:
                return self.apply_op(OPS["shift"], [t], {"amount": -float(n)}, pos)
            neg = self.apply_op(OPS["neg"], [t], {}, pos)
            return self.apply_op(OPS["shift"], [neg], {"amount": float(n)}, pos)
        raise NetdslError(f"'{op}' between a number and a tensor is not supported", pos)

    def ex_getattr(self, t, env, mod):
        obj, name = t.children
        v = self.eval(obj, env, mod)
        n = name.value
        if isinstance(v, Namespace):
            if n not in v.module.defs:
                raise NetdslError(f"'{v.module.path}' defines no '{n}'", self.pos(name, mod),
                                  hint=did_you_mean(n, v.module.defs))
            kind, tree = v.module.defs[n]
            return self.eval(tree.children[1], Env(), v.module) if kind == "const_def" else Def(kind, tree, v.module)
        if isinstance(v, Value):
            return self.tensor_attr(v, n, self.pos(name, mod))
        raise NetdslError(f"{_show(v)} has no attribute '{n}'", self.pos(name, mod))

    def tensor_attr(self, v: Value, n: str, pos):
        r = v.rank
        axes = {"N": 0 if r >= 1 else None, "C": 1 if r >= 2 else None, "H": 2 if r == 4 else None,
                "W": 3 if r == 4 else None, "T": 1 if r == 3 else None, "F": r - 1 if r in (2, 3) else None}
        if n == "shape":
            return tuple(v.shape)
        if n == "rank":
            return r
        if n == "dtype":
            return v.dtype
        if n in axes:
            if axes[n] is None:
                raise NetdslError(f"a tensor of rank {r} {fmt_shape(v.shape)} has no axis '{n}'", pos,
                                  hint="N C H W name the axes of rank-4 tensors; N T F of rank 3; N F of rank 2")
            return v.shape[axes[n]]
        raise NetdslError(f"tensors have no attribute '{n}'", pos,
                          hint=did_you_mean(n, list(axes) + ["shape", "rank", "dtype"]))

    def ex_getitem(self, t, env, mod):
        obj, *subs = t.children
        v = self.eval(obj, env, mod)
        pos = self.pos(t, mod)
        idx = []
        for s in subs:
            if isinstance(s, Tree) and s.data == "slice":
                lo, hi = (None if c is None else self.eval(c, env, mod) for c in s.children)
                idx.append((lo, hi))
            else:
                idx.append(self.eval(s, env, mod))
        if isinstance(v, Value):
            for i in idx:
                parts = i if isinstance(i, tuple) else (i,)
                if not all(p is None or is_dim(p) for p in parts):
                    raise NetdslError(f"tensor indices must be integers, got {_show(i)}", pos)
            return self.apply_op(OPS["slice"], [v], {"index": tuple(idx)}, pos)
        if isinstance(v, (list, tuple)):
            if len(idx) != 1:
                raise NetdslError("a list takes one index", pos)
            i = idx[0]
            if isinstance(i, tuple):
                return v[slice(*i)]
            if not isinstance(i, int) or isinstance(i, bool):
                raise NetdslError(f"a list index must be an integer, got {_show(i)}", pos)
            if not -len(v) <= i < len(v):
                raise NetdslError(f"index {i} is out of range for a list of {len(v)}", pos)
            return v[i]
        raise NetdslError(f"{_show(v)} cannot be indexed", pos)

    def ex_pipe(self, t, env, mod, train=False):
        # a chain a -> f -> g nests to the left; walk it in a loop, not by recursion,
        # so that long chains cannot exhaust Python's stack
        stages = []
        while isinstance(t, Tree) and t.data == "pipe":
            t, stage = t.children
            stages.append((t, stage))
        v = self.eval(t, env, mod)
        for left, stage in reversed(stages):
            if isinstance(v, ScanResult):
                v = v.unwrap()
            if isinstance(stage, Tree) and stage.data == "call":
                v = self.ex_call(stage, env, mod, train, first=v)
            else:
                callee = self.callee(stage, env, mod)
                v = self.call(callee, [v], {}, self.pos(stage, mod), mod, argpos=[self.pos(left, mod)])
        return v

    def ex_call(self, t, env, mod, train=False, first=None):
        fn, args = t.children
        if train and isinstance(fn, Tree) and fn.data == "name" and fn.children[0].value not in env.names():
            callee = Builtin(fn.children[0].value, None)
        else:
            callee = self.callee(fn, env, mod)
        pos_args = [] if first is None else [first]
        argpos = [] if first is None else [self.pos(t, mod)]
        kwargs, kwpos = {}, {}
        for a in (args.children if args is not None else []):
            if isinstance(a, Tree) and a.data == "kwarg":
                k = a.children[0].value
                if k in kwargs:
                    raise NetdslError(f"argument '{k}' given twice", self.pos(a, mod))
                kwargs[k] = self.eval(a.children[1], env, mod, train)
                kwpos[k] = self.pos(a, mod)
            else:
                if kwargs:
                    raise NetdslError("a positional argument cannot follow keyword arguments", self.pos(a, mod))
                v = self.eval(a, env, mod, train)
                pos_args.append(v.unwrap() if isinstance(v, ScanResult) else v)
                argpos.append(self.pos(a, mod))
        if train and isinstance(callee, Builtin) and callee.fn is None:
            if pos_args:
                raise NetdslError(f"{callee.name}() takes keyword arguments only", self.pos(t, mod))
            return training.TrainCall(callee.name, kwargs, self.pos(t, mod), kwpos)
        return self.call(callee, pos_args, kwargs, self.pos(t, mod), mod, kwpos, argpos)

    def call(self, callee, args, kwargs, pos, mod, kwpos=None, argpos=None):
        if isinstance(callee, OpDef):
            return self.apply_op(callee, args, kwargs, pos, kwpos, argpos)
        if isinstance(callee, Def):
            if callee.kind == "block_def":
                return self.call_block(callee, args, kwargs, pos, kwpos)
            if callee.kind == "step_def":
                raise NetdslError(f"'{callee.name}' is a step: it runs once per time step, over a sequence",
                                  pos, hint=f"write `scan {callee.name}(...)`")
            raise NetdslError(f"'{callee.name}' is a network and cannot be called; "
                              f"put the shared layers in a block", pos)
        if isinstance(callee, Builtin) and callee.fn is not None:
            if kwargs:
                raise NetdslError(f"{callee.name}() takes no keyword arguments", pos)
            try:
                v = callee.fn(*args)
            except (TypeError, ValueError, OverflowError) as e:
                raise NetdslError(f"{callee.name}(): {e}", pos) from None
            if isinstance(v, (list, str)):
                self.grow(len(v), pos)
            return self.checked(v, pos)
        if isinstance(callee, Builtin):
            raise NetdslError(f"'{callee.name}' can only be used in the train section", pos)
        raise NetdslError(f"{_show(callee)} is not callable", pos)

    # ------------------------------------------------------------ operators
    def apply_op(self, op: OpDef, args, kwargs, pos, kwpos=None, argpos=None):
        kwargs = dict(kwargs)
        kwpos = dict(kwpos or {})
        argpos = list(argpos or [])
        label = check_label(kwargs.pop("name", None), kwpos.get("name", pos))
        ninputs = len(op.inputs)
        inputs: list = []
        rest = list(args)
        while rest and isinstance(rest[0], Value) and (op.variadic or len(inputs) < ninputs):
            inputs.append(rest.pop(0))
            argpos = argpos[1:]
        if op.variadic and rest and isinstance(rest[0], (list, tuple)) and not inputs:
            inputs = list(rest.pop(0))
            argpos = argpos[1:]
        for i, iname in enumerate(op.inputs):
            if iname in kwargs and not iname.startswith("*"):
                if i != len(inputs):
                    raise NetdslError(f"{op.name}: input '{iname}' given twice or out of order", pos)
                inputs.append(kwargs.pop(iname))
        required = 1 if op.variadic else ninputs - op.optional_inputs
        if len(inputs) < required and rest and not (len(op.attrs) >= len(rest) and inputs):
            # a value stands where the next tensor input belongs
            iname = op.inputs[min(len(inputs), ninputs - 1)].lstrip("*")
            raise NetdslError(f"{op.name}: input '{iname}' must be a tensor, got {_show(rest[0])}",
                              (argpos or [pos])[0])
        if len(inputs) < required:
            missing = op.inputs[len(inputs)].lstrip("*")
            got = f"got {len(inputs)}" if inputs else "got none"
            raise NetdslError(f"{op.name} needs {required} tensor input(s) ({', '.join(i.lstrip('*') for i in op.inputs[:required])}); "
                              f"{got}", pos, hint=f"missing '{missing}'" if inputs else
                              f"pass it first, or pipe it in: x -> {op.name}(...)")
        for i, v in enumerate(inputs):
            if not isinstance(v, Value):
                raise NetdslError(f"{op.name}: input {i + 1} must be a tensor, got {_show(v)}", pos)
        attrs = {}
        for i, (a, v) in enumerate(zip(op.attrs, rest)):
            attrs[a.name] = v
            if i < len(argpos):
                kwpos[a.name] = argpos[i]
        if len(rest) > len(op.attrs):
            extra = rest[len(op.attrs)]
            what = "tensor" if isinstance(extra, Value) else "value"
            where = argpos[len(op.attrs)] if len(argpos) > len(op.attrs) else pos
            raise NetdslError(f"{op.name} takes {ninputs} tensor input(s) and {len(op.attrs)} attribute(s); "
                              f"an extra {what} {_show(extra)} was given", where)
        names = [a.name for a in op.attrs]
        for k, v in kwargs.items():
            if k not in names:
                raise NetdslError(f"{op.name} has no attribute '{k}'", (kwpos or {}).get(k, pos),
                                  hint=did_you_mean(k, names + ["name"]) or
                                  (f"its attributes: {', '.join(names)}" if names else f"{op.name} takes no attributes"))
            if k in attrs:
                raise NetdslError(f"{op.name}: attribute '{k}' given twice", (kwpos or {}).get(k, pos))
            attrs[k] = v
        for a in op.attrs:
            if a.name not in attrs:
                if a.default is REQUIRED:
                    raise NetdslError(f"{op.name} needs the attribute '{a.name}'" + (f" ({a.doc})" if a.doc else ""), pos)
                attrs[a.name] = check_attr(op, a, a.default, pos)
            else:
                attrs[a.name] = check_attr(op, a, attrs[a.name], (kwpos or {}).get(a.name, pos))
        self.count_node(pos)
        local = label or self.fresh("op", op.name, 1)
        path = ".".join(p for p in (self.scope_path(), local) if p)
        self.claim(path, pos)
        ctx = Ctx(op, inputs, attrs, pos, path)
        outs = op.infer(ctx)
        node = Node(op.name, inputs, ctx.attrs, path, pos, tuple(self.frames))
        for i, (shape, dtype) in enumerate(outs):
            node.outputs.append(Value(tuple(shape), dtype, node, i, pos=pos))
        ctx.outputs = node.outputs
        for v in node.outputs:
            check_elements(v.shape, f"{op.name}'s output", pos)
        if op.params:
            for role, (shape, init, kind) in op.params(ctx).items():
                if not all(isinstance(d, int) for d in shape):
                    raise NetdslError(f"{op.name}: parameter '{role}' would have a symbolic shape "
                                      f"{fmt_shape(shape)}", pos, hint="fix the dimension with --set")
                check_elements(shape, f"{op.name}'s parameter '{role}'", pos)
                p = Param(f"{path}.{role}", tuple(shape), "f32", init, node, kind)
                node.params[role] = p
                self.graph.params[p.name] = p
        if op.macs:
            node.macs = op.macs(ctx)
        self.target.nodes.append(node)
        return node.outputs[0] if len(node.outputs) == 1 else tuple(node.outputs)
