"""Elaboration: run a network definition at compile time and record its graph.

Blocks are inlined (their path kept on every node), loops unrolled, conditionals on
compile-time values decided, parameters named by path, shapes inferred through each
operator's registry entry. Everything a user can get wrong raises NetdslError at the
position of the offending text.
"""
from __future__ import annotations

from lark import Tree

from ..errors import NetdslError, Note, Pos, did_you_mean
from ..ir.dims import Sym, fmt_shape, is_dim
from ..ir.graph import Carry, Frame, Graph, Loss, Node, Value
from . import limits, training
from .expressions import (Builtin, Def, Env, Expressions, Namespace, ScanResult, StepState, _Return,
                          _show, _sig, check_elements, check_label)
from .limits import MAX_DEPTH, MAX_ITERATIONS
from .parser import Loader, Module, pos_of

DTYPES = ("f16", "f32", "f64", "i32", "i64", "bool")


class Elaborator(Expressions):
    def __init__(self, loader: Loader, overrides: dict | None = None):
        self.loader = loader
        self.overrides = dict(overrides or {})
        self.graph: Graph | None = None
        self.frames: list[Frame] = []
        self.counters: dict[tuple[str, str], int] = {}
        self.used: dict[str, Pos | None] = {}
        self.steps: list[StepState] = []
        self.symvals: dict = {}
        self.output_pos: dict[str, Pos | None] = {}
        self.iterations = 0
        self.calls = 0            # block and step calls, nodes, and list items and characters
        self.nodes = 0            # built: each has a limit (limits.py)
        self.work = 0
        self.main: Module | None = None
        self.net_params: dict = {}   # the network's parameters: seen in blocks and steps too
        self.net_env: Env | None = None
        self.consts_set: set[str] = set()   # --set names that replaced a top-level const
        self._globals: dict[int, Env] = {}
        self.file = ""

    @property
    def net_locals(self):
        return self.net_env.vars if self.net_env is not None else {}

    # ------------------------------------------------------------ entry
    def network(self, mod: Module, name: str | None) -> Graph:
        nets = {n: d for n, d in mod.defs.items() if d[0] == "network_def"}
        def where(d):   # a definition's name
            return self.pos(d[1].children[0], mod)
        if not nets:
            first = next(iter(mod.defs.values()), None)
            raise NetdslError(f"'{mod.path}' defines no network",
                              self.pos(first[1], mod) if first else Pos(mod.path, 1, 1),
                              hint="a spec needs `network NAME(...) { ... }`")
        if name is None:
            if len(nets) > 1:
                first, *others = nets.values()
                raise NetdslError(f"'{mod.path}' defines several networks ({', '.join(nets)}); "
                                  f"choose one with --network", where(first),
                                  hint="e.g. --network " + next(iter(nets)),
                                  notes=[Note(f"network '{d[1].children[0].value}' is defined here", where(d))
                                         for d in others])
            name = next(iter(nets))
        if name not in nets:
            raise NetdslError(f"'{mod.path}' has no network '{name}'", where(next(iter(nets.values()))),
                              hint=did_you_mean(name, nets) or "networks: " + ", ".join(nets))
        tree = nets[name][1]
        self.file = mod.path
        self.main = mod
        g = self.graph = Graph(name, pos=pos_of(tree.children[0], mod.path))
        env = Env(self.globals(mod))
        self.bind_params(Def("network_def", tree, mod), env, [], {}, pos_of(tree, mod.path),
                         overrides=self.overrides)
        g.args = {k: v for k, v in env.vars.items()}
        self.net_params, self.net_env = dict(env.vars), env
        self.frames = [Frame("", "network", name, g.pos)]
        try:
            self.exec_body(tree.children[2], env, mod)
        except _Return as r:
            raise NetdslError("'return' belongs in a block", r.pos,
                              hint="a network names its results with `output NAME`") from None
        for k in self.overrides:
            if k not in self.consts_set:
                raise self._cannot_set(k, mod)
        if not g.outputs and not g.losses:
            raise NetdslError(f"network '{name}' has no output and no loss", g.pos,
                              hint="add `output NAME` or `loss NAME = ...`")
        if not g.train:
            g.train = training.defaults()
        return g

    def _cannot_set(self, k: str, mod: Module) -> NetdslError:
        """--set of a name that is none of the settable ones: say what it is, and what can be set."""
        g = self.graph
        consts = [n for n, (kind, _) in mod.defs.items() if kind == "const_def"]
        settable = list(g.args) + list(g.symbols) + consts
        why = ""
        if k in mod.defs:
            why = f"; '{k}' is a {mod.defs[k][0][:-4]}"
        elif any(t.data == "const_def" and t.children[0].value == k for t in mod.tree.iter_subtrees()):
            why = f"; '{k}' is a const inside a body, and only the file's top-level ones can be set"
        else:
            owner = next((m for m in self.loader.modules.values()
                          if m is not mod and m.defs.get(k, ("",))[0] == "const_def"), None)
            if owner is not None:
                why = f"; '{k}' is a const of '{owner.path}', and only the spec file's own can be set"
        can = "; ".join(f"{what} {', '.join(names)}" for what, names in
                        (("parameters", list(g.args)), ("dimensions", list(g.symbols)), ("constants", consts)) if names)
        return NetdslError(f"--set {k}: network '{g.name}' has no parameter, dimension or top-level const "
                           f"'{k}'{why}", g.pos,
                           hint=(did_you_mean(k, settable) or "") + (" " if did_you_mean(k, settable) else "") +
                           (f"--set can set: {can}" if can else "there is nothing in it to set"))

    def globals(self, mod: Module) -> Env:
        if id(mod) not in self._globals:
            self._globals[id(mod)] = self._make_globals(mod)
        return self._globals[id(mod)]

    def _make_globals(self, mod: Module) -> Env:
        env = Env()
        for alias, sub, _ in mod.imports:
            if alias:
                env.vars[alias] = Namespace(sub)
            else:
                for n, (kind, tree) in sub.defs.items():
                    if kind == "const_def":
                        env.vars[n] = self.eval(tree.children[1], Env(), sub)
                    else:
                        env.vars[n] = Def(kind, tree, sub)
        for n, (kind, tree) in mod.defs.items():
            if kind == "const_def" and mod is self.main and n in self.overrides:
                env.vars[n] = self.overrides[n]   # --set NAME=V of the spec file's top-level const
                self.consts_set.add(n)
            else:
                env.vars[n] = (self.eval(tree.children[1], Env(env), mod) if kind == "const_def"
                               else Def(kind, tree, mod))
        return env

    def count_node(self, pos):
        self.nodes += 1
        if self.nodes > limits.MAX_NODES:
            raise NetdslError(f"the network has more than {limits.MAX_NODES:,} operator nodes", pos,
                              hint="a loop or a recursive block makes far more layers than intended")

    def count_call(self, d: Def, pos):
        self.calls += 1
        if self.calls > limits.MAX_CALLS:
            raise NetdslError(f"blocks and steps are called more than {limits.MAX_CALLS:,} times in all "
                              f"(here '{d.name}')", pos, hint="a recursive block branches far more than intended")

    # ------------------------------------------------------------ helpers
    def pos(self, node, mod: Module) -> Pos | None:
        return pos_of(node, mod.path)

    @property
    def target(self) -> Graph:
        return self.steps[-1].graph if self.steps else self.graph

    def scope_path(self) -> str:
        return ".".join(f.scope for f in self.frames if f.scope)

    def fresh(self, kind: str, base: str, start: int) -> str:
        key = (self.scope_path(), kind + ":" + base)
        n = self.counters.get(key, start)
        self.counters[key] = n + 1
        return f"{base}{n}" if kind == "op" else str(n)

    def claim(self, path: str, pos):
        if path in self.used:
            raise NetdslError(f"the name '{path}' is already taken", pos,
                              notes=[Note("first used here", self.used[path])] if self.used[path] else [],
                              hint="give this layer or block a different name=")
        self.used[path] = pos

    # ------------------------------------------------------------ parameters of defs
    def bind_params(self, d: Def, env: Env, args, kwargs, pos, overrides=None, kwpos=None):
        """Bind call arguments to a definition's parameters (defaults may use earlier ones)."""
        params = d.tree.children[1]
        plist = params.children if params is not None else []
        names = [p.children[0].value for p in plist]
        kind = {"block_def": "block", "step_def": "step", "network_def": "network"}[d.kind]
        if len(args) > len(names):
            raise NetdslError(f"{kind} '{d.name}' takes {len(names)} argument(s) but {len(args)} were given",
                              pos, notes=[Note(f"'{d.name}' is defined here", self.pos(d.tree.children[0], d.module))])
        for k in kwargs:
            if k not in names:
                raise NetdslError(f"{kind} '{d.name}' has no parameter '{k}'", (kwpos or {}).get(k, pos),
                                  hint=did_you_mean(k, names) or f"its parameters: {', '.join(names) or 'none'}")
        seq = []
        for i, p in enumerate(plist):
            pname, ann, default = p.children
            if ann is not None:
                if ann.value != "seq" or kind != "step":
                    raise NetdslError(f"unknown parameter annotation '{ann.value}'" +
                                      ("" if kind == "step" else f"; annotations belong to steps"),
                                      self.pos(ann, d.module), hint="the only annotation is ': seq' in a step")
                seq.append(pname.value)
            if i < len(args):
                if pname.value in kwargs:
                    raise NetdslError(f"argument '{pname.value}' given twice", (kwpos or {}).get(pname.value, pos))
                v = args[i]
            elif pname.value in kwargs:
                v = kwargs[pname.value]
            elif overrides is not None and pname.value in overrides:
                v = overrides.pop(pname.value)
            elif default is not None:
                v = self.eval(default, env, d.module)
            else:
                raise NetdslError(f"{kind} '{d.name}' needs the argument '{pname.value}'", pos,
                                  notes=[Note(f"'{d.name}' is defined here", self.pos(d.tree.children[0], d.module))])
            env.vars[pname.value] = v
        return seq

    # ------------------------------------------------------------ statements
    def exec_body(self, body: Tree, env: Env, mod: Module):
        for st in body.children:
            self.exec_stmt(st, env, mod)

    def exec_stmt(self, st: Tree, env: Env, mod: Module):
        getattr(self, "st_" + st.data)(st, env, mod)

    def st_assign(self, st, env, mod):
        targets, expr = st.children
        names = [t.value for t in targets.children]
        v = self.eval(expr, env, mod)
        if isinstance(v, ScanResult):
            if len(names) == len(v.emits) + len(v.finals) and v.finals:
                v = tuple(v.emits) + tuple(v.finals)
            else:
                v = v.unwrap()
        if len(names) == 1:
            vals = [v]
        else:
            if not isinstance(v, (tuple, list)):
                raise NetdslError(f"cannot unpack one value into {len(names)} names", self.pos(st, mod))
            if len(v) != len(names):
                raise NetdslError(f"cannot unpack {len(v)} values into {len(names)} names", self.pos(st, mod))
            vals = list(v)
        for tok, val in zip(targets.children, vals):
            if isinstance(val, Value) and not val.name:
                val.name = tok.value
            env.vars[tok.value] = val

    def st_return_stmt(self, st, env, mod):
        vals = [self.eval(c, env, mod) for c in st.children]
        raise _Return(vals[0] if len(vals) == 1 else tuple(vals), self.pos(st, mod))

    def st_const_def(self, st, env, mod):
        env.vars[st.children[0].value] = self.eval(st.children[1], env, mod)

    def st_for_stmt(self, st, env, mod):
        loopvars, it, scope, body = st.children
        names = [t.value for t in loopvars.children]
        seq = self.eval(it, env, mod)
        if not isinstance(seq, (list, tuple)):
            raise NetdslError(f"a for loop needs a list to go over, got {_show(seq)}", self.pos(it, mod),
                              hint="use range(n) for a count")
        for i, item in enumerate(seq):
            if len(names) == 1:
                env.vars[names[0]] = item
            else:
                if not isinstance(item, (list, tuple)) or len(item) != len(names):
                    raise NetdslError(f"item {i + 1} of the list cannot be unpacked into "
                                      f"({', '.join(names)})", self.pos(it, mod))
                env.vars.update(zip(names, item))
            self._loop_iteration(scope, i, st, body, env, mod)

    def st_repeat_stmt(self, st, env, mod):
        count, scope, body = st.children
        n = self.eval(count, env, mod)
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise NetdslError(f"repeat needs a count of 0 or more, got {_show(n)}", self.pos(count, mod))
        if n > MAX_ITERATIONS:
            raise NetdslError(f"repeat {n} would unroll more than {MAX_ITERATIONS} copies", self.pos(count, mod))
        for i in range(n):
            self._loop_iteration(scope, i, st, body, env, mod)

    def _loop_iteration(self, scope, i, st, body, env, mod):
        self.iterations += 1
        if self.iterations > MAX_ITERATIONS:
            raise NetdslError(f"loops unroll more than {MAX_ITERATIONS} times in all", self.pos(st, mod),
                              hint="a loop count is far larger than intended")
        if scope is not None:
            # `as stage` names the iteration's path component, and is that name as a value
            env.vars[scope.value] = f"{scope.value}{i + 1}"
            self.frames.append(Frame(env.vars[scope.value], "loop", scope.value, self.pos(st, mod)))
        try:
            self.exec_body(body, env, mod)
        finally:
            if scope is not None:
                self.frames.pop()

    def st_if_stmt(self, st, env, mod):
        cond, body, *rest = st.children
        branches = [(cond, body)] + [(c.children[0], c.children[1]) for c in rest if c is not None and c.data == "elif_clause"]
        for c, b in branches:
            if self.cond(c, env, mod):
                return self.exec_body(b, env, mod)
        for c in rest:
            if c is not None and c.data == "else_clause":
                return self.exec_body(c.children[0], env, mod)

    def cond(self, c, env, mod) -> bool:
        v = self.eval(c, env, mod)
        if not isinstance(v, bool):
            raise NetdslError(f"a condition must be a compile-time true or false, got {_show(v)}",
                              self.pos(c, mod), hint="conditions decide the graph's structure; "
                              "they cannot depend on tensor values")
        return v

    def _network_only(self, st, mod, what):
        if any(f.kind in ("block", "step") for f in self.frames):
            raise NetdslError(f"'{what}' belongs in a network, not in a block or step", self.pos(st, mod),
                              hint=f"return values from the block and declare the {what} in the network")

    def st_input_stmt(self, st, env, mod):
        self._network_only(st, mod, "input")
        name, dtype, *dims = st.children
        if dtype.value not in DTYPES:
            raise NetdslError(f"unknown dtype '{dtype.value}'", self.pos(dtype, mod),
                              hint=did_you_mean(dtype.value, DTYPES) or "dtypes: " + ", ".join(DTYPES))
        shape = tuple(self.dim(d, env, mod) for d in dims if d is not None)
        if name.value in self.graph.inputs or name.value in env.vars:
            prev = self.graph.inputs.get(name.value)
            raise NetdslError(f"'{name.value}' is already defined", self.pos(name, mod),
                              notes=[Note("first defined here", prev.pos)] if prev is not None else [])
        check_elements(shape, f"input '{name.value}'", self.pos(st, mod))
        v = Value(shape, dtype.value, name=name.value, pos=self.pos(st, mod))
        self.graph.inputs[name.value] = v
        env.vars[name.value] = v

    def dim(self, d, env, mod):
        """A dimension in an input type: a number, an expression, or a capitalised symbol."""
        if d.data == "name":
            n = d.children[0].value
            try:
                v = env.lookup(n)
            except KeyError:
                if not n[0].isupper():
                    raise NetdslError(f"unknown name '{n}' in a shape", self.pos(d, mod),
                                      hint=did_you_mean(n, env.names()) or
                                      "symbolic dimensions are capitalised (N, T, R...)") from None
                v = self.overrides.pop(n) if n in self.overrides else Sym.var(n)
                self.graph.symbols.setdefault(n, self.pos(d, mod))
                self.symvals[n] = v
                env.vars[n] = v
            if is_dim(v):
                return v
        v = self.eval(d, env, mod)
        if not is_dim(v) or (isinstance(v, int) and v <= 0):
            raise NetdslError(f"a dimension must be a positive integer or a symbol, got {_show(v)}",
                              self.pos(d, mod))
        return v

    def st_output_stmt(self, st, env, mod):
        self._network_only(st, mod, "output")
        name, expr = st.children
        v = self.eval(expr, env, mod) if expr is not None else self.lookup(name, env, mod)
        self._add_output(name, v, mod)

    def st_output_many(self, st, env, mod):
        self._network_only(st, mod, "output")
        for name in st.children:
            self._add_output(name, self.lookup(name, env, mod), mod)

    def _add_output(self, name, v, mod):
        v = v.unwrap() if isinstance(v, ScanResult) else v
        if not isinstance(v, Value):
            raise NetdslError(f"output '{name.value}' must be a tensor, got {_show(v)}", self.pos(name, mod))
        if name.value in self.graph.outputs:
            raise NetdslError(f"output '{name.value}' is declared twice", self.pos(name, mod),
                              notes=[Note("first declared here", self.output_pos.get(name.value))])
        self.graph.outputs[name.value] = v
        self.output_pos[name.value] = self.pos(name, mod)

    def st_loss_stmt(self, st, env, mod):
        self._network_only(st, mod, "loss")
        name, expr, *mods = st.children
        v = self.eval(expr, env, mod)
        if not isinstance(v, Value) or v.shape != ():
            what = fmt_shape(v.shape) if isinstance(v, Value) else _show(v)
            raise NetdslError(f"loss '{name.value}' must be a scalar tensor, got {what}", self.pos(expr, mod),
                              hint="use a loss operator (cross_entropy, l2, smooth_l1, bce)")
        weight, phase = 1.0, "all"
        for m in mods:
            if m.data == "loss_weight":
                w = self.eval(m.children[0], env, mod)
                if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
                    raise NetdslError(f"a loss weight must be a non-negative number, got {_show(w)}",
                                      self.pos(m, mod))
                weight = float(w)
            else:
                phase = m.children[0].value
                if phase not in ("train", "all"):
                    raise NetdslError(f"unknown phase '{phase}'", self.pos(m.children[0], mod),
                                      hint="phases: train (only while training), all (the default)")
        prev = next((l for l in self.graph.losses if l.name == name.value), None)
        if prev is not None:
            raise NetdslError(f"loss '{name.value}' is declared twice", self.pos(name, mod),
                              notes=[Note("first declared here", prev.pos)])
        self.graph.losses.append(Loss(name.value, v, weight, phase, self.pos(st, mod)))
        env.vars[name.value] = v

    def st_train_stmt(self, st, env, mod):
        self._network_only(st, mod, "train")
        if self.graph.train:
            raise NetdslError("a network has one train section", self.pos(st, mod))
        tenv = Env(env)
        tenv.vars.update({n: Builtin(n, None) for n in training.train_env()})
        cfg = training.defaults()
        seen = {}
        for s in st.children:
            key, expr = s.children
            if key.value in seen:
                raise NetdslError(f"training setting '{key.value}' is given twice", self.pos(key, mod),
                                  notes=[Note("first given here", seen[key.value])])
            seen[key.value] = self.pos(key, mod)
            val = self.eval(expr, tenv, mod, train=True)
            if isinstance(val, Builtin):
                val = val.name
            elif isinstance(val, list):   # bare constructors in a list: augment = [crop(pad = 4), flip]
                val = [v.name if isinstance(v, Builtin) else v for v in val]
            cfg[key.value] = training.check_setting(key.value, val, self.pos(key, mod), self.pos(expr, mod))
            self.graph.train_pos[key.value] = self.pos(key, mod)
        self.graph.train = cfg

    def st_carry_stmt(self, st, env, mod):
        if not self.steps or len([f for f in self.frames if f.kind == "step"]) == 0:
            raise NetdslError("'carry' belongs in a step", self.pos(st, mod),
                              hint="declare the recurrence with `step name(x_t: seq, ...) { carry h = ... }`")
        state = self.steps[-1]
        for item in st.children:
            name, expr = item.children
            # the initial value is computed once, before the loop, in the enclosing graph
            saved = self.steps.pop()
            try:
                init = self.eval(expr, env, mod)
            finally:
                self.steps.append(saved)
            if not isinstance(init, Value):
                raise NetdslError(f"carry '{name.value}' needs a tensor as its initial value, got {_show(init)}",
                                  self.pos(expr, mod), hint="e.g. carry h = zeros([N, H])")
            inside = Value(init.shape, init.dtype, name=name.value, pos=self.pos(item, mod))
            path = ".".join(p for p in (self.scope_path(), name.value) if p)
            state.carries.append((name.value, Carry(path, init, inside), self.pos(item, mod)))
            env.vars[name.value] = inside

    def st_emit_stmt(self, st, env, mod):
        if not self.steps:
            raise NetdslError("'emit' belongs in a step", self.pos(st, mod))
        for name in st.children:
            v = self.lookup(name, env, mod)
            if not isinstance(v, Value):
                raise NetdslError(f"emit needs a tensor, '{name.value}' is {_show(v)}", self.pos(name, mod))
            self.steps[-1].emits.append((v, self.pos(name, mod)))

    def st_assert_stmt(self, st, env, mod):
        cond, msg = st.children
        if not self.cond(cond, env, mod):
            raise NetdslError("assertion failed" + (f": {msg.value[1:-1]}" if msg else ""), self.pos(st, mod))

    # ------------------------------------------------------------ blocks and steps
    def call_block(self, d: Def, args, kwargs, pos, kwpos=None):
        kwargs = dict(kwargs)
        label = check_label(kwargs.pop("name", None), (kwpos or {}).get("name", pos))
        self._check_depth(d, pos)
        self.count_call(d, pos)
        env = Env(self.globals(d.module))
        self.bind_params(d, env, args, kwargs, pos, kwpos=kwpos)
        key = (d.name, tuple(_sig(a) for a in args), tuple(sorted((k, _sig(v)) for k, v in kwargs.items())))
        self._check_recursion(d, key, pos)
        # name="" inlines the block without a path component of its own
        scope = label if label is not None else self.fresh("block", d.name, 0)
        if label:
            self.claim(".".join(p for p in (self.scope_path(), label) if p), pos)
        self.frames.append(Frame(scope, "block", d.name, pos, key))
        try:
            self.exec_body(d.tree.children[2], env, d.module)
        except _Return as r:
            return r.value
        finally:
            self.frames.pop()
        return None

    def _check_depth(self, d: Def, pos):
        if len(self.frames) > MAX_DEPTH:
            raise NetdslError(f"blocks and steps nest more than {MAX_DEPTH} deep; is '{d.name}' calling itself?", pos)

    def _check_recursion(self, d: Def, key, pos):
        """A block entered again with the same arguments would unfold forever."""
        for f in self.frames:
            if f.kind == "block" and f.repeat_key == key:
                raise NetdslError(f"block '{d.name}' calls itself with the same arguments, so it would never end",
                                  pos, notes=[Note(f"'{d.name}' was called from here", f.pos)],
                                  hint="recursion must change an argument and stop on a condition")

    def ex_scan(self, t, env, mod):
        call, over = t.children
        pos = self.pos(t, mod)
        if not (isinstance(call, Tree) and call.data == "call"):
            raise NetdslError("scan applies a step: scan name(args...)", pos)
        fn, args = call.children
        d = self.eval(fn, env, mod)
        if not isinstance(d, Def) or d.kind != "step_def":
            raise NetdslError(f"scan needs a step, got {_show(d)}", pos,
                              hint="define one with `step name(x_t: seq, ...) { ... }`")
        pos_args, kwargs, kwpos = [], {}, {}
        for a in (args.children if args is not None else []):
            if isinstance(a, Tree) and a.data == "kwarg":
                kwargs[a.children[0].value] = self.eval(a.children[1], env, mod)
                kwpos[a.children[0].value] = self.pos(a, mod)
            else:
                pos_args.append(self.eval(a, env, mod))
        length = self.eval(over, env, mod) if over is not None else None
        return self.run_scan(d, pos_args, kwargs, kwpos, length, pos)

    def run_scan(self, d: Def, args, kwargs, kwpos, length, pos):
        label = check_label(kwargs.pop("name", None), kwpos.get("name", pos))
        self._check_depth(d, pos)
        self.count_call(d, pos)
        senv = Env(self.globals(d.module))
        seq_names = self.bind_params(d, senv, args, kwargs, pos, kwpos=kwpos)
        seqs = []
        for n in seq_names:
            v = senv.vars[n]
            if not isinstance(v, Value) or v.rank < 2:
                raise NetdslError(f"step '{d.name}': sequence argument '{n}' must be a tensor [N, T, ...], "
                                  f"got {_show(v)}", pos)
            if length is None:
                length = v.shape[1]
            elif v.shape[1] != length:
                raise NetdslError(f"step '{d.name}': sequence '{n}' has {v.shape[1]} steps but the scan runs "
                                  f"over {length}", pos, notes=[Note(f"'{n}' has shape {fmt_shape(v.shape)}", v.pos)])
            seqs.append(v)
        if length is None:
            raise NetdslError(f"scan {d.name}: no sequence input, so the number of steps must be given", pos,
                              hint=f"write `scan {d.name}(...) over T`")
        if not is_dim(length) or (isinstance(length, int) and length <= 0):
            raise NetdslError(f"a scan runs over a positive number of steps, got {_show(length)}", pos)
        scope = label or self.fresh("op", d.name, 1)
        path = ".".join(p for p in (self.scope_path(), scope) if p)
        self.claim(path, pos)
        self.count_node(pos)
        body = Graph(d.name, pos=pos)
        state = StepState(body)
        for n, v in zip(seq_names, seqs):
            inner = Value((v.shape[0], *v.shape[2:]), v.dtype, name=n, pos=v.pos)
            body.inputs[n] = inner
            senv.vars[n] = inner
        self.frames.append(Frame(scope, "step", d.name, pos))
        self.steps.append(state)
        try:
            self.exec_body(d.tree.children[2], senv, d.module)
        except _Return as r:
            raise NetdslError("a step ends with emit, not return", r.pos) from None
        finally:
            self.steps.pop()
            self.frames.pop()
        for name, c, cpos in state.carries:
            out = senv.vars[name]
            if not isinstance(out, Value) or out.shape != c.step_in.shape or out.dtype != c.step_in.dtype:
                raise NetdslError(f"carry '{name}' must keep its shape from step to step: it enters as "
                                  f"{c.step_in.dtype}{fmt_shape(c.step_in.shape)} and leaves as {_show(out)}", cpos,
                                  # point at the line that made the leaving value too
                                  notes=[Note(f"'{name}' gets its new value here", out.pos)]
                                  if isinstance(out, Value) and out.pos else [])
            c.step_out = out
        if not state.emits and not state.carries:
            raise NetdslError(f"step '{d.name}' neither carries state nor emits anything", pos)
        outs = [((v.shape[0], length, *v.shape[1:]), v.dtype) for v, _ in state.emits]
        outs += [(c.init.shape, c.init.dtype) for _, c, _ in state.carries]
        captures = _captures(body, [c.step_in for _, c, _ in state.carries])
        inputs = seqs + [c.init for _, c, _ in state.carries] + captures
        node = Node("scan", inputs, {"step": d.name, "length": length, "seq": seq_names,
                                     "carries": [n for n, _, _ in state.carries],
                                     "emits": [v.name for v, _ in state.emits],
                                     "captures": [v.name for v in captures]},
                    path, pos, tuple(self.frames), body=body)
        body.outputs = {f"emit{i}": v for i, (v, _) in enumerate(state.emits)}
        body.carries = [c for _, c, _ in state.carries]
        for i, (shape, dtype) in enumerate(outs):
            check_elements(shape, f"scan {d.name}'s output", pos)
            node.outputs.append(Value(tuple(shape), dtype, node, i, pos=pos))
        ne = len(state.emits)
        for (_, c, _), v in zip(state.carries, node.outputs[ne:]):
            c.final = v
            self.graph.carries.append(c)
        node.macs = sum((n.macs for n in _all_nodes(body)), 0) * length
        self.target.nodes.append(node)
        return ScanResult(node.outputs[:ne], node.outputs[ne:])



