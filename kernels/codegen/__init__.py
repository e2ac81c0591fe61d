"""Elementwise and fused kernels generated for CPU (Numba) and CUDA (numba.cuda).

One definition per operator (`netdsl.ops.elementwise.SCALAR`), one IR (`ir.Fused`),
one renderer per target (`cpu.py`, `cuda.py`), tinygrad-style. Generated modules
are files in the kernel cache (`netdsl.kernels.cache`), so Numba's on-disk cache
makes a second process start warm.

    f = Fused.build({"x": "full", "b": "channel"}, [("add", "x", "b"), ("relu", 0)], [1])
    y, = compile_kernel(f, np.float32)(x, b)               # bias + ReLU, one kernel
    gx, gb = compile_kernel(backward(f), np.float32)(x, b, gy)
    # its backward: one kernel, plus a per-channel sum of the row partials for gb
"""
from __future__ import annotations

import functools
import math

import numpy as np

from .. import cache
from . import cpu, cuda
from .ir import Fused, backward, broadcast_runs, lower, runs_of

__all__ = ["Fused", "backward", "broadcast_runs", "compile_kernel", "channel_sum", "Kernel", "TARGETS"]

TARGETS = {"cpu": cpu, "cuda": cuda}
DTYPES = (np.float32, np.float64)


def _module(target, source):
    return cache.load_source(source, prefix=f"netdsl_{target}")


