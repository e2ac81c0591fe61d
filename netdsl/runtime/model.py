"""A compiled network with its parameters: inference and training steps, on the CPU or a CUDA device."""
from __future__ import annotations

import threading
from collections.abc import Mapping

import numpy as np

from .. import autodiff
from ..errors import NetdslError
from ..ir.dims import Sym, fmt_shape
from ..ir.graph import Graph, Value
from .arena import Workspace
from .bindings import GradBuffers, array_dtype
from .executor import Program, RunState, Target, check_runnable
from .init import init_param, place


class Model:
    def __init__(self, graph: Graph, params: dict | None = None, seed: int = 0, fuse: bool = True,
                 dtype=np.float32, device: str = "cpu"):
        """dtype=np.float64 runs every float tensor in double precision (gradient checks).
        device="cuda" keeps parameters (and everything computed) in device memory:
        `params` and gradients are then device arrays; `host_params()` copies them down.
        fuse=False runs every node as its own kernel, recomputes nothing in the backward and
        allocates every intermediate (the planner's optimisations off: the reference they are
        tested against). A graph with an operator that cannot run yet is refused here, at
        that node, before any weight is drawn or data read."""
        check_runnable(graph.nodes)
        self.g = graph
        self.dtype = np.dtype(dtype)
        self.device = device
        self.target = Target(device)
        self.flat = None            # CUDA: the trainable parameters' and gradients' buffers (cuda_flat.py)
        self._params: dict | None = None
        self._drawing: _InitialWeights | None = None
        if params is None:
            self._drawing = _InitialWeights(graph, seed)
        else:
            self._adopt(params)
        self.seed, self.fuse = seed, fuse
        self._tg = None
        self._programs: dict = {}
        # the programs' intermediates at planned offsets (arena.py; CPU, with the planner's optimisations)
        self._workspace = Workspace() if fuse else None
        self.step = 0
        self.carries: dict = {}     # the last run's final recurrent state (carry path -> array)
        self.grad_flow: dict = {}   # train_step(grad_flow=True): carry path -> [|dL/dh_t| for each t]
        self.grad_ready = None      # train_step's RunState.grad_ready (distributed.GradReducer.ready)
        self._graphs = None         # CUDA: training steps captured as graphs and replayed (cuda_graph.py)

    def _adopt(self, params: dict):
        if self.dtype != np.float32:
            params = {k: v.astype(self.dtype) for k, v in params.items()}
        self.flat = None
        if self.device == "cuda":   # trainable parameters as views of one buffer (runtime/cuda_flat.py)
            from .cuda_flat import DeviceParams
            train = {k: v for k, v in params.items() if k in self.g.params and self.g.params[k].role != "buffer"
                     and np.dtype(v.dtype) == self.dtype}
            if train:
                self.flat = DeviceParams(train, self.dtype)
        self._params = {k: self.flat.params[k] if self.flat is not None and k in self.flat.params else self.target.upload(v)
                        for k, v in params.items()}

    @property
    def params(self) -> dict:
        """Parameter path -> array (on the model's device), waiting for initialisation."""
        if self._drawing is not None:
            host = self._drawing.all()
            self._drawing = None
            self._adopt(host)   # here, not on the helper: a CUDA upload belongs to this thread
        return self._params

    @params.setter
    def params(self, value: dict):
        if self._drawing is not None:
            self._drawing.all()     # let the helper finish before its result is dropped
            self._drawing = None
        self._params = value

    def _run_params(self):
        """Where a run reads the weights: while float32 CPU weights (nothing to convert or
        upload) are still being drawn, from the drawing, so the run need not wait for all."""
        if (self._drawing is not None and self.dtype == np.float32 and self.device == "cpu"
                and not self._drawing.finished):
            return self._drawing
        return self.params

    @property
    def training_graph(self) -> autodiff.TrainingGraph:
        if self._tg is None:
            self._tg = autodiff.build(self.g, recompute=self.fuse)
        return self._tg

    def host_params(self) -> dict[str, np.ndarray]:
        return {k: self.target.download(v) for k, v in self.params.items()}

    def trainable(self) -> dict[str, np.ndarray]:
        return {n: a for n, a in self.params.items() if self.g.params[n].role != "buffer"}

    # ---- feeding data

    def bind(self, feeds: dict[str, np.ndarray], upload: bool = True) -> tuple[dict, dict]:
        """Check arrays against the declared inputs; returns (dims, feeds by value id), on
        the model's device (upload=False: host arrays, for a CUDA graph's input buffers)."""
        dims: dict[str, int] = {}
        out = {}
        for name, arr in feeds.items():
            if name not in self.g.inputs:
                raise NetdslError(f"the network has no input '{name}'", self.g.pos,
                                  hint="inputs: " + ", ".join(self.g.inputs))
            v = self.g.inputs[name]
            want = array_dtype(v.dtype, self.dtype)
            arr = np.asarray(arr)
            if arr.ndim != v.rank or not _fits(v, arr.shape, dims):
                raise NetdslError(f"input '{name}' is declared {v.dtype}{fmt_shape(v.shape)} but the data "
                                  f"has shape {list(arr.shape)}", v.pos)
            if arr.dtype != want:
                if np.issubdtype(want, np.integer) != np.issubdtype(arr.dtype, np.integer):
                    raise NetdslError(f"input '{name}' is declared {v.dtype} but the data is {arr.dtype}", v.pos)
                arr = arr.astype(want)
            arr = np.ascontiguousarray(arr)
            out[id(v)] = self.target.upload(arr) if upload else arr
        return dims, out

    # ---- programs

    def _program(self, train: bool, dims: dict, want: tuple) -> Program:
        """want: names of outputs and losses, or graph values, to keep (with train, the
        values kept beside the training step's own)."""
        key = (train, tuple(sorted(dims.items())), tuple(w if isinstance(w, str) else id(w) for w in want))
        if key not in self._programs:
            extra = [w for w in want if not isinstance(w, str)]
            if train:
                keep, nodes = self.training_graph.keep() + extra, self.training_graph.nodes
            else:
                keep = [self.g.outputs[n] for n in want if n in self.g.outputs] + \
                       [l.value for l in self.g.losses if l.name in want] + extra
                nodes = _needed(self.g, keep)
            made = {id(o) for n in nodes for o in n.outputs}
            keep = keep + [c.final for c in self.g.carries if id(c.final) in made]
            self._programs[key] = Program(nodes, keep, dims, self.fuse, self.device, self._workspace)
        return self._programs[key]

    def _state(self, dims, train: bool, carry) -> RunState:
        st = RunState(self._run_params(), dims, train, self.seed, self.dtype)
        st.fuse, st.step = self.fuse, self.step
        if carry:
            known = {c.name for c in self.g.carries}
            unknown = sorted(set(carry) - known)
            if unknown:
                raise NetdslError(f"no recurrent state named {', '.join(unknown)}; the network carries "
                                  + (", ".join(sorted(known)) or "none"), self.g.pos)
            st.carry_in = {k: self.target.upload(np.ascontiguousarray(v, dtype=array_dtype(
                               next(c.init.dtype for c in self.g.carries if c.name == k), self.dtype)))
                           for k, v in carry.items()}
        return st

    def _keep_carries(self, env):
        """The final recurrent state of the run just made (carry path -> array), for
        truncated backpropagation through time and for sampling one step at a time."""
        self.carries = {c.name: env[id(c.final)] for c in self.g.carries if id(c.final) in env}

    def infer(self, feeds: dict, want=None, carry: dict | None = None) -> dict:
        """Outputs (and all-phase losses whose inputs are fed) in inference mode; `want`
        names outputs and losses, or gives graph values (returned under themselves).
        `carry` (carry path -> array) starts the recurrences from that state instead of
        their initial values; the final state is left in `self.carries`."""
        dims, fv = self.bind(feeds)
        if want is None:
            fed = set(fv)
            want = list(self.g.outputs) + [l.name for l in self.g.losses
                                           if l.phase == "all" and inputs_of(self.g, l.value) <= fed]
        prog = self._program(False, dims, tuple(want))
        env = prog.run(self._state(dims, False, carry), fv)
        self._keep_carries(env)
        named = {**self.g.outputs, **{l.name: l.value for l in self.g.losses}}
        return {n: self.target.download(env[id(named[n] if isinstance(n, str) else n)]) for n in want}

    def train_step(self, feeds: dict, extra=(), carry: dict | None = None, grad_flow: bool = False):
        """Forward and backward; returns (total loss, {loss name: value}, outputs, grads).
        `extra`: graph values to hand back too, in outputs under themselves (a metric's
        logits that are not an output). The gradient arrays are buffers that the next step
        overwrites (as torch reuses .grad; on CUDA views of one buffer, runtime/cuda_flat.py):
        copy them to keep them.
        `carry` starts the recurrences from a given state (truncated BPTT: the previous
        chunk's `self.carries`; no gradient flows into it); grad_flow=True records, in
        `self.grad_flow`, the norm of the gradient reaching each recurrent state at each t."""
        dims, fv = self.bind(feeds, upload=self.device != "cuda")    # (CUDA: uploaded in _device_step)
        missing = [n for n, v in self.g.inputs.items() if id(v) not in fv]
        if missing:
            raise NetdslError(f"training needs data for every input; missing: {', '.join(missing)}", self.g.pos)
        prog = self._program(True, dims, tuple(extra))
        st = self._state(dims, True, carry)
        if grad_flow:   # the scans' backward records |dL/dh_t| for every carry and t
            st.grad_flow = self.grad_flow = {}
        st.grad_ready = self.grad_ready
        if self.device == "cpu":    # weight gradients go into buffers kept from step to step
            if "_grad_buffers" not in self.__dict__:
                self._grad_buffers = GradBuffers(self.training_graph.grads)
            st.grad_buffers = self._grad_buffers
        elif self.flat is not None:     # every parameter gradient into its view of one buffer
            st.grad_buffers = self.flat.bind(self.training_graph.grads)
        env = prog.run(st, fv) if self.device != "cuda" else self._device_step(prog, st, fv, carry, grad_flow)
        self._keep_carries(env)
        losses = {l.name: float(self.target.download(env[id(l.value)])) for l in self.g.losses}
        total = sum(l.weight * losses[l.name] for l in self.g.losses)
        grads = {n: env[id(v)] for n, v in self.training_graph.grads.items()}
        arrays = [self.flat.grad_buf] if self.flat is not None and self.flat.holds_grads(grads) else grads.values()
        if not np.isfinite(total) or not _all_finite(self.device, arrays):   # (one kernel over a flat buffer)
            self._blame(prog, st, fv)
        self.step += 1
        outputs = {n: self.target.download(env[id(v)]) for n, v in self.g.outputs.items() if id(v) in env}
        outputs.update((v, self.target.download(env[id(v)])) for v in extra)
        return total, losses, outputs, grads

    def _device_step(self, prog: Program, st: RunState, host_fv: dict, carry, grad_flow: bool) -> dict:
        """A CUDA training step: eager, or captured as one CUDA graph and replayed (cuda_graph.py)."""
        from .cuda_graph import GraphSteps
        if self._graphs is None:
            self._graphs = GraphSteps()
        why = ("the recurrent state is given from outside (carry)" if carry else
               "grad_flow records gradient norms on the host" if grad_flow else None)
        params = tuple(st.params.values()) + ((self.flat.grad_buf,) if self.flat is not None else ())
        upload = lambda fv: {k: self.target.upload(a) for k, a in fv.items()}
        return self._graphs.run(prog, st, host_fv, upload, params, why)

    @property
    def graph_status(self) -> dict:
        """CUDA: training program -> "graph (N nodes)" or why its steps run eagerly."""
        return dict(self._graphs.status) if self._graphs is not None else {}

    def _blame(self, prog: Program, st: RunState, fv):
        """Re-run the step checking every value, and name the first non-finite producer."""
        st.saved.clear()
        fv = {k: self.target.upload(a) for k, a in fv.items()}     # (a CUDA step's feeds are host arrays)
        bad = prog.first_nonfinite(st, fv)
        if bad is None:
            raise NetdslError("the loss or a gradient is not finite", self.g.pos)
        n = bad
        raise NetdslError(f"non-finite values (NaN or inf) first produced by {n.op} at {n.path}"
                          + (" (in the backward pass)" if n.fwd is not None else ""),
                          n.pos, hint="lower the learning rate, add gradient clipping (clip = 1.0), "
                          "or check the data for NaNs")


