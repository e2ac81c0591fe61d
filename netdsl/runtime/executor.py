"""Runs a plan on a target (CPU or CUDA): binds each step to a kernel and manages buffers.

Hand-written kernels come from `runtime/cpu.py` or `runtime/cuda.py` (same operator
names, same signature); elementwise steps (single nodes or fused groups) become one
generated kernel each (`netdsl.kernels.codegen`, rendered for the target). Values are
released after their last use, as the plan says. On CUDA every value is a device array.
"""
from __future__ import annotations

import os
import time
import zlib

import numpy as np

from ..errors import NetdslError
from ..ir.dims import subs
from ..ir.graph import Value
from ..ops.elementwise import SCALAR
from ..plan import Plan, Step, plan
from . import cpu


class RunState:
    """What kernels see besides their inputs: parameters, phase, saved tensors, seeds."""

    def __init__(self, params: dict, dims: dict, train: bool, seed: int = 0, dtype=np.float32):
        self.params, self.dims, self.train, self.seed, self.dtype = params, dims, train, seed, dtype
        self.saved: dict = {}
        self.step = 0

    def shape_of(self, v: Value) -> tuple:
        return tuple(int(subs(d, self.dims)) for d in v.shape)

    def seed_for(self, node) -> int:
        """Dropout seeds: a function of run seed, step and node, so runs repeat exactly."""
        return zlib.crc32(f"{self.seed}:{self.step}:{node.path}".encode())


class Target:
    """What differs between devices: the kernel table, the code generator's target,
    moving arrays (upload / download / broadcast copies) and waiting for the device."""

    def __init__(self, name: str = "cpu"):
        self.name = name
        if name == "cuda":
            from . import cuda
            self.table, self.upload, self.download, self.broadcast, self.sync = \
                cuda.KERNELS, cuda.upload, cuda.download, cuda.broadcast, cuda.synchronize
        else:
            self.table = cpu.KERNELS
            self.upload = lambda a, dtype=None: a
            self.download = np.asarray
            self.broadcast = lambda a, shape: np.ascontiguousarray(np.broadcast_to(a, shape))
            self.sync = lambda: None


class Program:
    def __init__(self, nodes, keep: list[Value], dims: dict, fuse: bool = True, target: str = "cpu"):
        self.plan: Plan = plan(nodes, keep, dims, fuse)
        self.kernels: dict[int, object] = {}
        self.profile: dict | None = {} if os.environ.get("NETDSL_PROFILE") else None   # seconds per op
        self.target = Target(target)
        for s in self.plan.steps:
            if not s.fused and s.nodes[0].op not in self.target.table:
                n = s.nodes[0]
                raise NetdslError(f"operator '{n.op}' has no {target.upper()} kernel yet ({n.path})", n.pos)

    def run(self, st: RunState, feeds: dict[int, np.ndarray], check: bool = False) -> dict[int, np.ndarray]:
        """Execute every step; with check, stop at the first step producing NaN/inf
        and return its node under the key 'nonfinite'."""
        env = dict(feeds)
        params = st.params
        prof = self.profile
        table, download, sync = self.target.table, self.target.download, self.target.sync
        for s, free in zip(self.plan.steps, self.plan.free_after):
            ins = [params[v.param] if v.param is not None else env[id(v)] for v in s.inputs]
            if prof is not None:
                sync()     # a device runs asynchronously: time each step to its end
            t0 = time.perf_counter() if prof is not None else 0.0
            if s.fused:
                outs = self._elementwise(s, ins)
            else:
                outs = table[s.nodes[0].op](s.nodes[0], ins, st)
            if prof is not None:
                sync()
                key = "elementwise" if s.fused else s.nodes[0].op
                prof[key] = prof.get(key, 0.0) + time.perf_counter() - t0
            for v, a in zip(s.outputs, outs):
                env[id(v)] = a
                if check and a.dtype.kind == "f" and not np.isfinite(download(a)).all():
                    return {"nonfinite": s.nodes[-1]}
            for v in free:
                env.pop(id(v), None)
        return env

    def first_nonfinite(self, st: RunState, feeds):
        return self.run(st, feeds, check=True).get("nonfinite")

    # ---- elementwise steps

    def _elementwise(self, s: Step, ins):
        k = self.kernels.get(id(s))
        if k is None:
            k = self.kernels[id(s)] = _compile(s, ins, self.target.name)
        fn, layouts, axis = k
        args = [a if l == "full" else a.reshape(a.size) for a, l in zip(ins, layouts)]
        shape = ins[[i for i, l in enumerate(layouts) if l == "full"][0]].shape
        args = [self.target.broadcast(a, shape) if l == "bcast" else a for a, l in zip(args, layouts)]
        return list(fn(*args, axis=axis))


def _layout(v: Value, shape) -> tuple[str, int]:
    """How an input of an elementwise step is read: full, per-channel, scalar, or broadcast."""
    if tuple(v.shape) == tuple(shape):
        return "full", 1
    if all(d == 1 for d in v.shape):
        return "scalar", 1
    lead = len(shape) - len(v.shape)
    dims = (1,) * lead + tuple(v.shape)
    axes = [i for i, d in enumerate(dims) if d != 1]
    if len(axes) == 1 and dims[axes[0]] == shape[axes[0]]:
        return "channel", axes[0]
    return "bcast", 1


def _compile(s: Step, ins, target: str = "cpu"):
    from netdsl.kernels.codegen import Fused, compile_kernel
    shape = tuple(s.nodes[-1].outputs[0].shape)
    lay = [_layout(v, shape) for v in s.inputs]
    axes = {ax for l, ax in lay if l == "channel"}
    if len(axes) > 1:   # channels along different axes: materialise them instead
        lay = [("bcast", 1) if l == "channel" else (l, ax) for l, ax in lay]
    layouts = [l for l, _ in lay]
    axis = next(iter(axes)) if len(axes) == 1 else 1
    ref: dict[int, object] = {id(v): f"x{i}" for i, v in enumerate(s.inputs)}
    nodes = []
    for n in s.nodes:
        if n.op == "ew_grad":
            # the generator's gradient ops take (g, *uses), exactly as ew_grad nodes do
            op, args = f"{n.attrs['of']}'{n.attrs['wrt']}", [ref[id(v)] for v in n.inputs]
        else:
            op, args = n.op, [ref[id(v)] for v in n.inputs]
        attrs = {a.name: n.attrs[a.name] for a in SCALAR[op.split("'")[0]][3]}
        nodes.append((op, *args, attrs))
        ref[id(n.outputs[0])] = len(nodes) - 1
    outputs = [ref[id(v)] for v in s.outputs]
    f = Fused.build({f"x{i}": ("full" if l == "bcast" else l) for i, l in enumerate(layouts)}, nodes, outputs)
    dtype = next(a.dtype for a in ins if a.dtype.kind == "f")   # the run's precision, f32 or f64
    return compile_kernel(f, dtype, target), layouts, axis
