"""CPU renderer: Numba @njit kernels over flat contiguous arrays.

Every kernel is emitted twice from one body, serial and `parallel=True` with
prange; the launcher picks by size because a parallel launch costs more than a
small kernel's work. Indices are uint64 (U): with signed ones the prange copies
kept negative-index wraparound checks that blocked vectorisation and ran several
times slower than the serial copies.
"""
from __future__ import annotations

import numpy as np

from .. import native
from .render import header, indent, row_loop_body

PAR_MIN = 1 << 16     # elements (times COST); below this the serial variant runs
MATH_COST = 8         # a math.* call per element counts as this many elements
INDEX = np.uint64     # broadcast geometry arguments: the loop index's type (uint64 with int64 is float64)

# Not fastmath=True: that implies 'nnan'/'ninf', which folds isnan() to False.
DECORATOR = "@jit(fastmath={{'reassoc', 'contract', 'arcp', 'nsz'}}{par})"


def _variants(name: str, params: str, body) -> list[str]:
    """Serial and parallel copies of one kernel; `body(loop)` gives its lines."""
    lines = []
    for suffix, par, loop in (("serial", "", "range"), ("parallel", ", parallel=True", "prange")):
        lines += ["", DECORATOR.format(par=par), f"def {name}_{suffix}({params}):", *indent(body(loop)), ""]
    return lines


def render(low, dtype) -> str:
    names = low.params
    full = [o for o in low.outputs if o[2] == "full"]
    red = [o for o in low.outputs if o[2] != "full"]
    lines = header(low, dtype, "cpu")
    # An element costs about one cheap op, or tens of them per math call (exp, tanh: a
    # scalar libm call each): the launcher weighs the size by this to pick parallel.
    lines.append(f"COST = {1 + MATH_COST * sum(line.count('math.') for line in low.body)}")
    if not red:
        def flat(loop):
            store = [f"{p}[i] = {v}" for p, v, _ in full]
            if not low.uses_channel:
                return [f"for j in {loop}(n):", *indent(["i = U(j)", *low.body, *store])]
            # rows of Q elements share a channel; images x channels as two loops: no
            # integer division at all. Rows of one element ([N, C] tensors, 1x1 images)
            # loop over channels alone, which vectorises (a loop of one per channel did not)
            return [f"for p in {loop}(n // (C * Q)):", *indent(
                ["if Q == 1:", *indent(
                    ["for c in range(C):", *indent(["i = U(p * C + c)", *low.body, *store])]),
                 "else:", *indent(
                    ["for c in range(C):", *indent(
                        ["base = (p * C + c) * Q", "for q in range(Q):",
                         *indent(["i = U(base + q)", *low.body, *store])])])])]
        params = ", ".join(["n", "C", "Q", *names, *(p for p, _, _ in full)])
        return "\n".join(lines + _variants("kernel", params, flat))

    def rows(loop):
        # One row = Q contiguous elements of one channel; each reduced output
        # gets a per-row partial sum, so rows never write the same location.
        zero = [f"acc{j} = K_ZERO" for j in range(len(red))]
        store = [f"{o}[r] = acc{j}" for j, (o, _, _) in enumerate(red)]
        inner = ["r = U(p * C + c)", *zero, "for q in range(Q):",
                 *indent(["i = U(r * Q + q)", *row_loop_body(low, full, red)]), *store]
        one = ["r = U(p * C + c)", "i = r", *zero, *row_loop_body(low, full, red), *store]
        return [f"for p in {loop}(R // C):", *indent(
            ["if Q == 1:", *indent(["for c in range(C):", *indent(one)]),     # as in flat()
             "else:", *indent(["for c in range(C):", *indent(inner)])])]
    params = ", ".join(["R", "C", "Q", *names, *(p for p, _, _ in full), *(p for p, _, _ in red)])
    return "\n".join(lines + _variants("kernel", params, rows))


def render_reduce(dtype) -> str:
    """channel_sum(x, P, C, Q, out): out[c] = sum of x viewed as [P, C, Q] over P and Q."""
    def body(loop):
        # Q == 1 (the fused kernels' [P, C] partials): sum rows of C into out, threads
        # taking blocks of channels; a channel at a time read x with a stride of C
        return ["if Q == 1:", *indent(
                    ["nb = (C + 63) // 64", f"for b in {loop}(nb):", *indent(
                        ["c0, c1 = b * 64, min(C, b * 64 + 64)",
                         "for c in range(c0, c1):", "    out[c] = K_ZERO",
                         "for p in range(P):", *indent(
                             ["for c in range(c0, c1):", "    out[c] += x[U(p * C + c)]"])])]),
                "else:", *indent(
                    [f"for c in {loop}(C):", *indent(
                        ["acc = K_ZERO", "for p in range(P):",
                         *indent(["base = (p * C + c) * Q", "for q in range(Q):",
                                  "    acc += x[U(base + q)]"]),
                         "out[c] = acc"])])]
    return "\n".join(header(None, dtype, "cpu") + _variants("channel_sum", "x, P, C, Q, out", body))


# ---------------------------------------------------------------- launching

def asarray(x, dtype):
    return np.asarray(x, dtype=dtype, order="C")    # (ascontiguousarray would make a 0-d array 1-d)


def empty(n, dtype):
    return np.empty(n, dtype)


def flat(a):
    return a.reshape(-1)


def _pick(module, name, size):
    par = size >= PAR_MIN and native.get_num_threads() > 1
    return getattr(module, f"{name}_{'parallel' if par else 'serial'}")


def launch(module, rows, size, args):
    _pick(module, "kernel", size * getattr(module, "COST", 1))(*args)


def channel_sum(module, x, P, C, Q, out):
    _pick(module, "channel_sum", x.size)(x, P, C, Q, out)


def to_host(a):
    return a