class _InitialWeights(Mapping):
    """init_params(graph, seed), drawn on a helper thread, as a mapping whose [name]
    waits for that parameter.

    ResNet-50's weights take ~0.12 s to draw (init.py; the kernels let go of the GIL),
    on a helper thread from the moment the model exists: that overlaps what the first
    step does before its kernels run (planning, linking the kernels from the native
    store, or Numba on a miss). They are drawn in graph order, which is the forward's:
    the first layer's are there at once. A thread that would wait for one draws the
    next nobody has taken instead (ResNet-50's forward reaches its last stage, 60% of
    the weights, before they are drawn). A parameter's values depend on the seed and
    its name alone, so who draws it changes nothing (tests/test_startup.py).
    """

    def __init__(self, graph: Graph, seed: int):
        self._todo = list(graph.params.items())     # a snapshot: the helper never reads the graph's dict
        self._buf, self._offsets = place(graph)     # mapped, not yet touched
        self._seed = seed
        self._next = 0                              # the first parameter nobody has taken
        self._done: dict[str, np.ndarray] = {}
        self._error: BaseException | None = None
        self._cv = threading.Condition()
        threading.Thread(target=self._draw_all, name="netdsl-init", daemon=True).start()

    def _draw_one(self) -> bool:
        """Draw the next parameter nobody has taken; False if there is none (or a draw failed)."""
        with self._cv:
            if self._next == len(self._todo) or self._error is not None:
                return False
            name, p = self._todo[self._next]
            self._next += 1
        try:
            a = init_param(p, self._seed, self._buf[self._offsets[name]:])
        except BaseException as e:      # handed to whichever thread asks next
            a, self._error = None, e
        with self._cv:
            if a is not None:
                self._done[name] = a
            self._cv.notify_all()
        return a is not None

    def _draw_all(self):
        while self._draw_one():
            pass

    @property
    def finished(self) -> bool:
        return len(self._done) == len(self._todo)

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._offsets:
            raise KeyError(name)
        while True:
            with self._cv:
                if name in self._done:
                    return self._done[name]
                if self._error is not None:
                    raise self._error
                if self._next == len(self._todo):   # taken, being drawn
                    self._cv.wait()
                    continue
            self._draw_one()

    def __iter__(self):
        return (name for name, _ in self._todo)

    def __len__(self) -> int:
        return len(self._todo)

    def all(self) -> dict[str, np.ndarray]:
        """Every parameter, in graph order, once all are drawn."""
        return {name: self[name] for name, _ in self._todo}


