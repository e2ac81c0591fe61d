"""Parameter initialisers, as the reference implementations do it.

Names come from each operator's registry entry: conv weights use Kaiming normal with
fan-out (torchvision's ResNet), linear weights PyTorch's default Kaiming uniform
(a = sqrt(5), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in))), biases U(-1/sqrt(fan_in), ...).
"""
from __future__ import annotations

import math

import numpy as np

from ..ir.graph import Graph, Param


def _fans(shape):
    receptive = math.prod(shape[2:]) if len(shape) > 2 else 1
    return shape[1] * receptive, shape[0] * receptive


def normal(rng: np.random.Generator, shape, std=1.0) -> np.ndarray:
    """float32 N(0, std^2) by Box-Muller on numpy's SIMD log/sin/cos: ~1.5x the speed of
    rng.standard_normal(dtype=float32), whose ziggurat was ResNet-50's start-up bottleneck."""
    n = math.prod(shape)
    h = (n + 1) // 2
    u = rng.random(2 * h, dtype=np.float32)
    r, t = u[:h], u[h:]
    np.subtract(np.float32(1), r, out=r)            # (0, 1]: log is finite
    np.log(r, out=r)
    r *= np.float32(-2 * std * std)
    np.sqrt(r, out=r)
    t *= np.float32(2 * math.pi)
    out = np.empty(2 * h, np.float32)
    np.cos(t, out=out[:h])
    np.sin(t, out=out[h:])
    out[:h] *= r
    out[h:] *= r
    return out[:n].reshape(shape)


def init_param(p: Param, rng: np.random.Generator) -> np.ndarray:
    shape = p.shape
    if p.init == "zeros":
        return np.zeros(shape, np.float32)
    if p.init == "ones":
        return np.ones(shape, np.float32)
    if p.init == "normal1":
        return normal(rng, shape)
    if p.init == "kaiming_normal_fan_out":
        return normal(rng, shape, math.sqrt(2.0 / _fans(shape)[1]))
    if p.init == "kaiming_uniform":
        bound = 1.0 / math.sqrt(_fans(shape)[0])
        return rng.uniform(-bound, bound, shape).astype(np.float32)
    if p.init == "fan_in_uniform":   # a bias: fan-in of its layer's weight
        w = p.node.params["weight"].shape
        bound = 1.0 / math.sqrt(_fans(w)[0])
        return rng.uniform(-bound, bound, shape).astype(np.float32)
    if p.init.startswith("normal(") and p.init.endswith(")"):
        std = float(p.init[7:-1])
        return normal(rng, shape, std)
    if p.init.startswith("uniform(") and p.init.endswith(")"):
        bound = float(p.init[8:-1])
        return rng.uniform(-bound, bound, shape).astype(np.float32)
    raise ValueError(f"unknown initialiser {p.init!r} for {p.name}")


def init_params(g: Graph, seed: int) -> dict[str, np.ndarray]:
    """Every parameter and buffer, in graph order, from one seeded generator."""
    rng = np.random.default_rng(seed)
    return {name: init_param(p, rng) for name, p in g.params.items()}
