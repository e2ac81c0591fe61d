"""Per-element optimiser updates, written once in plain Python and compiled for each
target (numba.njit on the CPU, a cuda.jit device function on CUDA).

The arithmetic is torch.optim's single-tensor path, operation for operation. Every
hyper-parameter arrives already cast to the parameter dtype; the ones torch derives in
Python (1 - beta, 1 - dampening, 1 - lr*wd) are derived by the caller in float64 and
then cast, as torch's are, so float32 results match torch's bit for bit.
"""
import math


def sgd_rule(p, g, b, lr, momentum, undamped, weight_decay, first, nesterov):
    """(new p, new momentum buffer) of one element; undamped = 1 - dampening. `first`:
    the buffer starts as the gradient (torch clones it on the first step)."""
    d = g
    if weight_decay != 0:
        d = d + weight_decay * p
    if momentum != 0:
        b = d if first else b * momentum + undamped * d
        d = d + momentum * b if nesterov else b
    return p - lr * d, b


def adam_rule(p, g, m, v, step_size, c1, beta2, c2, bc2_sqrt, eps, weight_decay, decay):
    """(new p, m, v) of one element; c1 = 1 - beta1, c2 = 1 - beta2. weight_decay: Adam's
    L2 term, added to the gradient; decay: AdamW's decoupled factor 1 - lr*wd (1 for Adam)."""
    if decay != 1:
        p = p * decay
    d = g
    if weight_decay != 0:
        d = d + weight_decay * p
    m = m + c1 * (d - m)                # torch: exp_avg.lerp_(grad, 1 - beta1)
    v = v * beta2 + c2 * (d * d)
    return p - step_size * (m / (math.sqrt(v) / bc2_sqrt + eps)), m, v
