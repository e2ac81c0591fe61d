"""What the BLAS-backed convolutions (conv.py, conv_small.py) share: a GEMM on flat
row-major views through Numba's BLAS entry, and a strided copy that adds a constant."""
import numpy as np

from . import Deferred, njit

# Numba's BLAS shim (scipy's sgemm/dgemm): (kind, transa, transb, m, n, k,
# alpha, a, lda, b, ldb, beta, c, ldc), column-major, scalars by pointer.
_xxgemm = Deferred(lambda numba: numba.types.ExternalFunction("numba_xxgemm", numba.types.intc(
    *(numba.types.char,) * 3, *(numba.types.intp,) * 3, numba.types.voidptr,
    numba.types.voidptr, numba.types.intp, numba.types.voidptr, numba.types.intp, numba.types.voidptr,
    numba.types.voidptr, numba.types.intp)))

# BLAS transpose flags of gemm: 'N' (as stored), 'T' (transposed)
N_, T_ = np.int8(78), np.int8(84)


@njit
def strided_add(dst, d, src, s, n, step, add):
    """dst[d + i] = src[s + i*step] + add for i < n, on flat arrays."""
    u = np.uint64
    for i in range(n):
        dst[u(d + i)] = src[u(s + i * step)] + add


@njit
def gemm(M, N, K, a, lda, ta, b, ldb, tb, c, beta, ldc=0):
    """c[M, N] = beta*c + op(a) @ op(b) on row-major flat views with leading dims
    lda, ldb, ldc (ta/tb: 'T' when that operand is stored transposed; ldc 0: N).
    Numba's own BLAS entry, unlike np.dot, takes beta and strided sub-matrices."""
    one, bt = np.ones(1, c.dtype), np.full(1, beta, c.dtype)
    kind = np.int8(115) if c.itemsize == 4 else np.int8(100)  # 's' / 'd'
    # Row-major C = A B is column-major C^T = B^T A^T.
    _xxgemm(kind, tb, ta, N, M, K, one.ctypes, b.ctypes, ldb, a.ctypes, lda, bt.ctypes, c.ctypes, ldc or N)
