"""Fused elementwise steps: a plan step's nodes become one generated kernel.

A step is a chain of elementwise nodes (and their `ew_grad` gradients), optionally
headed by a batch norm (its per-channel apply, (x - mean) * gamma * invstd + beta, is
elementwise once the statistics are known: norm-apply + ReLU is one kernel; on CUDA the
statistics and the factor gamma * invstd come from one launch before it) or ended
by a batch norm's gradient (ReLU' + the norm's backward: one kernel reducing the two
per-channel sums, one kernel writing the input gradient). Everything is rendered by
`netdsl.kernels.codegen` from the scalar definitions, so no target writes it by hand.
"""
from __future__ import annotations

import numpy as np

from ..ir.graph import Value
from ..ops.elementwise import SCALAR
from ..plan import Step
from .bindings import _outs


def _layout(v: Value, shape) -> tuple[str, int]:
    """How an input of an elementwise step is read (codegen.ir's input layouts): full,
    per-channel, scalar, or any other broadcast read in place ("bcastK")."""
    from netdsl.kernels.codegen import broadcast_runs
    if tuple(v.shape) == tuple(shape):
        return "full", 1
    if all(d == 1 for d in v.shape):
        return "scalar", 1
    lead = len(shape) - len(v.shape)
    dims = (1,) * lead + tuple(v.shape)
    axes = [i for i, d in enumerate(dims) if d != 1]
    if len(axes) == 1 and dims[axes[0]] == shape[axes[0]]:
        return "channel", axes[0]
    return _bcast(len(broadcast_runs(shape, v.shape))), 1


def _bcast(k: int) -> str:
    return f"bcast{max(k, 1)}"