def _all_finite(device: str, arrays) -> bool:
    if device == "cuda":    # one flag comes down, not the gradients
        from .cuda import all_finite
        return all_finite(arrays)
    from netdsl.kernels.cpu.optim import all_finite
    return all_finite(arrays)


def _fits(v: Value, shape, dims) -> bool:
    for d, n in zip(v.shape, shape):
        if isinstance(d, Sym):
            if len(d.terms) == 1 and list(d.terms.items())[0][1] == 1 and len(list(d.terms)[0]) == 1:
                name = list(d.terms)[0][0]
                if dims.setdefault(name, n) != n:
                    return False
                continue
            return False
        if d != n:
            return False
    return True


def inputs_of(g: Graph, v: Value) -> set[int]:
    seen, stack, out = set(), [v], set()
    ids = {id(x) for x in g.inputs.values()}
    while stack:
        x = stack.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if id(x) in ids:
            out.add(id(x))
        if x.producer is not None:
            stack.extend(i for i in x.producer.inputs if i is not None)
    return out


def _needed(g: Graph, keep: list[Value]):
    need, stack = set(), list(keep)
    while stack:
        v = stack.pop()
        n = v.producer
        if n is None or id(n) in need:
            continue
        need.add(id(n))
        stack.extend(i for i in n.inputs if i is not None)
    return [n for n in g.nodes if id(n) in need]
