"""The CUDA target: binds each IR operator to its numba.cuda kernel.

The twin of `runtime/cpu.py`: the same operator names, the same signature
fn(node, inputs, state) -> list of arrays, with device arrays in and out. The
bindings both targets share are written once in `runtime/bindings.py` and
registered here with the CUDA kernel module; what follows is what CUDA does its
own way (losses with device scalars).
Parameters, activations, gradients and saved tensors all stay on the device;
a loss is a device scalar. Elementwise steps are generated (codegen, target "cuda").

Besides KERNELS, the executor needs a few array operations that differ between
targets; `ARRAYS` gathers them (see `executor.Target`).
"""
from __future__ import annotations

import numpy as np

from . import cuda_blas, cuda_graph, cuda_pool

cuda_graph.prepare()    # before numba.cuda is imported: kernels on a capturable stream (cuda_graph.py)

from netdsl.kernels import cuda as K  # noqa: E402
from netdsl.kernels.cpu.loss import scalar  # noqa: E402

from ..errors import NetdslError  # noqa: E402
from ..ir.dims import subs  # noqa: E402
from . import scan  # noqa: E402
from .bindings import _rows, register, registrar  # noqa: E402

cuda_pool.install()     # netdsl's caching allocator, before the first device allocation
BLAS = cuda_blas.install()  # NETDSL_CUDA_BLAS=1: GEMMs through cuBLAS (CuPy); None when in use, else why not

KERNELS = {}
kernel = registrar(KERNELS)
register(KERNELS, K, "CUDA")


class CudaArrays:
    """The array operations a scan needs (runtime/scan.py), on device arrays."""
    kernels = K
    empty = staticmethod(K.empty)
    zeros = staticmethod(K.zeros)

    @staticmethod
    def take(a, t):
        return K.slice_(a, (slice(None), t))

    @staticmethod
    def norm(a) -> float:
        return float(np.linalg.norm(a.copy_to_host()))

    @staticmethod
    def put(out, t, a):
        from netdsl.kernels.cuda.tensor import _strides, _view, copy_view
        off, vst, vshape = _view(out.shape, (slice(None), t))
        copy_view(a, 0, _strides(vshape), out, off, vst, vshape)

    @staticmethod
    def add(acc, a):
        from netdsl.kernels.cuda.tensor import _strides, copy_view
        st = _strides(a.shape)
        if acc is None:
            return copy_view(a, 0, st, K.empty(a.shape, a.dtype), 0, st, a.shape)
        return copy_view(a, 0, st, acc, 0, st, a.shape, accumulate=True)


scan.bind(KERNELS, "cuda", CudaArrays)


# ---- REINFORCE (ops/policy.py): host scalars, as on the CPU ([N, T] log-probabilities come down)

@kernel("reinforce")
def reinforce(n, x, st):
    logp, reward = x[0].copy_to_host(), x[1].copy_to_host()
    b = st.params[n.params["baseline"].name]
    bh = b.copy_to_host()
    R = -float(reward)
    adv = R - float(bh[0])
    st.saved[id(n)] = adv
    if st.train:
        d = n.attrs["decay"]
        bh[0] = d * bh[0] + (1 - d) * R
        b.copy_to_device(bh)
    return [K.to_device(np.asarray(-adv * logp.mean(dtype=np.float64), dtype=logp.dtype))]


@kernel("reinforce_grad")
def reinforce_grad(n, x, st):
    g, logp = scalar(x[0].copy_to_host()), x[1]
    return [K.full(logp.shape, -st.saved[id(n.fwd)] * g / logp.size, logp.dtype)]


# ---- losses (a loss node's output is a 0-d device array)

def _ce_2d(logits, labels):
    """Classes last, rows flat: [N, C], [N, T, C] or [N, C, H, W] -> [R, C]."""
    if logits.ndim == 4:
        return _rows(K.transpose(logits, (0, 2, 3, 1))), labels.reshape(labels.size)
    return _rows(logits), labels.reshape(labels.size)


@kernel("cross_entropy")
def cross_entropy(n, x, st):
    z, y = _ce_2d(x[0], x[1])
    loss, probs, count = K.softmax_cross_entropy(z, y, n.attrs["ignore_index"])
    st.saved[id(n)] = (probs, count)
    return [loss.reshape(())]