class Kernel:
    """A generated kernel bound to its attribute values; call it on arrays.

    Full inputs must all have the same shape; a channel input has shape [C]
    with C = shape[axis]; a scalar input has one element; a "bcastK" input any
    shape that broadcasts to the full one (numpy rules), read in place. With no
    full input, `shape=` gives the full shape. Returns a tuple with one array
    per output: full outputs have the full shape, channel outputs shape [C],
    scalar outputs shape [1]. On CUDA, inputs may be host or device arrays and
    outputs are device arrays.
    """

    def __init__(self, fused: Fused, dtype, target: str):
        self.fused, self.dtype, self.target = fused, np.dtype(dtype), target
        if self.dtype not in map(np.dtype, DTYPES):
            raise TypeError(f"kernels are generated for float32 and float64, not {self.dtype}")
        self.backend = TARGETS[target]
        self.low = lower(fused)
        self.source = self.backend.render(self.low, self.dtype)
        self.module = _module(target, self.source)
        self.scalars = [self.dtype.type(v) for _, _, v in self.low.scalars]
        self._geo: dict = {}        # (input shapes, axis, shape) -> _geometry and _ints of them

    @property
    def dispatchers(self):
        """The Numba dispatchers of this kernel (serial/parallel on CPU)."""
        return [getattr(self.module, n) for n in dir(self.module) if n.startswith("kernel")]

    def _geometry(self, arrays, axis, shape=None):
        shapes = [tuple(a.shape) for a, (_, l) in zip(arrays, self.fused.inputs) if l == "full"]
        if shape is None:
            if not shapes:
                raise ValueError("a kernel without a full-shape input needs shape=")
            shape = shapes[0]
        shape = tuple(shape)
        if any(s != shape for s in shapes):
            raise ValueError(f"full inputs must share one shape {shape}, got {shapes}")
        n = math.prod(shape)
        if any(l == "channel" for _, l in self.fused.inputs + self.fused.outputs):
            C, Q = shape[axis], math.prod(shape[axis + 1:])
        else:   # only scalar reductions: one row per leading index
            C, Q = 1, (n // shape[0] if len(shape) > 1 and shape[0] else max(n, 1))
        for a, (name, l) in zip(arrays, self.fused.inputs):
            if l == "channel" and a.size != C:
                raise ValueError(f"channel input {name!r} has {a.size} elements, axis {axis} has {C}")
            if l == "scalar" and a.size != 1:
                raise ValueError(f"scalar input {name!r} has {a.size} elements")
        return shape, n, C, Q

    def _ints(self, arrays, shape):
        """The broadcast inputs' index runs, padded with empty ones (i // 1 % 1 * 0) where
        sizes of 1 at run time merge runs the layout counted apart."""
        runs = {}
        for j, (name, layout) in enumerate(self.fused.inputs):
            k = runs_of(layout)
            if k is None:
                continue
            try:
                r = broadcast_runs(shape, arrays[j].shape)
            except ValueError:
                raise ValueError(f"broadcast input {name!r} of shape {tuple(arrays[j].shape)} "
                                 f"does not broadcast to {shape}") from None
            if len(r) > k:
                raise ValueError(f"broadcast input {name!r} of shape {tuple(arrays[j].shape)} needs {len(r)} "
                                 f"index runs against {shape}; its layout {layout!r} has {k}")
            runs[j] = r + [(1, 1, 0)] * (k - len(r))
        it = self.backend.INDEX
        return [it(runs[j][r][("inner", "extent", "stride").index(w)]) for _, j, r, w in self.low.ints]

    def __call__(self, *arrays, axis: int = 1, out: dict | None = None, shape=None):
        """`out` maps full-output index -> a flat-able array to write into (in place:
        it may be one of the inputs, since every element is read before it is written)."""
        be, dt = self.backend, self.dtype
        if len(arrays) != len(self.fused.inputs):
            raise TypeError(f"kernel takes {len(self.fused.inputs)} arrays, got {len(arrays)}")
        arrays = [be.asarray(a, dt) for a in arrays]
        key = (tuple(a.shape for a in arrays), axis, shape)
        geo = self._geo.get(key)
        if geo is None:     # a recurrence calls a kernel T times with the same shapes: check them once
            shape, n, C, Q = self._geometry(arrays, axis, shape)
            geo = (shape, n, C, Q, self._ints(arrays, shape) if self.low.ints else [])
            if len(self._geo) > 64:
                self._geo.clear()
            self._geo[key] = geo
        shape, n, C, Q, ints = geo
        ins = [be.flat(a) for a in arrays]
        out = out or {}
        full = {j: be.flat(out[j]) if j in out else be.empty(n, dt)
                for j, (_, l) in enumerate(self.fused.outputs) if l == "full"}
        if not self.fused.reduces:
            be.launch(self.module, False, n, [n, C, Q, *ins, *self.scalars, *ints, *full.values()])
            return tuple(full[j].reshape(shape) for j in range(len(full)))
        R = n // Q
        parts = {j: be.empty(R, dt) for j, (_, l) in enumerate(self.fused.outputs) if l != "full"}
        be.launch(self.module, True, n, [R, C, Q, *ins, *self.scalars, *ints, *full.values(), *parts.values()])
        red = reductions(dt, self.target)
        outs = []
        for j, (_, layout) in enumerate(self.fused.outputs):
            if layout == "full":
                outs.append(full[j].reshape(shape))
            else:  # partials are [P, C] (channel) or [R] summed whole (scalar)
                c = C if layout == "channel" else 1
                out = be.empty(c, dt)
                be.channel_sum(red, parts[j], R // c, c, 1, out)
                outs.append(out)
        return tuple(outs)

    def ptx(self, cc=(8, 0)):
        """PTX for this kernel (CUDA target), compiled without a GPU."""
        from numba import cuda as nc, from_dtype, int64
        if self.target != "cuda":
            raise ValueError("ptx() is for CUDA kernels")
        arr, sc = from_dtype(self.dtype)[::1], from_dtype(self.dtype)
        n_out = len(self.fused.outputs)
        sig = ((int64,) * 3 + (arr,) * len(self.fused.inputs) + (sc,) * len(self.scalars)
               + (int64,) * len(self.low.ints) + (arr,) * n_out)
        return nc.compile_ptx(self.module.kernel.py_func, sig, cc=cc)[0]


_compiled: dict[tuple, Kernel] = {}


def compile_kernel(fused: Fused, dtype=np.float32, target: str = "cpu") -> Kernel:
    """The kernel for `fused`. Attribute values are runtime arguments, so fused
    chains differing only in them share one generated module and its machine code.
    Memoised: a network repeats a few chains many times (ResNet-50's 132 generated
    kernels are 7 distinct ones), and lowering and rendering one costs ~0.7 ms."""
    key = (fused, np.dtype(dtype), target)
    k = _compiled.get(key)
    if k is None:
        k = _compiled[key] = Kernel(fused, dtype, target)
    return k


@functools.lru_cache(maxsize=None)
def reductions(dtype, target: str = "cpu"):
    """The module holding `channel_sum` for one dtype and target (rendered and hashed
    once: per call that was ~0.1 ms, a third of a small norm-gradient step)."""
    return _module(target, TARGETS[target].render_reduce(np.dtype(dtype)))


def channel_sum(x, axis: int = 1, target: str = "cpu"):
    """Sum over every axis but `axis`: the gradient of a per-channel broadcast input."""
    be = TARGETS[target]
    x = be.asarray(x, x.dtype)
    shape = x.shape
    C, Q = shape[axis], math.prod(shape[axis + 1:])
    out = be.empty(C, x.dtype)
    be.channel_sum(reductions(x.dtype, target), be.flat(x), math.prod(shape[:axis]), C, Q, out)
    return out
