"""Symbolic tensor dimensions.

A dimension is a plain int or a `Sym`: a polynomial with integer coefficients over
named symbols (N, T, R...), e.g. `N*T` after a reshape or `2*H + 1`. Floor division
that is not exact on a polynomial makes an opaque atom named by the expression, so
shapes stay checkable (equal expressions compare equal) without a computer algebra
system.
"""
from __future__ import annotations

from typing import Union

Dim = Union[int, "Sym"]


class Sym:
    __slots__ = ("terms",)

    def __init__(self, terms: dict[tuple[str, ...], int]):
        self.terms = {m: c for m, c in terms.items() if c != 0}

    @staticmethod
    def var(name: str) -> "Sym":
        return Sym({(name,): 1})

    # -- arithmetic; results collapse back to int when no symbol is left
    def __add__(self, other):
        t = dict(self.terms)
        for m, c in _terms(other).items():
            t[m] = t.get(m, 0) + c
        return _norm(t)

    __radd__ = __add__

    def __neg__(self):
        return _norm({m: -c for m, c in self.terms.items()})

    def __sub__(self, other):
        return self + (-_as_sym(other))

    def __rsub__(self, other):
        return _as_sym(other) + (-self)

    def __mul__(self, other):
        t: dict[tuple[str, ...], int] = {}
        for m1, c1 in self.terms.items():
            for m2, c2 in _terms(other).items():
                m = tuple(sorted(m1 + m2))
                t[m] = t.get(m, 0) + c1 * c2
        return _norm(t)

    __rmul__ = __mul__

    def __floordiv__(self, other):
        if isinstance(other, int) and other != 0 and all(c % other == 0 for c in self.terms.values()):
            return _norm({m: c // other for m, c in self.terms.items()})
        if isinstance(other, Sym) and other == self:
            return 1
        if isinstance(other, Sym) and len(other.terms) == 1:
            (mono, coef), = other.terms.items()
            # exact division by a monomial: every term must contain it
            out = {}
            for m, c in self.terms.items():
                rest = list(m)
                for s in mono:
                    if s not in rest:
                        break
                    rest.remove(s)
                else:
                    if c % coef == 0:
                        out[tuple(rest)] = c // coef
                        continue
                break
            else:
                return _norm(out)
        return Sym.var(f"floor(({self})/{_paren(other)})")

    def __rfloordiv__(self, other):
        return Sym.var(f"floor({other}/({self}))")

    def __eq__(self, other):
        if isinstance(other, (int, Sym)):
            return _terms(other) == self.terms
        return NotImplemented

    def __hash__(self):
        return hash(tuple(sorted(self.terms.items())))

    def symbols(self) -> set[str]:
        return {s for m in self.terms for s in m}

    def subs(self, env: dict[str, int]) -> Dim:
        total: Dim = 0
        for m, c in self.terms.items():
            term: Dim = c
            for s in m:
                term = term * (env[s] if s in env else Sym.var(s))
            total = total + term
        return total

    def __str__(self):
        parts = []
        for m, c in sorted(self.terms.items(), key=lambda mc: (-len(mc[0]), mc[0])):
            mono = "*".join(m)
            if not m:
                s = str(abs(c))
            elif abs(c) == 1:
                s = mono
            else:
                s = f"{abs(c)}*{mono}"
            parts.append(("-" if c < 0 else "+", s))
        if not parts:
            return "0"
        out = ("-" if parts[0][0] == "-" else "") + parts[0][1]
        for sign, s in parts[1:]:
            out += f" {sign} {s}"
        return out

    __repr__ = __str__


def _terms(x) -> dict:
    if isinstance(x, Sym):
        return x.terms
    if isinstance(x, int):
        return {(): x} if x else {}
    raise TypeError(f"not a dimension: {x!r}")


def _as_sym(x) -> Sym:
    return x if isinstance(x, Sym) else Sym(_terms(x))


def _norm(t) -> Dim:
    t = {m: c for m, c in t.items() if c != 0}
    if not t:
        return 0
    if set(t) == {()}:
        return t[()]
    return Sym(t)


def _paren(x) -> str:
    s = str(x)
    return s if isinstance(x, int) or len(_terms(x)) <= 1 else f"({s})"


def is_dim(x) -> bool:
    return isinstance(x, Sym) or (isinstance(x, int) and not isinstance(x, bool))


def fmt_shape(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def subs(d: Dim, env: dict[str, int]) -> Dim:
    return d.subs(env) if isinstance(d, Sym) else d


def product(dims) -> Dim:
    out: Dim = 1
    for d in dims:
        out = out * d
    return out
