"""Runs a plan on a target (CPU or CUDA): binds each step to a kernel and manages buffers.

Hand-written kernels come from `runtime/cpu.py` or `runtime/cuda.py` (same operator
names, same signature); elementwise steps (single nodes or fused groups) become one
generated kernel each (`netdsl.kernels.codegen`, rendered for the target). Values are
released after their last use, as the plan says; on the CPU, kernels that can write
into given buffers get them from the model's workspace at the offsets of `arena.layout`.
On CUDA every value is a device array.
"""
from __future__ import annotations

import functools
import math
import os
import time
import zlib

import numpy as np

from ..errors import NetdslError, Note
from ..ir.dims import subs
from ..ir.graph import Value, walk
from ..ops import not_runnable
from ..plan import Plan, Step, plan
from .arena import Layout, Workspace, layout
from .bindings import DTYPES, array_dtype
from .fused import FusedStep


class RunState:
    """What kernels see besides their inputs: parameters, phase, saved tensors, seeds."""

    def __init__(self, params: dict, dims: dict, train: bool, seed: int = 0, dtype=np.float32):
        self.params, self.dims, self.train, self.seed, self.dtype = params, dims, train, seed, dtype
        self.saved: dict = {}
        self.step = 0
        self.fuse = True          # the planner's optimisations (Model(fuse=False) turns them off)
        self.carry_in: dict = {}  # carry path -> array replacing a scan's initial state (runtime/scan.py)
        self.grad_ready = None    # called (values, arrays) after each step (distributed.py starts allreduces)

    def shape_of(self, v: Value) -> tuple:
        return tuple(int(subs(d, self.dims)) for d in v.shape)

    def seed_for(self, node) -> int:
        """Dropout seeds: a function of run seed, step and node, so runs repeat exactly."""
        return zlib.crc32(f"{self.seed}:{self.step}:{node.path}".encode())


class Target:
    """What differs between devices: the kernel table, the code generator's target,
    moving arrays (upload / download) and waiting for the device. (Broadcast operands
    need no copies: generated kernels read them in place.)"""

    def __init__(self, name: str = "cpu"):
        self.name = name
        self._table = None
        if name == "cuda":
            from . import cuda
            self._table, self.upload, self.download, self.sync = \
                cuda.KERNELS, cuda.upload, cuda.download, cuda.synchronize
        else:
            self.upload = lambda a, dtype=None: a
            self.download = np.asarray
            self.sync = lambda: None

    @property
    def table(self) -> dict:
        """Operator -> kernel binding. The CPU table is imported on first use: it loads
        Numba and every kernel module, which a Model does not need until it runs."""
        if self._table is None:
            from . import cpu
            self._table = cpu.KERNELS
        return self._table


def check_runnable(nodes) -> None:
    """A NetdslError at the first node whose operator cannot run yet (its registry entry
    says why: no kernels in this version), before anything is planned or allocated."""
    for n in walk(nodes):
        why = not_runnable(n)
        if why is not None:
            calls = [Note(f"in {f.kind} '{f.callee}', called here", f.pos) for f in reversed(n.frames)
                     if f.kind in ("block", "step") and f.pos is not None]
            raise NetdslError(f"operator '{n.op}' cannot run yet ({n.path}): {why}", n.pos, notes=calls[:3],
                              hint="netdsl compile and netdsl render work for this network; running it "
                                   "needs kernels for every operator")


class Program:
    def __init__(self, nodes, keep: list[Value], dims: dict, fuse: bool = True, target: str = "cpu",
                 workspace: Workspace | None = None):
        check_runnable(nodes)
        # a norm heads a fused kernel on both targets; a norm gradient ends one on the CPU only
        # (on CUDA the generated per-channel sums take 3 launches, the hand-written gradient 2)
        self.plan: Plan = plan(nodes, keep, dims, fuse, norms=True if target == "cpu" else "heads")
        self.workspace = workspace if target == "cpu" else None
        self.layout: Layout | None = None
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
        views = self._workspace_views(st, table) if self.workspace is not None else None
        ready = None if check else getattr(st, "grad_ready", None)     # (a scan's StepState has none)
        for i, (s, free) in enumerate(zip(self.plan.steps, self.plan.free_after)):
            ins = [params[v.param] if v.param is not None else env[id(v)] for v in s.inputs]
            into = views[i] if views is not None else {}
            if prof is not None:
                sync()     # a device runs asynchronously: time each step to its end
            t0 = time.perf_counter() if prof is not None else 0.0
            if s.fused:
                outs = self._elementwise(s, ins, st, env, into)
            elif into:
                outs = table[s.nodes[0].op](s.nodes[0], ins, st, out=into)
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
            if ready is not None:
                ready(s.outputs, outs)
            for v in free:
                env.pop(id(v), None)
        return env

    def first_nonfinite(self, st: RunState, feeds):
        return self.run(st, feeds, check=True).get("nonfinite")

    def _workspace_views(self, st, table) -> list[dict]:
        """Per step, the workspace arrays its kernel writes into: laid out on the first
        run, made again only when the model's workspace buffer has grown."""
        if self.layout is None:
            self.layout = layout(self.plan, lambda s: "into" if s.fused else table[s.nodes[0].op].writes,
                                 lambda v: self._size(v, st))
        return self.workspace.views(self, self.layout.size, lambda buf: self.layout.views(
            buf, self.plan.steps, lambda v: (st.shape_of(v), self._dtype(v, st))))

    @staticmethod
    def _dtype(v: Value, st):
        return array_dtype(v.dtype, st.dtype)

    def _size(self, v: Value, st) -> int:
        """Bytes of v in this run (0: a dtype with no workspace slot)."""
        return math.prod(st.shape_of(v)) * np.dtype(self._dtype(v, st)).itemsize if v.dtype in DTYPES else 0

    # ---- elementwise steps

    def _elementwise(self, s: Step, ins, st, env, into: dict):
        k = self.kernels.get(id(s))
        if k is None:
            k = self.kernels[id(s)] = FusedStep(s, ins, self.target)
        if s.inplace and self.target.name == "cpu":
            into = {**into, **self._inplace(s, ins, env, st)}
        return k(ins, st, out=into or None)

    @functools.cached_property
    def _views(self) -> set[int]:
        """Values that kernels returning views of their inputs produce."""
        table = self.target.table
        return {id(v) for s in self.plan.steps if not s.fused and table[s.nodes[0].op].writes == "views"
                for v in s.outputs}

    def _inplace(self, s: Step, ins, env, st) -> dict:
        """Outputs that may overwrite a dying input: the planner proposes them; here we
        also make sure no live value that a kernel returned as a view (reshape, identity),
        and nothing a forward kernel saved for its backward, shares that buffer. Other
        live values have workspace slots apart from it, or arrays of their own: comparing
        with all of them cost a visible share of a batch-1 step."""
        saved = [b for x in st.saved.values() for b in (x if isinstance(x, tuple) else (x,))
                 if isinstance(b, np.ndarray)]
        out = {}
        for j, k in s.inplace.items():
            a, v = ins[k], s.inputs[k]
            others = [env[key] for key in self._views if key in env and key != id(v)] + saved
            if (v.param is None and isinstance(a, np.ndarray) and a.flags.c_contiguous and a.flags.writeable
                    and a.dtype.kind == "f" and not any(np.may_share_memory(a, b) for b in others)):
                out[j] = a
        return out
