"""Recording one CUDA step as it runs (for runtime/cuda_arena.py's launch records).

While a program's step runs eagerly, `Recorder` wraps numba.cuda's entry points (its
`device_array` / `device_array_like` / `to_device`, device arrays' `copy_to_device` /
`copy_to_host`, and the kernels' `__getitem__`) and keeps, tagged with the plan step
running: every allocation (pointer, size), every launch (the compiled kernel numba picked,
caught from numba's pre-launch callback, its configuration and arguments) and every device
copy. An array argument is resolved at its launch to the allocation it lies in and its byte
offset, against the allocations alive then (memory handed out again means the previous
owner died), so nothing of the step's memory is held. What a replay could not repeat
(reading back to the host, an upload outside the constant index tables, a host array given
to a kernel, memory that is neither the step's nor given to it) refuses the records with
the reason; a failure of the bookkeeping itself does too, and never breaks the step.
"""
from __future__ import annotations

import bisect
import functools
import math
import os
import sys
import threading

import numpy as np

# operators whose only host work is uploading index tables that depend on shapes alone
CONSTANT_UPLOADS = {"transpose", "concat", "split", "slice", "slice_grad", "pad", "cross_entropy",
                    "cross_entropy_grad", "scan", "scan_grad", "coords"}


def sim() -> bool:
    return os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"

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
