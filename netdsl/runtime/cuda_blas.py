"""cuBLAS SGEMM through CuPy for the CUDA target's GEMMs (issue 16, means 4), opt-in.

NETDSL_CUDA_BLAS=1 with CuPy importable: every float32 product that netdsl's tiled GEMM
(kernels/cuda/gemm.py `gemm`, used by convolution forward and both backwards and by
linear) would compute, and that cuBLAS can express, goes to cublasSgemmStridedBatched on
the arrays' raw device pointers (no copies: numba's device arrays and CuPy share the
primary context). cuBLAS's default math mode is set, so no TF32. What cuBLAS cannot
express (a bias to add, float64, an operand with no unit stride) stays netdsl's own
GEMM, which remains the fallback whenever CuPy is missing. `stats` counts both.

Mapping. netdsl's gemm computes C[i, j] = sum_k A[i, k] B[k, j] (i < M, j < N), with
A[i, k] at a.off + i*a.rs + k*a.ks, B[k, j] at b.off + j*b.rs + k*b.ks, C[i, j] at
c.off + i*c.rs + j*c.ks, plus z1*z1s + z2*z2s for batch z1 < Z1 and group z2 < Z2.
cuBLAS is column-major: a matrix with a unit row stride is an 'N' operand whose leading
dimension is its column stride; one with a unit column stride is a 'T' operand. When C
has a unit column stride (row-major C), cuBLAS computes C^T = B^T A^T instead. The two
batch levels become one strided batch when z1 = Z2 * z2 for every operand, else one
call per z1. A K split into (image, pixel) (kdiv: the weight gradient of a convolution,
summed over the images) is one call per image, accumulating (beta = 1) after the first.

Stream: CuPy issues on its current stream; netdsl's kernels run on stream handle 0,
which is the per-thread default stream when CUDA_PYTHON_CUDA_PER_THREAD_DEFAULT_STREAM=1
(runtime/cuda_graph.py), so cuBLAS gets that one (Stream.ptds), else the legacy one:
the same stream as the kernels around it, and inside a graph capture.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

stats = {"cublas": 0, "fallback": 0}
_orig = None


def wanted() -> bool:
    return os.environ.get("NETDSL_CUDA_BLAS") == "1" and os.environ.get("NUMBA_ENABLE_CUDASIM") != "1"


@dataclass
class Call:
    """One cublasSgemmStridedBatched call (column-major), offsets in elements."""
    transa: int     # 0 = N, 1 = T
    transb: int
    m: int
    n: int
    k: int
    A: str          # "a" or "b": which netdsl operand is cuBLAS's A
    a_off: int
    lda: int
    stride_a: int
    B: str
    b_off: int
    ldb: int
    stride_b: int
    c_off: int
    ldc: int
    stride_c: int
    batch: int
    beta: float


def _op(rows, cols, sr, sc):
    """A rows x cols matrix with strides (sr, sc) as a cuBLAS operand: (trans, ld), or None."""
    if sr == 1 and (cols == 1 or sc >= max(1, rows)):
        return 0, max(sc if cols > 1 else rows, 1)
    if sc == 1 and (rows == 1 or sr >= max(1, cols)):
        return 1, max(sr if rows > 1 else cols, 1)
    if rows == 1 and cols == 1:
        return 0, 1
    return None


def plan(a, b, c, M, N, K, Z1=1, Z2=1, accumulate=False) -> list[Call] | None:
    """The cuBLAS calls computing netdsl's gemm(a, b, c, ...), or None if they cannot.
    a, b, c: objects with rs, ks, off, kdiv, kbs, z1, z2 (kernels/cuda/gemm.py Operand)."""
    if c.kdiv or M <= 0 or N <= 0:
        return None
    kd = a.kdiv or b.kdiv
    if kd and ((a.kdiv and a.kdiv != kd) or (b.kdiv and b.kdiv != kd) or K % kd):
        return None
    parts = K // kd if kd else 1
    Kp = kd if kd else K
    # per-part offset of each operand (a part is one image of a split K)
    step = lambda o: (o.kbs if o.kdiv else Kp * o.ks) if parts > 1 else 0

    if c.ks == 1:
        # row-major C: C^T (N x M, ld c.rs) = B^T (N x K) @ A^T (K x M)
        oa = _op(N, Kp, b.rs, b.ks)
        ob = _op(Kp, M, a.ks, a.rs)
        oc = (0, max(c.rs if M > 1 else N, 1)) if (M == 1 or c.rs >= N) else None
        first, second, m, n = b, a, N, M
    else:
        oa = _op(M, Kp, a.rs, a.ks)
        ob = _op(Kp, N, b.ks, b.rs)
        oc = _op(M, N, c.rs, c.ks)
        oc = oc if oc is not None and oc[0] == 0 else None
        first, second, m, n = a, b, M, N
    if oa is None or ob is None or oc is None:
        return None
    names = {id(a): "a", id(b): "b"}
    # batches: one strided batch over Z1 * Z2 when z1 = Z2 * z2 for all three, else per z1
    if Z1 > 1 and Z2 > 1 and all(o.z1 == Z2 * o.z2 for o in (a, b, c)):
        groups, batch, bs = [0], Z1 * Z2, lambda o: o.z2
    elif Z2 > 1:
        groups, batch, bs = list(range(Z1)), Z2, lambda o: o.z2
    else:
        groups, batch, bs = [0], Z1, lambda o: o.z1
    calls = []
    for z in groups:
        zo = lambda o: z * o.z1 if len(groups) > 1 else 0
        for p in range(parts):
            calls.append(Call(oa[0], ob[0], m, n, Kp,
                              names[id(first)], first.off + zo(first) + p * step(first), oa[1], bs(first),
                              names[id(second)], second.off + zo(second) + p * step(second), ob[1], bs(second),
                              c.off + zo(c), oc[1], bs(c), batch, 1.0 if (accumulate or p > 0) else 0.0))
    return calls


# ---- running the calls (CuPy on the device)

class _Runner:
    def __init__(self):
        import cupy
        from cupy_backends.cuda.libs import cublas
        self.cupy, self.cublas = cupy, cublas
        self.handle = cupy.cuda.device.get_cublas_handle()
        cublas.setMathMode(self.handle, getattr(cublas, "CUBLAS_DEFAULT_MATH", 0))     # no TF32
        ptds = os.environ.get("CUDA_PYTHON_CUDA_PER_THREAD_DEFAULT_STREAM") == "1"
        self.stream = cupy.cuda.Stream.ptds if ptds else cupy.cuda.Stream.null
        self.scalars = {v: np.array(v, np.float32) for v in (0.0, 1.0)}     # host pointer mode

    def run(self, calls, arrays: dict) -> None:
        ptr = {k: int(v.__cuda_array_interface__["data"][0]) for k, v in arrays.items()}
        with self.stream:
            for c in calls:
                self.cublas.sgemmStridedBatched(
                    self.handle, c.transa, c.transb, c.m, c.n, c.k, self.scalars[1.0].ctypes.data,
                    ptr[c.A] + 4 * c.a_off, c.lda, c.stride_a, ptr[c.B] + 4 * c.b_off, c.ldb, c.stride_b,
                    self.scalars[c.beta].ctypes.data, ptr["c"] + 4 * c.c_off, c.ldc, c.stride_c, c.batch)


_runner: _Runner | None = None


def gemm(a, b, c, M, N, K, Z1=1, Z2=1, bias=None, bias_mode=0, bias_z2=0, accumulate=False, tile=None):
    """kernels/cuda/gemm.py's gemm, through cuBLAS where it can (see the module docstring)."""
    calls = None
    if bias is None and tile is None and c.arr.dtype == np.float32 and K > 0:
        calls = plan(a, b, c, M, N, K, Z1, Z2, accumulate)
    if calls is None:
        stats["fallback"] += 1
        return _orig(a, b, c, M, N, K, Z1, Z2, bias=bias, bias_mode=bias_mode, bias_z2=bias_z2,
                     accumulate=accumulate, tile=tile)
    stats["cublas"] += 1
    _runner.run(calls, {"a": a.arr, "b": b.arr, "c": c.arr})


def install() -> str | None:
    """With NETDSL_CUDA_BLAS=1: route netdsl's GEMMs through cuBLAS. Returns why not, or None."""
    global _orig, _runner
    if not wanted():
        return ("the CUDA simulator has no cuBLAS" if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
                else "NETDSL_CUDA_BLAS is not 1")
    if _orig is not None:
        return None
    try:
        runner = _Runner()
    except Exception as e:      # no CuPy, or no device: netdsl's own GEMM
        return f"CuPy's cuBLAS is not usable: {type(e).__name__}: {e}"
    from netdsl.kernels.cuda import gemm as G
    _orig, _runner = G.gemm, runner
    G.gemm = gemm       # the module's callers (conv, linear) look it up at each call
    return None
