"""exp, sigmoid and tanh over a row of float32 that LLVM vectorises (Numba, CPU).

Numba lowers np.exp to a scalar libm call per element, which no loop around it can
vectorise; in an LSTM step the gates' five transcendentals per hidden unit then cost as
much as the step's GEMM. Here exp is written out (Cephes' expf: range reduction by
ln 2, a degree-6 polynomial, 2^k put into the exponent bits through an int32 view of a
scratch row), so every loop is straight-line arithmetic on contiguous rows. Accuracy:
within 2 ulp of expf over the whole float32 range; NaN stays NaN. float64 rows take
np.exp (the reference precision the tests run in).

  vexp(a, o, n, ki)       a[o:o+n] = exp(a[o:o+n]) in place; ki: int32 scratch, >= n
  vsigmoid(a, o, n, ki)   a[o:o+n] = 1 / (1 + exp(-a[o:o+n]))
  vtanh(a, o, n, ki)      a[o:o+n] = tanh(a[o:o+n]): 2 sigmoid(2x) - 1, and the series
                          x - x^3/3 + 2x^5/15 below |x| = 1/8 (where that form cancels);
                          ki: int32 scratch, >= 2n
"""
import numpy as np

from . import FAST
from .jit import Jit


def njit(fn):
    """As kernels.njit, with NumPy's error model: under Python's, a division checks for a
    zero divisor (to raise ZeroDivisionError), and that branch keeps the reciprocal loops
    of sigmoid and tanh scalar (0.83 against 0.10 ns an element here)."""
    return Jit(fn, fastmath=FAST, error_model="numpy")

_LOG2E = np.float32(1.44269504088896341)
_C1, _C2 = np.float32(0.693359375), np.float32(-2.12194440e-4)
_P0, _P1, _P2 = np.float32(1.9875691500e-4), np.float32(1.3981999507e-3), np.float32(8.3334519073e-3)
_P3, _P4, _P5 = np.float32(4.1665795894e-2), np.float32(1.6666665459e-1), np.float32(5.0000001201e-1)
_HI, _LO, _HALF, _ONE = np.float32(88.0), np.float32(-87.0), np.float32(0.5), np.float32(1.0)
_T3, _T5, _SMALL = np.float32(-1 / 3), np.float32(2 / 15), np.float32(0.125)
_BIAS, _SHIFT = np.int32(127), np.int32(23)


@njit
def vexp(a, o, n, ki):
    u = np.uint64     # indices that cannot be negative: no wraparound select, so LLVM vectorises
    if a.itemsize == 8:
        for i in range(n):
            a[u(o + i)] = np.exp(a[u(o + i)])
        return
    kf = ki.view(np.float32)
    for i in range(n):
        x0 = np.float32(a[u(o + i)])
        x = x0 if x0 < _HI else _HI
        x = x if x > _LO else _LO
        k = np.floor(x * _LOG2E + _HALF)
        r = x - k * _C1 - k * _C2
        p = _P0
        p = p * r + _P1
        p = p * r + _P2
        p = p * r + _P3
        p = p * r + _P4
        p = p * r + _P5
        p = p * r * r + r + _ONE
        a[u(o + i)] = p if x0 == x0 else x0
        ki[u(i)] = (np.int32(k) + _BIAS) << _SHIFT
    for i in range(n):
        a[u(o + i)] *= kf[u(i)]


@njit
def vsigmoid(a, o, n, ki):
    u = np.uint64     # indices that cannot be negative: no wraparound select, so LLVM vectorises
    one = a.dtype.type(1)
    for i in range(n):
        a[u(o + i)] = -a[u(o + i)]
    vexp(a, o, n, ki)
    for i in range(n):
        a[u(o + i)] = one / (one + a[u(o + i)])


@njit
def vtanh(a, o, n, ki):
    u = np.uint64     # indices that cannot be negative: no wraparound select, so LLVM vectorises
    one, two = a.dtype.type(1), a.dtype.type(2)
    if a.itemsize == 8:
        for i in range(n):
            a[u(o + i)] = np.tanh(a[u(o + i)])
        return
    kf = ki.view(np.float32)
    for i in range(n):      # keep x for the odd series near 0, where 2 sigmoid(2x) - 1 cancels
        kf[u(i)] = a[u(o + i)]
        a[u(o + i)] = -two * a[u(o + i)]
    vexp(a, o, n, ki[n:])
    for i in range(n):
        x = kf[u(i)]
        x2 = x * x
        near = x * (one + x2 * (_T3 + x2 * _T5))
        a[u(o + i)] = near if abs(x) < _SMALL else two / (one + a[u(o + i)]) - one
