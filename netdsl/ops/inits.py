"""Parameter initialisers: one table of named functions.

An operator's parameter rule names an initialiser as a string, `name` or `name(numbers)`
(`"kaiming_normal_fan_out"`, `"constant(20)"`), and lists every name it uses in its
registry entry's `inits`; `registry.register` checks those names against this table, so
a missing initialiser is an error when the operators are defined (on import), not when
a network first runs. Each function takes the parameter (its shape, and its node for a
bias that depends on its layer's weight) and the numbers of the spec, and says what to
draw: (NORMAL, std), (UNIFORM, bound) or (CONSTANT, value). `runtime/init.py` draws it
with the counter-based generator. Nothing here imports numpy: the front end reads it.
"""
from __future__ import annotations

import inspect
import math
import re
from typing import Callable

NORMAL, UNIFORM, CONSTANT = "normal", "uniform", "constant"

INITIALISERS: dict[str, Callable] = {}
_ARITY: dict[str, int] = {}


def initialiser(fn: Callable) -> Callable:
    """Register fn under its name; its arguments after the parameter are the spec's numbers."""
    INITIALISERS[fn.__name__] = fn
    _ARITY[fn.__name__] = len(inspect.signature(fn).parameters) - 1
    return fn


def _fans(shape):
    """(fan_in, fan_out) as torch.nn.init computes them."""
    receptive = math.prod(shape[2:]) if len(shape) > 2 else 1
    return shape[1] * receptive, shape[0] * receptive


@initialiser
def zeros(p):
    return CONSTANT, 0.0


@initialiser
def ones(p):
    return CONSTANT, 1.0


@initialiser
def constant(p, value):
    """Every entry `value` (SSD's L2Norm scale starts at 20)."""
    return CONSTANT, value


@initialiser
def normal1(p):
    """N(0, 1): torch.nn.Embedding's default."""
    return NORMAL, 1.0


@initialiser
def normal(p, std):
    return NORMAL, std


@initialiser
def uniform(p, bound):
    """U[-bound, bound) (torch's recurrent layers: bound = 1/sqrt(hidden))."""
    return UNIFORM, bound


@initialiser
def kaiming_normal_fan_out(p):
    """N(0, 2/fan_out): torchvision's ResNet convolutions."""
    return NORMAL, math.sqrt(2.0 / _fans(p.shape)[1])


@initialiser
def kaiming_uniform(p):
    """torch's default for linear and conv-transpose weights: Kaiming uniform with
    a = sqrt(5), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    return UNIFORM, 1.0 / math.sqrt(_fans(p.shape)[0])


@initialiser
def fan_in_uniform(p):
    """A bias: U(-1/sqrt(fan_in), ...) with the fan-in of its layer's weight."""
    return UNIFORM, 1.0 / math.sqrt(_fans(p.node.params["weight"].shape)[0])


_SPEC = re.compile(r"([A-Za-z_]\w*)(?:\((.*)\))?")
_PARSED: dict[str, tuple[Callable, tuple[float, ...]]] = {}


def parse(spec: str) -> tuple[Callable, tuple[float, ...]]:
    """(function, numbers) of an initialiser spec; each spec is parsed once. A ValueError
    says what is wrong with a spec that names no initialiser or gives it the wrong numbers."""
    got = _PARSED.get(spec)
    if got is not None:
        return got
    m = _SPEC.fullmatch(spec.strip()) if isinstance(spec, str) else None
    if m is None:
        raise ValueError(f"initialiser {spec!r} is not of the form name or name(numbers)")
    name, args = m.group(1), m.group(2)
    if name not in INITIALISERS:
        raise ValueError(f"unknown initialiser {name!r} (known: {', '.join(sorted(INITIALISERS))})")
    try:
        nums = tuple(float(a) for a in args.split(",")) if args and args.strip() else ()
    except ValueError:
        raise ValueError(f"initialiser {spec!r}: its arguments must be numbers") from None
    if len(nums) != _ARITY[name]:
        raise ValueError(f"initialiser {spec!r}: {name} takes {_ARITY[name]} number(s), got {len(nums)}")
    _PARSED[spec] = got = (INITIALISERS[name], nums)
    return got


def name_of(spec: str) -> str:
    return parse(spec)[0].__name__
