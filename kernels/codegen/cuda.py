"""CUDA renderer: numba.cuda kernels from the same lowered body as the CPU.

Elementwise kernels use a grid-stride loop over flat elements. Kernels with
reduced outputs give each block one row (Q contiguous elements of one channel)
at a time: threads stride over the row, then a shared-memory tree sums their
partials. The per-row partials are summed over rows by `channel_sum`, which
uses the same tree with one block per channel.
"""
from __future__ import annotations

import math

import numpy as np

from .render import header, indent, row_loop_body

TPB = 256          # threads per block, elementwise kernels
TPB_REDUCE = 128   # threads per block, reductions (a power of two for the tree)
MAX_BLOCKS = 4096  # grid-stride loops cover the rest
INDEX = np.int64   # broadcast geometry arguments: the type of cuda.grid's index

DECORATOR = "@cuda.jit(cache=True)"


def _tree(shared, out):
    """Sum `shared[0:TPB_REDUCE]` into `out` (thread 0), blocks synchronised."""
    return ["cuda.syncthreads()",
            "s = TPB_REDUCE // 2",
            "while s > 0:",
            *indent(["if t < s:", f"    {shared}[t] += {shared}[t + s]", "cuda.syncthreads()", "s //= 2"]),
            "if t == 0:", f"    {out} = {shared}[0]",
            "cuda.syncthreads()"]


def _header(low, dtype):
    return header(low, dtype, "cuda") + [f"TPB_REDUCE = {TPB_REDUCE}"]


def render(low, dtype) -> str:
    names = low.params
    full = [o for o in low.outputs if o[2] == "full"]
    red = [o for o in low.outputs if o[2] != "full"]
    lines = _header(low, dtype) + ["", DECORATOR]
    if not red:
        params = ", ".join(["n", "C", "Q", *names, *(p for p, _, _ in full)])
        inner = (["c = (i // Q) % C"] if low.uses_channel else []) + low.body
        inner += [f"{p}[i] = {v}" for p, v, _ in full]
        return "\n".join(lines + [f"def kernel({params}):", *indent(
            ["for i in range(cuda.grid(1), n, cuda.gridsize(1)):", *indent(inner)])]) + "\n"
    params = ", ".join(["R", "C", "Q", *names, *(p for p, _, _ in full), *(p for p, _, _ in red)])
    row = ["c = r % C", *(f"acc{j} = K_ZERO" for j in range(len(red))),
           "for q in range(t, Q, TPB_REDUCE):", *indent(["i = r * Q + q", *row_loop_body(low, full, red)])]
    for j, (p, _, _) in enumerate(red):
        row += [f"sh{j}[t] = acc{j}", *_tree(f"sh{j}", f"{p}[r]")]
    body = [*(f"sh{j} = cuda.shared.array(TPB_REDUCE, T)" for j in range(len(red))),
            "t = cuda.threadIdx.x",
            "for r in range(cuda.blockIdx.x, R, cuda.gridDim.x):", *indent(row)]
    return "\n".join(lines + [f"def kernel({params}):", *indent(body)]) + "\n"


def render_reduce(dtype) -> str:
    body = ["sh = cuda.shared.array(TPB_REDUCE, T)", "t = cuda.threadIdx.x",
            "for c in range(cuda.blockIdx.x, C, cuda.gridDim.x):", *indent(
                ["acc = K_ZERO", "for j in range(t, P * Q, TPB_REDUCE):",
                 *indent(["p = j // Q", "acc += x[(p * C + c) * Q + j - p * Q]"]),
                 "sh[t] = acc", *_tree("sh", "out[c]")])]
    return "\n".join(_header(None, dtype) + ["", DECORATOR, "def channel_sum(x, P, C, Q, out):",
                                              *indent(body)]) + "\n"


# ---------------------------------------------------------------- launching

def _cuda():
    from numba import cuda   # imported late: CPU-only use never loads the CUDA stack
    return cuda


def asarray(x, dtype):
    cuda = _cuda()
    if not cuda.devicearray.is_cuda_ndarray(x) and getattr(cuda, "is_cuda_array", lambda _: False)(x):
        x = cuda.as_cuda_array(x)     # CuPy, torch...: anything with __cuda_array_interface__
    if cuda.devicearray.is_cuda_ndarray(x):
        if x.dtype != np.dtype(dtype):
            raise TypeError(f"device array has dtype {x.dtype}, kernel expects {np.dtype(dtype)}")
        return x
    return cuda.to_device(np.ascontiguousarray(x, dtype=dtype))


def empty(n, dtype):
    return _cuda().device_array(n, dtype)


def flat(a):
    return a.reshape(a.size)


def launch(module, rows, size, args):
    """`args[0]` is the element count (flat kernels) or the row count."""
    if args[0] == 0:
        return
    if rows:
        module.kernel[min(args[0], MAX_BLOCKS), TPB_REDUCE](*args)
    else:
        module.kernel[min(math.ceil(size / TPB), MAX_BLOCKS), TPB](*args)


def channel_sum(module, x, P, C, Q, out):
    module.channel_sum[min(C, MAX_BLOCKS), TPB_REDUCE](x, P, C, Q, out)


def to_host(a):
    return a.copy_to_host()