class FusedStep:
    """One step's generated kernel(s), bound to the step; call with the step's inputs."""

    def __init__(self, s: Step, ins, target):
        from netdsl.kernels.codegen import Fused, compile_kernel
        self.s, self.target = s, target
        self.head = s.nodes[0] if s.nodes[0].op == "bn" else None
        self.tail = s.nodes[-1] if s.nodes[-1].op == "bn_grad" else None
        body = s.nodes[1 if self.head else 0:len(s.nodes) - (1 if self.tail else 0)]
        shape = tuple((self.head or body[-1]).outputs[0].shape) if (self.head or body) else None
        if self.tail:
            shape = tuple(self.tail.inputs[0].shape)
        # the inputs the kernel reads (a norm gradient's parameters are read on the host)
        read = {id(v) for n in body for v in n.inputs}
        read |= {id(self.head.inputs[0])} if self.head else set()
        read |= {id(v) for v in self.tail.inputs[:2]} if self.tail else set()
        self.used = [i for i, v in enumerate(s.inputs) if id(v) in read]
        lay = [_layout(s.inputs[i], shape) for i in self.used]
        axes = {ax for l, ax in lay if l == "channel"}
        if len(axes) > 1 or (axes and (self.head or self.tail) and axes != {1}):
            lay = [(_bcast(1), 1) if l == "channel" else (l, ax) for l, ax in lay]   # one channel axis a kernel
        self.layouts = [l for l, _ in lay]
        self.axis = next(iter(axes)) if len(axes) == 1 and not (self.head or self.tail) else 1
        self.shape = shape if not any(l == "full" for l in self.layouts) else None   # else the kernel's full inputs give it
        inputs = {f"x{i}": l for i, l in enumerate(self.layouts)}
        ref: dict[int, object] = {id(s.inputs[i]): f"x{j}" for j, i in enumerate(self.used)}
        nodes = []

        def emit(op, *args, **attrs):
            nodes.append((op, *args, attrs))
            return len(nodes) - 1

        if self.head:        # y = (x - mean) * a + b with per-channel mean, a = gamma*invstd, b = beta
            inputs.update(bn_m="channel", bn_a="channel", bn_b="channel")
            x = ref[id(self.head.inputs[0])]
            ref[id(self.head.outputs[0])] = emit("add", emit("mul", emit("sub", x, "bn_m"), "bn_a"), "bn_b")
        for n in body:
            if n.op == "ew_grad":   # the generator's gradient ops take (g, *uses), as ew_grad nodes do
                op = f"{n.attrs['of']}'{n.attrs['wrt']}"
            else:
                op = n.op
            attrs = {a.name: n.attrs[a.name] for a in SCALAR[op.split("'")[0]][3]}
            ref[id(n.outputs[0])] = emit(op, *(ref[id(v)] for v in n.inputs), **attrs)
        dtype = next(a.dtype for a in ins if a.dtype.kind == "f")   # the run's precision
        build = lambda inp, outs: compile_kernel(Fused.build(inp, list(nodes), outs), dtype, target.name)
        if not self.tail:
            self.kernel = build(inputs, [ref[id(v)] for v in s.outputs])
            return
        # gradient of batch norm fed by the chain's result g:
        #   pass 1: sum(g) and sum(g * (x - mean)) per channel
        #   pass 2: gx = k * (g - sum(g)/M - (x - mean) * mx)
        g, x = ref[id(self.tail.inputs[0])], ref[id(self.tail.inputs[1])]
        base = len(nodes)
        inputs["bn_m"] = "channel"
        d = emit("sub", x, "bn_m")
        self.sums = build(dict(inputs), [(g, "channel"), (emit("mul", g, d), "channel")])
        del nodes[base + 1:]
        for k in ("bn_k", "bn_mg", "bn_mx"):
            inputs[k] = "channel"
        gx = emit("mul", emit("sub", emit("sub", g, "bn_mg"), emit("mul", d, "bn_mx")), "bn_k")
        self.gx = build(inputs, [gx])

    def _args(self, ins):
        """The kernel's arrays: channel and scalar inputs flat, the rest as they are
        (a broadcast input keeps its shape, from which the kernel takes its geometry)."""
        return [ins[i] if l == "full" or l.startswith("bcast") else ins[i].reshape(ins[i].size)
                for i, l in zip(self.used, self.layouts)]

    def __call__(self, ins, st, out=None):
        args = self._args(ins)
        if self.head:
            args += self._norm_apply(ins, st)
        if not self.tail:
            shape = None if self.shape is None else st.shape_of(self.s.outputs[0])
            return list(self.kernel(*args, axis=self.axis, out=out, shape=shape))
        return self._norm_grad(args, ins, st, out or {})

    def _norm_apply(self, ins, st):
        from netdsl.kernels import cpu as K
        n = self.head
        x = ins[self.s.inputs.index(n.inputs[0])]
        p = {r: st.params[q.name] for r, q in n.params.items()}
        C = x.shape[1]
        if self.target.name == "cuda":
            return self._norm_apply_cuda(n, x, p, st)
        if st.train and n.fwd is not None:   # a replay in the backward (remat.py)
            mean, invstd = st.saved[id(n.fwd)]
        elif st.train:
            mean, invstd = K.batchnorm_stats(x, p["running_mean"], p["running_var"], n.attrs["momentum"],
                                             n.attrs["eps"])
            st.saved[id(n)] = (mean, invstd)
        else:
            mean = p["running_mean"].astype(x.dtype)
            invstd = (1.0 / np.sqrt(p["running_var"].astype(np.float64) + n.attrs["eps"])).astype(x.dtype)
        gamma = p["weight"] if "weight" in p else np.ones(C, x.dtype)
        beta = p["bias"] if "bias" in p else np.zeros(C, x.dtype)
        return [mean, (gamma * invstd).astype(x.dtype), beta.astype(x.dtype, copy=False)]

    @staticmethod
    def _norm_apply_cuda(n, x, p, st):
        """The CPU's (mean, gamma * invstd, beta) on the device: the batch statistics and
        the factor in one launch (a replay or inference: the factor in one tiny launch)."""
        from netdsl.kernels import cuda as K
        gamma = p.get("weight")
        if st.train and n.fwd is not None:   # a replay in the backward (remat.py)
            mean, invstd = st.saved[id(n.fwd)]
            _, a = K.batchnorm_scale(gamma, invstd=invstd)
        elif st.train:
            mean, invstd, a = K.batchnorm_stats_scale(x, gamma, p["running_mean"], p["running_var"],
                                                      n.attrs["momentum"], n.attrs["eps"])
            st.saved[id(n)] = (mean, invstd)
        else:
            mean = p["running_mean"]
            _, a = K.batchnorm_scale(gamma, running_var=p["running_var"], eps=n.attrs["eps"])
        beta = p["bias"] if "bias" in p else K.zeros(x.shape[1], x.dtype)
        return [mean.reshape(mean.size), a, beta.reshape(beta.size)]

    def _norm_grad(self, args, ins, st, out):
        n, fwd = self.tail, self.tail.fwd
        x = ins[self.s.inputs.index(n.inputs[1])]
        mean, invstd = st.saved[id(fwd)]
        sg, sgx = self.sums(*args, mean, axis=1)
        C = x.shape[1]
        M = x.size // C
        gamma = st.params[fwd.params["weight"].name] if "weight" in fwd.params else np.ones(C, x.dtype)
        sgx = sgx * invstd                          # = sum(g * xhat): the scale's gradient
        grads = {"weight": sgx, "bias": sg}
        gins = {}
        if n.attrs["ngrads"] in n.attrs["like"]:   # the input's gradient is wanted
            dt = x.dtype.type
            j = next(j for j, v in enumerate(self.s.outputs) if v is n.outputs[0])   # gx may go in place
            gins[0], = self.gx(*args, mean, gamma * invstd, sg / dt(M), sgx / dt(M) * invstd, axis=1,
                               out={0: out[j]} if j in out else None)
        return _outs(n, gins, grads)
