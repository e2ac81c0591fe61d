"""Drawing parameters' initial values.

Which distribution a parameter starts from is named in its operator's registry entry
and defined in the table of `netdsl/ops/inits.py` (conv weights Kaiming normal with
fan-out as torchvision's ResNet, linear weights PyTorch's default Kaiming uniform,
biases U(-1/sqrt(fan_in), ...), `constant(v)`, `normal(std)`, ...); a spec is parsed
once, so drawing a parameter costs a dict lookup besides the numbers.

The numbers come from a counter-based generator (kernels/cpu/rand.py) keyed by the
seed and the parameter's path: a parameter's initial values do not depend on what
else the network holds, and they are drawn at about twice the speed of NumPy's
generators. All parameters live side by side in one buffer of huge pages (arena.pack):
ResNet-50's 267 arrays, each its own allocation, cost ~9K page faults more on first touch.
"""
from __future__ import annotations

import hashlib
import math

import numpy as np

from ..ir.graph import Graph, Param
from ..ops import inits
from ..ops.inits import _fans  # noqa: F401  (tests compare draws with torch's fans)
from .arena import pack


def key(seed: int, name: str) -> np.uint64:
    """The stream of parameter `name` under `seed`."""
    return np.uint64(int.from_bytes(hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest(), "little"))


def _even(n: int) -> int:
    return n + (n & 1)


def normal(k: np.uint64, shape, std=1.0, out: np.ndarray | None = None) -> np.ndarray:
    """float32 N(0, std^2) of `shape` from stream k; out: flat float32 of at least
    the size rounded up to even (the generator makes pairs)."""
    from netdsl.kernels.cpu import rand
    n = math.prod(shape)
    buf = np.empty(_even(n), np.float32) if out is None else out
    rand.normal(buf[:_even(n)], k, float(std))
    return buf[:n].reshape(shape)


def uniform(k: np.uint64, shape, bound: float, out: np.ndarray | None = None) -> np.ndarray:
    """float32 U[-bound, bound) of `shape` from stream k."""
    from netdsl.kernels.cpu import rand
    n = math.prod(shape)
    buf = np.empty(n, np.float32) if out is None else out
    rand.uniform(buf[:n], k, -float(bound), float(bound))
    return buf[:n].reshape(shape)


def constant(shape, value: float, out: np.ndarray | None = None) -> np.ndarray:
    a = np.empty(shape, np.float32) if out is None else out[:math.prod(shape)].reshape(shape)
    a.fill(value)
    return a


def init_param(p: Param, seed: int, out: np.ndarray | None = None) -> np.ndarray:
    """p's initial value (float32, p.shape), in out (flat float32 with room for its
    size rounded up to even, as `place` leaves) if given."""
    fn, args = inits.parse(p.init)
    how, scale = fn(p, *args)
    if how == inits.CONSTANT:
        return constant(p.shape, scale, out)
    draw = normal if how == inits.NORMAL else uniform
    return draw(key(seed, p.name), p.shape, scale, out)


def place(g: Graph) -> tuple[np.ndarray, dict[str, int]]:
    """(buffer, {name: offset}): every parameter's place in one float32 buffer, with
    room for its size rounded up to even."""
    return pack({name: _even(math.prod(p.shape)) for name, p in g.params.items()}, np.float32)


def init_params(g: Graph, seed: int) -> dict[str, np.ndarray]:
    """Every parameter and buffer, in graph order, side by side in one buffer."""
    buf, offsets = place(g)
    return {name: init_param(p, seed, buf[offsets[name]:]) for name, p in g.params.items()}
