"""exp, sigmoid and tanh over a row of float32, written out for LLVM to vectorise (Numba, CPU;
it does not yet: benchmarks/results/2026-12-06-rnn-cpu.txt).

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

from . import njit

_LOG2E = np.float32(1.44269504088896341)
_C1, _C2 = np.float32(0.693359375), np.float32(-2.12194440e-4)
_P0, _P1, _P2 = np.float32(1.9875691500e-4), np.float32(1.3981999507e-3), np.float32(8.3334519073e-3)
_P3, _P4, _P5 = np.float32(4.1665795894e-2), np.float32(1.6666665459e-1), np.float32(5.0000001201e-1)
_HI, _LO, _HALF, _ONE = np.float32(88.0), np.float32(-87.0), np.float32(0.5), np.float32(1.0)
_T3, _T5, _SMALL = np.float32(-1 / 3), np.float32(2 / 15), np.float32(0.125)
_BIAS, _SHIFT = np.int32(127), np.int32(23)


@njit
def vexp(a, o, n, ki):
    if a.itemsize == 8:
        for i in range(n):
            a[o + i] = np.exp(a[o + i])
        return
    kf = ki.view(np.float32)
    for i in range(n):
        x0 = np.float32(a[o + i])
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
        a[o + i] = p if x0 == x0 else x0
        ki[i] = (np.int32(k) + _BIAS) << _SHIFT
    for i in range(n):
        a[o + i] *= kf[i]


@njit
def vsigmoid(a, o, n, ki):
    one = a.dtype.type(1)
    for i in range(n):
        a[o + i] = -a[o + i]
    vexp(a, o, n, ki)
    for i in range(n):
        a[o + i] = one / (one + a[o + i])


@njit
def vtanh(a, o, n, ki):
    one, two = a.dtype.type(1), a.dtype.type(2)
    if a.itemsize == 8:
        for i in range(n):
            a[o + i] = np.tanh(a[o + i])
        return
    kf = ki.view(np.float32)
    for i in range(n):      # keep x for the odd series near 0, where 2 sigmoid(2x) - 1 cancels
        kf[i] = a[o + i]
        a[o + i] = -two * a[o + i]
    vexp(a, o, n, ki[n:])
    for i in range(n):
        x = kf[i]
        x2 = x * x
        near = x * (one + x2 * (_T3 + x2 * _T5))
        a[o + i] = near if abs(x) < _SMALL else two / (one + a[o + i]) - one
