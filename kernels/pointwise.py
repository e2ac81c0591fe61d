"""Per-element rules of the pointwise losses, written once in plain Python and compiled
for each target (numba.njit on the CPU, cuda.jit device function on CUDA)."""
import math

MSE, SMOOTH_L1, BCE_LOGITS = 0, 1, 2


def point_loss(a, b, kind, beta, one):
    """(loss, d loss / d a) of one element; `one` carries the dtype."""
    two = one + one
    half = one / two
    zero = one - one
    d = a - b
    if kind == MSE:
        return d * d, two * d
    if kind == SMOOTH_L1:
        if abs(d) < beta:
            return half * d * d / beta, d / beta
        return abs(d) - half * beta, (one if d > zero else -one)
    e = math.exp(-abs(a))           # BCE with logits, stable for any |a|
    sig = one / (one + e) if a >= zero else e / (one + e)
    return max(a, zero) - a * b + math.log1p(e), sig - b