@kernel("cross_entropy_grad")
def cross_entropy_grad(n, x, st):
    gl, logits, labels = x[0], x[1], x[2]
    probs, count = st.saved[id(n.fwd)]
    gz = K.softmax_cross_entropy_backward(probs, labels.reshape(labels.size), count, gl, n.attrs["ignore_index"])
    if logits.ndim == 4:
        N, C, H, W = logits.shape
        return [K.transpose(gz.reshape((N, H, W, C)), (0, 3, 1, 2))]
    return [gz.reshape(logits.shape)]


# ---- what the executor needs besides kernels

def upload(a, dtype=None):
    return K.to_device(a, dtype)


def download(a) -> np.ndarray:
    return a.copy_to_host() if hasattr(a, "copy_to_host") else np.asarray(a)


def synchronize():
    from numba import cuda
    cuda.synchronize()


def all_finite(arrays) -> bool:
    return K.all_finite(list(arrays))


# ---- training on the device: optimiser steps and clipping without leaving it

class DeviceOptimizer:
    """Runs a `runtime.optim` optimiser's update on device parameters and gradients.

    The host optimiser (from `make_optimizer`, which checks the options) keeps the
    hyper-parameters, schedule and step count; its buffers live here on the device
    and come down only for `state_dict()` (checkpoints).
    `flat`: the model's `DeviceParams` (runtime/cuda_flat.py, `Model.flat`). When the
    parameters and gradients of a step are its views, the state is laid out the same
    way and one kernel launch updates every parameter; otherwise one per parameter.
    Either way each element sees the same arithmetic.
    """

    def __init__(self, host, params: dict, flat=None):
        from .optim import SGD, Adam
        if not isinstance(host, (SGD, Adam)):
            raise NetdslError(f"optimiser {type(host).__name__} has no CUDA update yet")
        self.host, self.params, self.flat = host, params, flat
        self.buffers: dict[str, dict] = {k: {} for k in host.state_keys}
        self._flat_state: dict = {}     # kind -> one buffer of flat's layout

    @property
    def steps(self):
        return self.host.steps

    @property
    def current_lr(self):
        return self.host.current_lr

    def _slot(self, kind: str, name: str, like):
        """The state array `kind` of parameter `name`, made (zeroed) on first need: a
        view of the kind's flat buffer where the parameter has a place in it."""
        bufs = self.buffers[kind]
        if name not in bufs:
            lay = self.flat.layout if self.flat is not None else None
            if lay is not None and name in lay.at and tuple(like.shape) == lay.shapes[name]:
                if kind not in self._flat_state:
                    self._flat_state[kind] = lay.buffer()
                bufs[name] = lay.view(self._flat_state[kind], name)
            else:
                bufs[name] = K.zeros(like.shape, like.dtype)
        return bufs[name]

    def _flat_ok(self, grads: dict) -> bool:
        """One launch for all: every parameter and gradient is a view of the flat buffers,
        and (SGD with momentum) either none or all of them have a momentum buffer."""
        if self.flat is None or not self.flat.holds(self.params, grads):
            return False
        mom = self.buffers.get("momentum")
        return not mom or (len(mom) == len(self.flat.layout.at) and "momentum" in self._flat_state)

    def step(self, grads: dict) -> None:
        from .optim import Adam
        h = self.host
        h.current_lr = lr = h.schedule(h.steps, h.lr)
        h.steps += 1
        if self._flat_ok(grads):
            f = self.flat
            kinds = self.buffers if isinstance(h, Adam) or h.momentum else ()
            first = bool(kinds) and not self.buffers[next(iter(kinds))]
            for kind in kinds:      # every parameter has its state now (the host makes it on a first gradient)
                for name in f.layout.at:
                    self._slot(kind, name, f.params[name])
            if isinstance(h, Adam):
                self._adam(h, lr, f.buf, f.grad_buf, self._flat_state["exp_avg"], self._flat_state["exp_avg_sq"])
            else:
                buf = self._flat_state["momentum"] if h.momentum else f.buf     # unused without momentum
                K.sgd_update(f.buf, f.grad_buf, buf, lr, h.momentum, h.dampening, h.weight_decay, first, h.nesterov)
            return
        for name, g in grads.items():
            p = self.params[name]
            if isinstance(h, Adam):
                self._adam(h, lr, p, g, self._slot("exp_avg", name, p), self._slot("exp_avg_sq", name, p))
            else:
                first = bool(h.momentum) and name not in self.buffers["momentum"]
                buf = self._slot("momentum", name, p) if h.momentum else p     # unused without momentum
                K.sgd_update(p, g, buf, lr, h.momentum, h.dampening, h.weight_decay, first, h.nesterov)

    @staticmethod
    def _adam(h, lr, p, g, m, v):
        step_size = lr / (1 - h.beta1 ** h.steps)
        K.adam_update(p, g, m, v, step_size, h.beta1, h.beta2, np.sqrt(1 - h.beta2 ** h.steps), h.eps,
                      0.0 if h.decoupled else h.weight_decay, 1 - lr * h.weight_decay if h.decoupled else 1.0)

    def state_dict(self) -> dict:
        self.host.state = {k: {n: download(b) for n, b in bufs.items()} for k, bufs in self.buffers.items()}
        return self.host.state_dict()

    def load_state_dict(self, state: dict, source: str = "optimiser state") -> None:
        self.host.load_state_dict(state, source)
        self.buffers, self._flat_state = {k: {} for k in self.host.state_keys}, {}
        for kind, bufs in self.host.state.items():
            for n, b in bufs.items():
                self._slot(kind, n, b).copy_to_device(np.ascontiguousarray(b))


