"""A CUDA step as a loop of pre-built launches over one device arena (issue 16, means 1 and 2).

An eager CUDA step runs each binding in Python: it reshapes and ravels (a new array
object each, its type and view recomputed), allocates its outputs and scratch (one
malloc each, a free when they die), configures each kernel (numba's one lru_cache of
128 launch configurations for all kernels), and has numba type every argument to find
the compiled kernel. None of that changes from step to step once the shapes are known.

So the step is recorded once, while it runs eagerly (runtime/cuda_record.py): every device
allocation, every kernel launch (the compiled kernel numba picked, grid, block, stream,
arguments) and every device copy, each tagged with the plan step that made it. Then
- the arena (means 1): every allocation the step made (the plan's activations, saved
  tensors and gradients, and each kernel's scratch) gets an offset in one device
  buffer, laid out by the same planner as the CPU workspace (`arena.layout`, greedy by
  size, two values share bytes only if their lives do not overlap) over the recorded
  sequence: each launch or copy is one step of that plan, a value lives from the first
  launch that touches it to the last (to the end for what the step returns). The
  buffer is allocated once per program; the array objects (views at their offsets)
  are made once and kept.
- the launch records (means 2): per plan step, its launches with their argument tuples
  rebuilt over those views (parameters, gradient buffers and inputs are the same
  objects every step; constant index tables uploaded inside the step are uploaded once
  and kept). A replayed step copies the batch into the fixed input buffers and calls
  each record: no allocation, no free, no reshape, no configure, no typing.

A record launches the compiled kernel directly (`_Kernel.launch`, caught from numba's
pre-launch callback while recording); NETDSL_CUDA_ARENA=config calls numba's configured
launcher instead (numba types the arguments each call); NETDSL_CUDA_ARENA=packed packs
the arguments once and calls cuda.core's launch (numba-cuda internals: opt-in until
measured); NETDSL_CUDA_ARENA=0 keeps the eager step. Under the simulator a record
reconfigures the fake kernel and calls it. NETDSL_CUDA_GRAPH_RECORDS=1 (opt-in) captures
the records' replay as one CUDA graph after the first replay.

Which steps can be recorded: those a replay repeats exactly, the same condition as for a
CUDA graph (runtime/cuda_graph.py HOST_WORK), except that index tables uploaded from the
host are allowed in the operators that upload only tables of the shapes (transposes,
concat, split, slice, pad, 4-d cross entropy, and scans, which slice every time step out
with them): those are constants, uploaded once. What the recording sees decides too: a
read back to the host, an upload anywhere else, a host array passed to a kernel, a kernel
reading device memory the step did not allocate and was not given, or cuBLAS
(NETDSL_CUDA_BLAS=1, not a numba launch) leave the program eager, the reason kept.
"""
from __future__ import annotations

import functools
import math
import os
import sys
import time

import numpy as np

from .cuda_record import CONSTANT_UPLOADS, Recorder, Ref, _is_dev, sim  # noqa: F401  (CONSTANT_UPLOADS: tests)

ENV = "NETDSL_CUDA_ARENA"
GRAPH_ENV = "NETDSL_CUDA_GRAPH_RECORDS"     # 1: capture the records' replay as one CUDA graph (opt-in)
ALIGN = 256     # bytes: every slot starts where cuMemAlloc would align an allocation


def mode() -> str | None:
    """None (off: eager steps), "kernel" (records launch the compiled kernel), "config"
    (records call numba's configured launcher) or "packed" (arguments packed once, launched
    through cuda.core; opt-in)."""
    v = os.environ.get(ENV, "1")
    return None if v == "0" else v if v in ("config", "packed") else "kernel"


def plan_reason(plan) -> str | None:
    """Why this plan's steps cannot be replayed from records (a binding does host work
    other than constant index uploads), or None."""
    from .cuda_graph import host_work
    return host_work(n for n in _walk(m for s in plan.steps for m in s.nodes) if n.op not in CONSTANT_UPLOADS)


def _walk(nodes):
    """Every node, and those of the step bodies inside (a scan's body runs in its step)."""
    for n in nodes:
        if getattr(n, "body", None) is not None:
            yield from _walk(n.body.nodes)
        yield n


