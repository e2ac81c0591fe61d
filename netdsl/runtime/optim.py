"""Optimisers, learning-rate schedules and gradient clipping, in numpy.

Semantics follow torch.optim (single-tensor CPU path) operation for operation, so a
run can be checked against PyTorch. Parameters are a dict name -> float32 array and
are updated in place; hyper-parameters are cast to float32 before touching an array
so float32 stays float32. Optimiser state is a flat dict of arrays (checkpointable).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import NetdslError
from . import construct, lookup
from netdsl.kernels.cpu import optim as K

F32 = np.float32


# ---------------------------------------------------------------- schedules
# A schedule maps (steps already taken, base lr) -> lr for the next step, like a torch
# LRScheduler stepped once per optimiser step. Being a pure function of the step count,
# it needs no state of its own in a checkpoint.

@dataclass(frozen=True)
class Constant:
    def __call__(self, step: int, base_lr: float) -> float:
        return base_lr


@dataclass(frozen=True)
class Step:
    step_size: int
    gamma: float = 0.1

    def __call__(self, step: int, base_lr: float) -> float:
        return base_lr * self.gamma ** (step // self.step_size)


@dataclass(frozen=True)
class MultiStep:
    milestones: tuple[int, ...]
    gamma: float = 0.1

    def __call__(self, step: int, base_lr: float) -> float:
        return base_lr * self.gamma ** sum(1 for m in self.milestones if step >= m)


@dataclass(frozen=True)
class Cosine:
    t_max: int
    eta_min: float = 0.0

    def __call__(self, step: int, base_lr: float) -> float:
        # torch's closed form; past t_max it rises again exactly as torch's does.
        return self.eta_min + (base_lr - self.eta_min) * (1 + math.cos(math.pi * step / self.t_max)) / 2


@dataclass(frozen=True)
class Warmup:
    """Linear warm-up multiplied onto another schedule (torch: ChainedScheduler of
    LinearLR(start_factor, 1.0, steps) and the inner scheduler)."""
    inner: object
    steps: int
    start_factor: float = 1e-3

    def __call__(self, step: int, base_lr: float) -> float:
        frac = min(step, self.steps) / self.steps
        return self.inner(step, base_lr) * (self.start_factor + (1 - self.start_factor) * frac)


_SCHEDULES = {"constant": Constant, "step": Step, "multistep": MultiStep, "cosine": Cosine}


def make_schedule(name: str, warmup_steps: int = 0, warmup_start_factor: float = 1e-3, **kwargs):
    """Build a schedule by name; `warmup_steps > 0` wraps it in a linear warm-up."""
    cls = lookup("learning-rate schedule", name, _SCHEDULES)
    if "milestones" in kwargs:
        kwargs["milestones"] = tuple(sorted(int(m) for m in kwargs["milestones"]))
    sched = construct(f"learning-rate schedule '{name}'", cls, kwargs)
    for field, low in (("step_size", 1), ("t_max", 1)):
        if getattr(sched, field, low) < low:
            raise NetdslError(f"schedule '{name}': {field} must be at least {low}, got {getattr(sched, field)}")
    if warmup_steps < 0:
        raise NetdslError(f"warm-up steps must not be negative, got {warmup_steps}")
    if warmup_steps:
        if not 0 < warmup_start_factor <= 1:
            raise NetdslError(f"warm-up start factor must be in (0, 1], got {warmup_start_factor}")
        sched = Warmup(sched, int(warmup_steps), float(warmup_start_factor))
    return sched


# ---------------------------------------------------------------- clipping

def clip_grad_norm(grads: dict[str, np.ndarray], max_norm: float) -> float:
    """Scale all gradients in place so their global L2 norm is at most `max_norm`.

    Returns the norm before clipping (inf/nan included, so the caller can skip the
    step), as torch.nn.utils.clip_grad_norm_ does, with the same 1e-6 guard.
    """
    # float64 accumulation without a float64 copy: exact where a float32 dot drifts ~1e-5.
    total = math.sqrt(sum(float(np.einsum("i,i->", g.ravel(), g.ravel(), dtype=np.float64))
                          for g in grads.values()))
    coef = min(max_norm / (total + 1e-6), 1.0)
    if coef < 1.0:  # torch multiplies by 1.0 too, which changes nothing
        for g in grads.values():
            g *= g.dtype.type(coef)
    return total


# ---------------------------------------------------------------- optimisers

class Optimizer:
    """Holds a reference to the parameter dict; `step(grads)` updates it in place.

    `lr` is the base learning rate; the rate used for a step is
    `schedule(steps_taken, lr)` and is left in `current_lr` for logging.
    Gradients missing from `grads` leave their parameter untouched (torch: grad None).
    """
    state_keys: tuple[str, ...] = ()

    def __init__(self, params: dict[str, np.ndarray], lr: float, schedule=None):
        if lr < 0:
            raise NetdslError(f"learning rate must not be negative, got {lr}")
        self.params = params
        self.lr = float(lr)
        self.schedule = schedule or Constant()
        self.steps = 0
        self.current_lr = self.schedule(0, self.lr)
        self.state: dict[str, dict[str, np.ndarray]] = {k: {} for k in self.state_keys}

    def step(self, grads: dict[str, np.ndarray]) -> None:
        unknown = set(grads) - set(self.params)
        if unknown:  # a bug in the caller, not something a user wrote
            raise KeyError(f"gradients for unknown parameters: {sorted(unknown)}")
        self.current_lr = lr = self.schedule(self.steps, self.lr)
        self.steps += 1
        for name, g in grads.items():
            p = self.params[name]
            if g.shape != p.shape:
                raise ValueError(f"gradient for {name} has shape {g.shape}, parameter {p.shape}")
            self._update(name, p, g, lr)

    def _update(self, name: str, p: np.ndarray, g: np.ndarray, lr: float) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, np.ndarray]:
        """Flat arrays: 'step' and '<buffer>/<param name>' for every buffer."""
        out = {"step": np.array(self.steps, dtype=np.int64)}
        for kind, bufs in self.state.items():
            out.update({f"{kind}/{n}": b for n, b in bufs.items()})
        return out

    def load_state_dict(self, state: dict[str, np.ndarray], source: str = "optimiser state") -> None:
        """Restore buffers (copied) after checking the whole state; on any problem one
        NetdslError "<source> (optimiser state) is damaged: ..." and nothing changes.
        `source` names where the state came from ("checkpoint PATH")."""
        problems = self.state_problems(state)
        if problems:
            shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
            where = "optimiser state" if source == "optimiser state" else f"{source} (optimiser state)"
            raise NetdslError(f"{where} is damaged: {shown}")
        self.steps = int(state["step"])
        self.current_lr = self.schedule(self.steps, self.lr)
        self.state = {kind: {} for kind in self.state_keys}
        for key, arr in state.items():
            if key != "step":
                kind, _, name = key.partition("/")
                self.state[kind][name] = np.array(arr, dtype=self.params[name].dtype, copy=True)

    def state_problems(self, state: dict[str, np.ndarray]) -> list[str]:
        """What keeps `state` from being this optimiser's: a 0-d integer 'step' >= 0 and
        '<buffer>/<param>' float arrays shaped like their parameter. Buffers are made
        lazily (on a parameter's first gradient), so a parameter may have none, but
        then none of its kinds."""
        state = {k: np.asarray(v) for k, v in state.items()}
        out, kinds_of = [], {}
        step = state.get("step")
        if step is None:
            out.append(f"no 'step' entry; not state saved by {type(self).__name__}")
        elif step.shape != () or step.dtype.kind not in "iu" or not 0 <= int(step) < 2 ** 63:
            out.append(f"'step' is {step.dtype} {list(step.shape)}"
                       + (f" = {int(step)}" if step.size == 1 and step.dtype.kind in "iu" else "")
                       + ", expected one integer >= 0")
        for key, arr in state.items():
            if key == "step":
                continue
            kind, _, name = key.partition("/")
            if kind not in self.state_keys:
                keeps = ", ".join(self.state_keys) or "no buffers"
                out.append(f"'{key}': {type(self).__name__} keeps {keeps}; saved by another optimiser?")
            elif name not in self.params:
                out.append(f"'{key}' is for a parameter the network does not train")
            else:
                kinds_of.setdefault(name, set()).add(kind)
                if arr.dtype.kind != "f":
                    out.append(f"'{key}' is {arr.dtype}, expected floating point")
                elif arr.shape != self.params[name].shape:
                    out.append(f"'{key}' has shape {arr.shape}, its parameter {self.params[name].shape}")
        out += [f"'{name}' has {', '.join(sorted(k))} but not {', '.join(sorted(set(self.state_keys) - k))}"
                for name, k in sorted(kinds_of.items()) if k != set(self.state_keys)]
        return out


class SGD(Optimizer):
    """torch.optim.SGD: weight decay, momentum with dampening, Nesterov."""
    state_keys = ("momentum",)

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, schedule=None):
        super().__init__(params, lr, schedule)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise NetdslError("Nesterov momentum needs momentum > 0 and dampening = 0")
        if momentum < 0 or weight_decay < 0:
            raise NetdslError("momentum and weight decay must not be negative")
        self.momentum, self.dampening = momentum, dampening
        self.weight_decay, self.nesterov = weight_decay, nesterov

    def _update(self, name, p, g, lr):
        bufs = self.state["momentum"]
        first = bool(self.momentum) and name not in bufs
        if first:
            bufs[name] = np.empty_like(p)
        K.sgd_update(p, g, bufs.get(name, p), lr, self.momentum, self.dampening, self.weight_decay, first,
                     self.nesterov)


class Adam(Optimizer):
    """torch.optim.Adam (L2 weight decay added to the gradient); AdamW decouples it."""
    state_keys = ("exp_avg", "exp_avg_sq")
    decoupled = False

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, schedule=None):
        super().__init__(params, lr, schedule)
        b1, b2 = betas
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise NetdslError(f"Adam betas must lie in [0, 1), got {tuple(betas)}")
        if eps < 0 or weight_decay < 0:
            raise NetdslError("eps and weight decay must not be negative")
        self.beta1, self.beta2, self.eps, self.weight_decay = b1, b2, eps, weight_decay

    def _update(self, name, p, g, lr):
        m = self.state["exp_avg"].setdefault(name, np.zeros_like(p))
        v = self.state["exp_avg_sq"].setdefault(name, np.zeros_like(p))
        step = self.steps  # already counts this step, as torch's state['step'] does
        K.adam_update(p, g, m, v, lr / (1 - self.beta1 ** step), self.beta1, self.beta2,
                      math.sqrt(1 - self.beta2 ** step), self.eps,
                      0.0 if self.decoupled else self.weight_decay,
                      1 - lr * self.weight_decay if self.decoupled else 1.0)


class AdamW(Adam):
    decoupled = True

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, schedule=None):
        super().__init__(params, lr, betas, eps, weight_decay, schedule)


_OPTIMIZERS = {"sgd": SGD, "adam": Adam, "adamw": AdamW}


def make_optimizer(name: str, params: dict[str, np.ndarray], **kwargs) -> Optimizer:
    """Build an optimiser by name ('sgd', 'adam', 'adamw') with torch's keyword names."""
    cls = lookup("optimiser", name, _OPTIMIZERS)
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    return construct(f"optimiser '{name}'", cls, kwargs, params)