def clip_grad_norm(grads: dict, max_norm: float, flat=None) -> float:
    """`runtime.optim.clip_grad_norm` on device gradients: only the norm comes down.
    With the model's `flat` (cuda_flat.DeviceParams) holding every gradient, the norm is
    one reduction over its buffer and the scaling one kernel."""
    arrays = [flat.grad_buf] if flat is not None and flat.holds_grads(grads) else list(grads.values())
    total = K.global_norm(arrays)
    coef = min(max_norm / (total + 1e-6), 1.0)
    if coef < 1.0:
        for g in arrays:
            K.scale(g, coef)
    return total


# ---- device memory of a training step (for `netdsl compile --device cuda`)

def device_memory(graph, dims: dict, optimizer: str = "sgd", momentum: bool = True, itemsize: int = 4) -> dict:
    """Bytes of device memory one training step needs, by kind:
    params (parameters and buffers), grads, optimizer (momentum: 1 buffer per trainable
    parameter, adam/adamw: 2), activations (the plan's peak of live intermediates,
    after liveness release and in-place reuse), workspace (the largest im2col buffer),
    and total. `dims` must give every symbolic dimension (e.g. {"N": 64})."""
    import math as _m
    from .. import autodiff
    from ..plan import plan
    from netdsl.kernels.cuda.gemm import COLS_BYTES
    tg = autodiff.build(graph)
    p = plan(tg.nodes, tg.keep(), dims, norms="heads")     # as the CUDA executor plans
    size = {n: _m.prod(int(d) for d in prm.shape) for n, prm in graph.params.items()}
    params = sum(size.values()) * itemsize
    grads = sum(s for n, s in size.items() if graph.params[n].role != "buffer") * itemsize
    slots = {"sgd": 1 if momentum else 0, "adam": 2, "adamw": 2}.get(optimizer.lower(), 2)
    workspace = 0
    for n in tg.nodes:
        if n.op in ("conv", "conv_grad", "conv_transpose", "conv_transpose_grad"):
            fwd = n.fwd or n
            x = fwd.inputs[0] if fwd.op == "conv" else fwd.outputs[0]
            y = fwd.outputs[0] if fwd.op == "conv" else fwd.inputs[0]
            w = fwd.params["weight"].shape
            N, C = (int(subs(d, dims)) for d in x.shape[:2])
            L = _m.prod(int(subs(d, dims)) for d in y.shape[2:])
            per = C * int(w[2]) * int(w[3]) * L * itemsize
            if (int(w[2]), int(w[3])) != (1, 1) or n.attrs.get("s") not in (1, (1, 1)):
                workspace = max(workspace, per * max(1, min(N, COLS_BYTES // max(per, 1))))
    out = {"params": params, "grads": grads, "optimizer": slots * grads, "activations": p.peak_planned,
           "workspace": workspace}
    out["total"] = sum(out.values())
    return out


def gpu_available() -> bool:
    from numba import cuda
    try:
        return bool(cuda.is_available())
    except Exception:   # a broken driver install counts as no GPU
        return False


def require_gpu() -> None:
    """A NetdslError (exit 2, no traceback) when no CUDA device can be used."""
    if not gpu_available():
        raise NetdslError("--device cuda: no CUDA GPU is available on this machine (numba.cuda found no "
                          "device or driver)", hint="use --device cpu, or run on a machine with an NVIDIA GPU")
