"""Counter-based random numbers for initialisers: element i of a stream is a hash of
(key, i), so a parameter's values depend on its key alone, not on what was drawn
before it or on how the work is split.

NumPy's generators made ~4-5 ns a float32 here (PCG64 and SFC64 alike), and drawing
ResNet-50's 25.6M initial weights held up its first step. These loops are integer and
float arithmetic that LLVM vectorises: the hash is SplitMix64's finaliser (Steele et
al. 2014) of key + i * golden ratio, and Box-Muller's log and sin/cos are Cephes' and
Taylor polynomials on exactly reduced arguments (libm's calls do not vectorise).
IEEE arithmetic throughout (no fastmath), so every machine draws the same values.
"""
import numpy as np

from . import U
from .jit import Jit


def njit(fn):
    # nogil: they run on a helper thread beside the first step's Python. No zero-division
    # checks (numpy's error model): they stop vectorisation, and no divisor here can be 0.
    return Jit(fn, nogil=True, error_model="numpy")


f32, i32, u64 = np.float32, np.int32, np.uint64
_GOLD, _M1, _M2 = u64(0x9E3779B97F4A7C15), u64(0xBF58476D1CE4E5B9), u64(0x94D049BB133111EB)
_SQRT2, _HALF_PI_22 = f32(np.sqrt(2)), f32(np.pi / 2 / 2 ** 22)


@njit
def mix(z):
    """SplitMix64's finaliser: a bijection of uint64 with full avalanche."""
    z = (z ^ (z >> u64(30))) * _M1
    z = (z ^ (z >> u64(27))) * _M2
    return z ^ (z >> u64(31))


@njit
def _log24(k):
    """log(k * 2**-24) in float32 for an int32 1 <= k <= 2**24 (max error 8e-8 relative).
    k = 2**e * m with m in [1, 2) by branch-free integer steps (k is exact in float32);
    then Cephes' logf: m in [sqrt(1/2), sqrt(2)), log(1 + x) by its minimax polynomial."""
    b = i32((k >> 16) != 0) << 4
    e, r = b, k >> b
    b = i32((r >> 8) != 0) << 3
    e, r = e + b, r >> b
    b = i32((r >> 4) != 0) << 2
    e, r = e + b, r >> b
    b = i32((r >> 2) != 0) << 1
    e, r = e + b, r >> b
    e += i32((r >> 1) != 0)
    m = f32(k) * f32(i32(1) << (i32(24) - e)) * f32(2.0 ** -24)
    big = m > _SQRT2
    x = (m * f32(0.5) if big else m) - f32(1)
    fe = f32(e + i32(big) - i32(24))
    z = x * x
    y = f32(7.0376836292E-2) * x - f32(1.1514610310E-1)
    y = y * x + f32(1.1676998740E-1)
    y = y * x - f32(1.2420140846E-1)
    y = y * x + f32(1.4249322787E-1)
    y = y * x - f32(1.6668057665E-1)
    y = y * x + f32(2.0000714765E-1)
    y = y * x - f32(2.4999993993E-1)
    y = y * x + f32(3.3333331174E-1)
    y = y * x * z + f32(-2.12194440e-4) * fe - f32(0.5) * z
    return x + y + f32(0.693359375) * fe


@njit
def _sincos24(j):
    """(sin, cos) of 2*pi * j * 2**-24 in float32 for an int32 0 <= j < 2**24: the quadrant
    from j's top two bits, Taylor polynomials (to a**13, a**12) of the angle a in
    [0, pi/2) that is left (max error 2e-7)."""
    a = f32(j & 0x3FFFFF) * _HALF_PI_22
    a2 = a * a
    s = f32(1 / 6227020800) * a2 - f32(1 / 39916800)
    s = s * a2 + f32(1 / 362880)
    s = s * a2 - f32(1 / 5040)
    s = s * a2 + f32(1 / 120)
    s = s * a2 - f32(1 / 6)
    s = (s * a2 + f32(1)) * a
    c = f32(1 / 479001600) * a2 - f32(1 / 3628800)
    c = c * a2 + f32(1 / 40320)
    c = c * a2 - f32(1 / 720)
    c = c * a2 + f32(1 / 24)
    c = c * a2 - f32(1 / 2)
    c = c * a2 + f32(1)
    q = j >> 22         # quadrant q turns (cos a, sin a) by q right angles
    x = c if q & 1 else s
    y = s if q & 1 else c
    return (-x if q >= 2 else x), (-y if q == 1 or q == 2 else y)


@njit
def normal(out, key, std):
    """out (flat float32, of even size) ~ N(0, std^2): elements 2i and 2i + 1 by
    Box-Muller from the hash of key + i, its top 24 bits the radius' uniform (in (0, 1]:
    log is finite), the next 24 the angle's. (One loop body: with a helper per pair,
    LLVM's inliner found the helper too big and the loop ran scalar, 10x slower.)"""
    sd = f32(std)
    for i in range(out.size // 2):
        z = mix(key + u64(i + 1) * _GOLD)
        r = np.sqrt(f32(-2) * _log24(i32(z >> u64(40)) + i32(1))) * sd
        s, c = _sincos24(i32((z >> u64(16)) & u64(0xFFFFFF)))
        out[U(2 * i)] = r * c
        out[U(2 * i + 1)] = r * s
    return out


@njit
def uniform(out, key, lo, hi):
    """out (flat float32) ~ U[lo, hi): element i from the top 24 bits of the hash of key + i."""
    a, w = f32(lo), f32(hi - lo)
    for i in range(out.size):
        z = mix(key + u64(i + 1) * _GOLD)
        out[U(i)] = a + w * (f32(i32(z >> u64(40))) * f32(2.0 ** -24))
    return out