def _captures(body: Graph, carried: list[Value]) -> list[Value]:
    """The outer tensors a step body reads (not made in it, not its inputs or carries,
    not parameters), in order of first use: the scan takes them as inputs."""
    inner = {id(v) for v in list(body.inputs.values()) + carried}
    inner |= {id(o) for n in _all_nodes(body) for o in n.outputs}
    out, seen = [], set()
    for n in _all_nodes(body):
        for v in n.inputs:
            if v is not None and v.param is None and id(v) not in inner and id(v) not in seen:
                seen.add(id(v))
                out.append(v)
    return out


def _all_nodes(g: Graph):
    for n in g.nodes:
        yield n
        if n.body is not None:
            yield from _all_nodes(n.body)


def elaborate_uncached(path: str, network: str | None = None, overrides: dict | None = None) -> tuple[Graph, Loader]:
    """Parse `path` and its imports and elaborate a network (see netdsl.lang.elaborate)."""
    loader = Loader()
    el = None
    try:
        mod = loader.load(path)
        el = Elaborator(loader, overrides)
        g = el.network(mod, network)
    except RecursionError:   # a resource limit, not a bug: say so at the network (or the file)
        raise NetdslError("the spec nests too deeply to elaborate (expressions, blocks or loops)",
                          el.graph.pos if el is not None and el.graph else Pos(path, 1, 1),
                          hint="an expression or a value nests hundreds of levels deep") from None
    except MemoryError:      # past every limit in limits.py: still the spec's doing, not a crash
        raise NetdslError("the machine ran out of memory elaborating the spec",
                          el.graph.pos if el is not None and el.graph else Pos(path, 1, 1)) from None
    return g, loader