def _view(buf, off: int, shape, strides, dtype):
    """An array of (shape, strides, dtype) at byte `off` of the uint8 device buffer `buf`."""
    dtype = np.dtype(dtype)
    if hasattr(buf, "_ary"):
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
        return FakeCUDAArray(np.ndarray(shape, dtype, buffer=buf._ary, offset=off, strides=strides))
    n = math.prod(shape) * dtype.itemsize
    if tuple(strides) == _c_strides(shape, dtype.itemsize):
        return buf[off:off + n].view(dtype).reshape(tuple(shape))
    from numba.cuda.cudadrv.devicearray import DeviceNDArray
    return DeviceNDArray(tuple(shape), tuple(strides), dtype, gpu_data=buf.gpu_data.view(off))


def _c_strides(shape, itemsize) -> tuple:
    out, s = [], itemsize
    for d in reversed(tuple(shape)):
        out.append(s)
        s *= d
    return tuple(reversed(out))


# ---- the records

class Launch:
    """One pre-built launch: call it to launch."""
    __slots__ = ("step", "name", "call", "args", "grid", "block")

    def __init__(self, step, name, call, args, grid, block):
        self.step, self.name, self.call, self.args, self.grid, self.block = step, name, call, args, grid, block


class Records:
    """A program's step as pre-built launches over its arena.

    per_step[i]: the launches of plan step i, in order; calls: all of them, flat, as the
    replay runs them; inputs: value id -> the device buffer the batch is copied into;
    env: what the step returns (views in the arena, overwritten by the next step);
    layout: arena.Layout over `plan` (one plan step per launch or copy, values = allocations)."""

    def __init__(self, prog, rec: Recorder, env: dict, inputs: dict, params: tuple, how: str):
        from numba import cuda

        from ..plan import Plan, Step
        from .arena import layout
        self.params, self.inputs, self.how = params, inputs, how
        self.replays = 0
        self.graph, self.graph_why = None, None     # the replay captured (NETDSL_CUDA_GRAPH_RECORDS=1)
        E = len(rec.events)
        ret = {}
        for vid, a in env.items():      # what the step returns lives to its end
            if _is_dev(a) and vid not in inputs:
                r = rec.ref(a, E)
                if r is None:
                    raise ValueError(rec.refused)
                ret[vid] = r
            else:
                ret[vid] = Ref(obj=a)
        own = [al for al in rec.allocs if al.const is None and al.first is not None]
        born = [[] for _ in range(E + 1)]
        dies = [[] for _ in range(E + 1)]
        for al in own:
            born[al.first].append(al)
            dies[al.last].append(al)
        self.plan = Plan([Step([], [], b) for b in born], dies, 0, 0, {})
        self.layout = layout(self.plan, lambda s: "into", lambda al: -(-al.nbytes // ALIGN) * ALIGN)
        self.size = self.layout.size
        self.buf = cuda.device_array(max(self.size, ALIGN), np.uint8)     # the arena: one allocation
        self.consts = sum(al.nbytes for al in rec.allocs if al.const is not None)
        made: dict = {}

        def build(r: Ref):
            if r.alloc is None:
                return r.obj
            key = (r.alloc.key, r.off, r.shape, r.strides, r.dtype.str)
            if key not in made:
                made[key] = _view(self.buf, self.layout.slots[id(r.alloc)][0] + r.off, r.shape, r.strides, r.dtype)
            return made[key]

        self.per_step: list[list[Launch]] = [[] for _ in prog.plan.steps]
        self.launches: list[Launch] = []
        for ev in rec.events:
            args = tuple(build(r) for r in ev.args)
            if ev.kind == "copy":
                dst, src = args
                call, grid, block = functools.partial(dst.copy_to_device, src), None, None
            elif sim():
                call, grid, block = functools.partial(_sim_launch, ev.fn, ev.cfg, args), ev.cfg[0], ev.cfg[1]
            elif how in ("kernel", "packed") and ev.fn is not None:
                lc = ev.cfg
                call = _packed(ev.fn, args, lc) if how == "packed" else None
                if call is None:
                    call = functools.partial(ev.fn.launch, args, lc.griddim, lc.blockdim, lc.stream, lc.sharedmem)
                grid, block = lc.griddim, lc.blockdim
            else:
                lc = ev.cfg
                call, grid, block = functools.partial(lc, *args), lc.griddim, lc.blockdim
            ln = Launch(ev.step, ev.name, call, args, grid, block)
            self.launches.append(ln)
            if 0 <= ev.step < len(self.per_step):
                self.per_step[ev.step].append(ln)
        self.calls = [ln.call for ln in self.launches]
        self.env = {vid: build(r) for vid, r in ret.items()}
        # constant tables copied into an array at each replay: a capture would refuse the copy
        self.host_copies = any(ln.grid is None and isinstance(ln.args[1], np.ndarray) for ln in self.launches)

    def replay(self, host_feeds: dict) -> dict:
        for vid, buf in self.inputs.items():
            buf.copy_to_device(host_feeds[vid])
        for call in self.calls:
            call()
        return dict(self.env)

    def describe(self) -> str:
        return (f"launch records ({len(self.launches)} launches, arena {self.size / 2**20:.1f} MiB"
                + (f", {self.consts / 2**10:.1f} KiB of constant tables" if self.consts else "") + ")")


def _packed(kernel, args, lc):
    """The launch with its arguments packed once, as numba's `_Kernel.launch` packs them at
    every call (`_prepare_args`: an array becomes meminfo, parent, size, itemsize, pointer,
    shape, strides), handed to cuda.core's `launch` as that method does. None (the record
    then calls `_Kernel.launch`) for a debug kernel, an argument numba would copy to the
    device and back, or anything this numba-cuda does differently."""
    try:
        from numba.cuda import dispatcher as D
        if kernel.debug or kernel.extensions:
            return None
        retr, kargs = [], []
        for t, v in zip(kernel.argument_types, args):
            kernel._prepare_args(t, v, lc.stream, retr, kargs)
        if retr:
            return None
        kw = {"grid": lc.griddim, "block": lc.blockdim, "shmem_size": lc.sharedmem,
              ("is_cooperative" if D.CUDA_CORE_GE_1_0 else "cooperative_launch"): kernel.cooperative}
        return functools.partial(D.launch, lc.stream, D.LaunchConfig(**kw), kernel._codelibrary.get_cufunc().kernel,
                                 *kargs)
    except Exception:   # (internals of numba-cuda 0.30.4; another version may differ)
        return None


class _Replay:
    """What `cuda_graph.capture` runs in place of `Program.run`: the records' launches on
    their own buffers (`StepGraph.launch` copies each batch into the input buffers)."""

    def __init__(self, r: Records):
        self.r = r

    def run(self, st, inputs) -> dict:
        for call in self.r.calls:
            call()
        return dict(self.r.env)


def _sim_launch(k, cfg, args):
    from numba.cuda.simulator.kernel import FakeCUDAKernel
    FakeCUDAKernel.__getitem__(k, cfg)(*args)


def record(prog, st, inputs: dict, params: tuple, how: str, execute: bool = True):
    """Run prog's step on `inputs` (device arrays, kept as the input buffers) while recording
    it; returns (Records or the reason it cannot be replayed, the step's env).
    execute=False records the launches without running them (the step's values are then
    garbage: for tests that only look at the records, under the simulator)."""
    externals = list(getattr(st, "params", {}).values()) + list(inputs.values())
    gb = getattr(getattr(st, "grad_buffers", None), "grad_buf", None)
    if gb is not None:
        externals.append(gb)
    rec = Recorder(prog, [a for a in externals if _is_dev(a)], execute)
    with rec:
        env = prog.run(st, inputs)
    if rec.refused is None and not any(ev.kind == "launch" for ev in rec.events):
        rec.refused = "the step launched no kernels"
    if rec.refused is not None:
        return rec.refused, env
    try:
        r = Records(prog, rec, env, inputs, params, how)
    except ValueError as e:     # (what the step returns lies outside what it may: rec.refused)
        return str(e), env
    except Exception as e:      # never the step's failure: it ran, and runs eagerly on
        return f"the records could not be built ({type(e).__name__}: {e})", env
    return r, env


# ---- per model

def _same(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


class ArenaSteps:
    """A CUDA model's eager training steps (those not replayed as a CUDA graph): recorded
    on the first step of a program, replayed from its records after.

    status: program -> Records.describe() or why its steps run eagerly."""

    def __init__(self):
        self.records: dict = {}
        self.status: dict = {}
        self.record_s: dict = {}    # program -> seconds its recorded step took

    def reason(self, prog, st, runtime_why=None) -> tuple[str | None, bool]:
        from . import cuda_blas
        how = mode()
        if how is None:
            return f"{ENV}=0", False
        if prog in self.status and prog not in self.records:
            return self.status[prog], False
        if cuda_blas._orig is not None:
            return "GEMMs go to cuBLAS (NETDSL_CUDA_BLAS=1), which records do not hold", False
        if prog not in self.records:
            why = plan_reason(prog.plan)
            if why is not None:
                return why, False
        if runtime_why:
            return runtime_why, True
        if prog.profile is not None:
            return "NETDSL_PROFILE times every kernel", True
        if getattr(st, "grad_ready", None) is not None:
            return "gradient hooks run host code between kernels", True
        return None, False

    def run(self, prog, st, host_feeds: dict, upload, params: tuple, runtime_why=None) -> dict:
        why, transient = self.reason(prog, st, runtime_why)
        if why is not None:
            if not transient:
                self._note(prog, why)
            return prog.run(st, upload(host_feeds))
        r = self.records.get(prog)
        if r is not None and _same(r.params, params):
            if r.replays:
                if r.graph is None and r.graph_why is None and os.environ.get(GRAPH_ENV) == "1":
                    r.graph_why = self._capture(prog, st, r, params)
                if r.graph is not None:
                    return r.graph.launch(host_feeds)
                r.replays += 1
                return r.replay(host_feeds)
            try:        # the first replay: a failure keeps the program eager from then on (what
                # ran before it ran twice: a norm's running statistics moved once more)
                env = r.replay(host_feeds)
            except Exception as e:
                del self.records[prog]
                self._note(prog, f"the first replay failed ({type(e).__name__}: {e})")
                return prog.run(st, upload(host_feeds))
            r.replays = 1
            return env
        t0 = time.perf_counter()
        r, env = record(prog, st, upload(host_feeds), params, mode())
        self.record_s[prog] = time.perf_counter() - t0
        st.saved.clear()
        if isinstance(r, str):
            self.records.pop(prog, None)
            self._note(prog, r)
        else:
            self.records[prog] = r
            self._note(prog, r.describe())
            from . import cuda_pool
            cuda_pool.empty_cache()     # the recorded step's blocks: the arena replaces them
        return env

    def _capture(self, prog, st, r: Records, params: tuple) -> str:
        """NETDSL_CUDA_GRAPH_RECORDS=1 (opt-in, after the first replay): capture the records'
        replay as one CUDA graph, so that a plan a graph of `Program.run` refuses only for its
        constant index uploads (a scan, concat, transpose...) is one launch a step too. Its
        memory is the arena's, fixed. Returns "captured" or why not (the records go on)."""
        from . import cuda_graph, cuda_pool
        why = ("NETDSL_CUDA_GRAPHS=0" if not cuda_graph.enabled() else
               "the CUDA simulator cannot capture graphs" if sim() else
               "netdsl's device allocator is off (NETDSL_CUDA_POOL=0)" if cuda_pool.pool() is None else
               "the records copy constant tables from the host at every replay" if r.host_copies else None)
        why = why or cuda_graph.ptds_ok()
        if why is None:
            try:
                r.graph = cuda_graph.capture(_Replay(r), st, r.inputs, params)
            except cuda_graph.CaptureFailed as e:
                why = str(e)
        self._note(prog, f"{r.describe()} captured as one CUDA graph ({r.graph.nodes} nodes)" if why is None
                   else f"{r.describe()}, not captured: {why}")
        return "captured" if why is None else why

    def _note(self, prog, status: str) -> None:
        from .cuda_graph import _told
        self.status[prog] = status
        line = ("replayed from " + status if status.startswith("launch records")
                else f"eager, not recorded: {status}")
        if status not in _told:
            _told.add(status)
            print(f"netdsl: CUDA eager step: {line}", file=sys.stderr)
