"""A CUDA step as a loop of pre-built launches over one device arena (issue 16, means 1 and 2).

An eager CUDA step runs each binding in Python: it reshapes and ravels (a new array
object each, its type and view recomputed), allocates its outputs and scratch (one
malloc each, a free when they die), configures each kernel (numba's one lru_cache of
128 launch configurations for all kernels), and has numba type every argument to find
the compiled kernel. None of that changes from step to step once the shapes are known.

So the step is recorded once, while it runs eagerly: every device allocation, every
kernel launch (the compiled kernel numba picked, grid, block, stream, arguments) and
every device copy, each tagged with the plan step that made it. Then
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
reconfigures the fake kernel and calls it.

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

import bisect
import functools
import math
import os
import sys
import threading
import time

import numpy as np

ENV = "NETDSL_CUDA_ARENA"
GRAPH_ENV = "NETDSL_CUDA_GRAPH_RECORDS"     # 1: capture the records' replay as one CUDA graph (opt-in)
ALIGN = 256     # bytes: every slot starts where cuMemAlloc would align an allocation

# operators whose only host work is uploading index tables that depend on shapes alone
CONSTANT_UPLOADS = {"transpose", "concat", "split", "slice", "slice_grad", "pad", "cross_entropy",
                    "cross_entropy_grad", "scan", "scan_grad", "coords"}


def mode() -> str | None:
    """None (off: eager steps), "kernel" (records launch the compiled kernel), "config"
    (records call numba's configured launcher) or "packed" (arguments packed once, launched
    through cuda.core; opt-in)."""
    v = os.environ.get(ENV, "1")
    return None if v == "0" else v if v in ("config", "packed") else "kernel"


def sim() -> bool:
    return os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


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


# ---- device arrays, simulated or not

def _is_dev(a) -> bool:
    return getattr(a, "__cuda_ndarray__", False) is True


def _geom(a):
    """(pointer, shape, strides in bytes, dtype, nbytes) of a device array."""
    if hasattr(a, "_ary"):      # the simulator's FakeCUDAArray
        x = a._ary
        return x.__array_interface__["data"][0], tuple(x.shape), tuple(x.strides), x.dtype, x.nbytes
    ptr = a.device_ctypes_pointer.value or 0
    return ptr, tuple(a.shape), tuple(a.strides), np.dtype(a.dtype), int(a.size) * np.dtype(a.dtype).itemsize


def _extent(shape, strides, itemsize) -> int | None:
    """Bytes from the first element to the end of the last (None: a negative stride)."""
    if any(s < 0 for s in strides):
        return None
    if math.prod(shape) == 0:
        return 0
    return sum((d - 1) * s for d, s in zip(shape, strides)) + itemsize


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


# ---- the recording

class Alloc:
    """One device allocation made during the recorded step."""
    __slots__ = ("key", "ptr", "nbytes", "first", "last", "const")

    def __init__(self, key, ptr, nbytes, const=None):
        self.key, self.ptr, self.nbytes, self.const = key, ptr, nbytes, const
        self.first = self.last = None   # events that touch it first and last


class Ref:
    """A device array argument: (allocation, byte offset, shape, strides, dtype), or the
    object itself where it is not the step's own memory (parameters, inputs, constants)."""
    __slots__ = ("alloc", "off", "shape", "strides", "dtype", "obj")

    def __init__(self, alloc=None, off=0, shape=(), strides=(), dtype=None, obj=None):
        self.alloc, self.off, self.shape, self.strides, self.dtype, self.obj = alloc, off, shape, strides, dtype, obj


class Event:
    """A launch (kind "launch": fn, cfg, args) or a device copy (kind "copy": dst, src)."""
    __slots__ = ("kind", "step", "fn", "cfg", "args", "name")

    def __init__(self, kind, step, fn, cfg, args, name):
        self.kind, self.step, self.fn, self.cfg, self.args, self.name = kind, step, fn, cfg, args, name


