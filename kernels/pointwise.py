"""Per-element rules of the pointwise losses, written once in plain Python and compiled
for each target (numba.njit on the CPU, cuda.jit device function on CUDA); and how a
weighted loss is reduced (ops/tensor.py's `norm`), which both targets' hosts share."""
import math

MSE, SMOOTH_L1, BCE_LOGITS = 0, 1, 2
NORMS = ("elements", "rows", "weight", "weight_rows")


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
        return abs(d) - half * beta, (one if d > zero else (-one if d < zero else zero))   # beta 0: L1
    e = math.exp(-abs(a))           # BCE with logits, stable for any |a|
    sig = one / (one + e) if a >= zero else e / (one + e)
    return max(a, zero) - a * b + math.log1p(e), sig - b


def loss_weight(shape, weight):
    """(weight flat, D): D elements of pred share each weight, 1 (per element) or the last
    axis (per row); (None, 1) without a weight."""
    if weight is None:
        return None, 1
    shape, wshape = tuple(shape), tuple(weight.shape)   # (the CUDA simulator's shapes refuse shape[-1])
    if wshape == shape:
        return weight, 1
    if wshape == shape[:-1]:
        return weight, shape[-1]
    raise ValueError(f"loss: weight {wshape} is neither the prediction's shape {shape} nor that "
                     f"shape without its last axis")


def loss_divisor(shape, norm, weight_sum=None, D=1):
    """What sum(w * loss) is divided by (ops/tensor.py's norm); weight_sum: sum of the
    weights (each counted D times) for norms "weight" and "weight_rows"."""
    shape = tuple(shape)
    size = math.prod(shape)
    if norm == "elements" or norm == "weight" and weight_sum is None:
        return size
    if norm == "weight_rows" and weight_sum is None:
        norm = "rows"
    if norm == "rows":
        return size // shape[-1] if len(shape) and shape[-1] else 1
    if norm == "weight":
        return weight_sum * D
    if norm == "weight_rows":     # each row's weight once: a per-row weight's plain sum
        return weight_sum * D / shape[-1] if shape[-1] else 0
    raise ValueError(f"loss: norm must be one of {', '.join(NORMS)}, got {norm!r}")