class Recorder:
    """Patches numba.cuda's allocation, launch and copy entry points while one step of
    `prog` runs, and keeps what they did. Nothing of the step's own memory is held: an
    argument is resolved to its allocation at the moment of the launch (against the
    allocations alive then: memory handed out again means the old one died)."""

    def __init__(self, prog, externals, execute: bool = True):
        from .executor import Program
        self.execute = execute      # False: record without running the kernels (tests of big plans)
        self.prog, self.run_code = prog, Program.run.__code__
        self.allocs: list[Alloc] = []
        self.events: list[Event] = []
        self.refused: str | None = None
        self._starts: list[int] = []        # live allocations, sorted by pointer
        self._live: dict[int, Alloc] = {}
        self._ext: list[tuple[int, int]] = sorted(
            (p, p + n) for p, _, _, _, n in (_geom(a) for a in externals) if n)
        self._patches: list = []
        self._inside = 0        # inside a patched call: what it does itself is not recorded again
        self._tid = threading.get_ident()   # the step's thread: other threads are not the step

    # -- where we are

    def _step(self) -> int:
        f = sys._getframe(1)
        while f is not None:
            if f.f_code is self.run_code and f.f_locals.get("self") is self.prog:
                return f.f_locals.get("i", -1)
            f = f.f_back
        return -1

    def _op(self, step: int) -> str:
        return self.prog.plan.steps[step].nodes[0].op if 0 <= step < len(self.prog.plan.steps) else "?"

    def _where(self, step: int) -> str:
        if not 0 <= step < len(self.prog.plan.steps):
            return ""
        n = self.prog.plan.steps[step].nodes[0]
        return f"{n.op} ({n.path})"

    def refuse(self, why: str, step: int | None = None) -> None:
        if self.refused is None:
            step = self._step() if step is None else step
            self.refused = (f"{self._where(step)} " if step >= 0 else "") + why

    # -- allocations

    def _add(self, a, const=None) -> None:
        ptr, _, _, _, nbytes = _geom(a)
        if nbytes == 0:
            return
        al = Alloc(len(self.allocs), ptr, nbytes, const)
        self.allocs.append(al)
        i = bisect.bisect_left(self._starts, ptr + nbytes)
        while i > 0:        # whatever overlaps it is dead (its memory was given out again)
            s = self._starts[i - 1]
            if s + self._live[s].nbytes <= ptr:
                break
            del self._live[s]
            del self._starts[i - 1]
            i -= 1
        bisect.insort(self._starts, ptr)
        self._live[ptr] = al

    def ref(self, a, e: int) -> Ref | None:
        """a (a kernel argument at event e) as a Ref; None refuses (said why)."""
        ptr, shape, strides, dtype, nbytes = _geom(a)
        span = _extent(shape, strides, dtype.itemsize)
        if span is None:
            self.refuse("passes an array with a negative stride")
            return None
        if span == 0:
            return Ref(obj=a)
        i = bisect.bisect_right(self._starts, ptr) - 1
        al = self._live.get(self._starts[i]) if i >= 0 else None
        if al is not None and ptr + span <= al.ptr + al.nbytes:
            if al.const is not None:
                return Ref(obj=a)
            al.first = e if al.first is None else al.first
            al.last = e
            return Ref(al, ptr - al.ptr, shape, strides, dtype)
        j = bisect.bisect_right(self._ext, (ptr, float("inf"))) - 1
        if j >= 0 and ptr + span <= self._ext[j][1]:
            return Ref(obj=a)
        self.refuse("passes a kernel device memory that is neither the step's own allocations, a parameter, "
                    "a gradient buffer nor an input")
        return None

    # -- the patched entry points: they always do what they were asked; the bookkeeping around
    # them refuses the records if it fails, and never breaks the step

    def _mine(self) -> bool:
        return not self._inside and threading.get_ident() == self._tid

    def _book(self, fn, *args):
        try:
            return fn(*args)
        except Exception as e:
            self.refuse(f"could not be recorded ({type(e).__name__}: {e})", -1)
            return None

    def _device_array(self, orig, *args, **kw):
        a = orig(*args, **kw)
        if self._mine():
            self._book(self._add, a)
        return a

    def _to_device(self, orig, obj, *args, **kw):
        if not self._mine():
            return orig(obj, *args, **kw)
        step = self._step()
        to = kw.get("to", args[2] if len(args) > 2 else None)
        if to is not None:
            self._book(self._copy, to, obj, step)
            self._inside += 1
            try:
                return orig(obj, *args, **kw)
            finally:
                self._inside -= 1
        if self._op(step) not in CONSTANT_UPLOADS:
            self.refuse("uploads from the host inside the step", step)
        self._inside += 1
        try:
            a = orig(obj, *args, **kw)
        finally:
            self._inside -= 1
        self._book(self._add, a, a)
        return a

    def _copy(self, dst, src, step) -> None:
        e = len(self.events)
        if _is_dev(src):
            s = self.ref(src, e)
        elif self._op(step) in CONSTANT_UPLOADS:
            s = Ref(obj=np.array(src, copy=True))       # a constant table: uploaded again at each replay
        else:
            self.refuse("copies from the host into a device array inside the step", step)
            return
        d = self.ref(dst, e)
        if s is not None and d is not None:
            self.events.append(Event("copy", step, None, None, (d, s), "copy"))

    def _copy_to_device(self, orig, arr, ary, *args, **kw):
        if self._mine():
            self._book(self._copy, arr, ary, self._step())
        self._inside += 1
        try:
            return orig(arr, ary, *args, **kw)
        finally:
            self._inside -= 1

    def _copy_to_host(self, orig, arr, *args, **kw):
        if self._mine():
            self.refuse("reads device memory back to the host")
        self._inside += 1
        try:
            return orig(arr, *args, **kw)
        finally:
            self._inside -= 1

    def _launch(self, disp, cfg, orig_getitem):
        """What `kernel[cfg]` returns while recording: a launcher that records, then launches."""
        rec = self

        def launch(*args):
            if threading.get_ident() != rec._tid:
                return orig_getitem(disp, cfg)(*args)
            step = rec._step()
            refs = rec._book(rec._refs, args, step, len(rec.events))
            got = {}
            if sim() or not rec.execute:
                if rec.execute:
                    orig_getitem(disp, cfg)(*args)
                fn, conf = disp, cfg
            else:   # numba's configured launcher (kept: an lru_cache eviction cannot touch it), which
                # hands the compiled kernel it picked to a pre-launch callback, there only for this call
                lc = orig_getitem(disp, cfg)
                cbs = getattr(lc, "pre_launch_callbacks", None)     # (no such hook: records call lc)
                cb = lambda kernel, conf: got.setdefault("kernel", kernel)   # noqa: E731
                if cbs is not None:
                    cbs.append(cb)
                try:
                    lc(*args)
                finally:
                    if cbs is not None:
                        cbs.remove(cb)
                fn, conf = got.get("kernel"), lc
            if refs is not None and None not in refs:
                name = getattr(disp, "__name__", None) or getattr(getattr(disp, "py_func", None), "__name__", "?")
                rec.events.append(Event("launch", step, fn, conf, tuple(refs), name))
        return launch

    def _refs(self, args, step: int, e: int) -> list:
        refs = []
        for a in args:
            if _is_dev(a):
                refs.append(self.ref(a, e))
            elif isinstance(a, np.ndarray):
                self.refuse("passes a host array to a kernel (numba copies it both ways each launch)", step)
                refs.append(None)
            else:
                refs.append(Ref(obj=a))     # a scalar: the same every step (what varies is host work)
        return refs

    def __enter__(self):
        from numba import cuda
        if sim():
            from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray as Arr
            from numba.cuda.simulator.kernel import FakeCUDAKernel as Disp
        else:
            from numba.cuda.cudadrv.devicearray import DeviceNDArrayBase as Arr
            from numba.cuda.dispatcher import CUDADispatcher as Disp
        rec = self
        getitem = Disp.__getitem__

        def wrap(owner, name, make):
            orig = getattr(owner, name)
            self._patches.append((owner, name, orig))
            setattr(owner, name, make(orig))

        wrap(cuda, "device_array", lambda o: functools.wraps(o)(lambda *a, **k: rec._device_array(o, *a, **k)))
        wrap(cuda, "device_array_like", lambda o: functools.wraps(o)(lambda *a, **k: rec._device_array(o, *a, **k)))
        wrap(cuda, "to_device", lambda o: functools.wraps(o)(lambda *a, **k: rec._to_device(o, *a, **k)))
        wrap(Arr, "copy_to_device", lambda o: lambda arr, ary, *a, **k: rec._copy_to_device(o, arr, ary, *a, **k))
        wrap(Arr, "copy_to_host", lambda o: lambda arr, *a, **k: rec._copy_to_host(o, arr, *a, **k))
        wrap(Disp, "__getitem__", lambda o: lambda disp, cfg: rec._launch(disp, cfg, getitem))
        return self

    def __exit__(self, *exc):
        for owner, name, orig in reversed(self._patches):
            setattr(owner, name, orig)
        self._patches.clear()
        return False


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
