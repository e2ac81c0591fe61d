"""Losses (mean reductions, weighted or not) and softmax / log-softmax, with shared-memory reductions.

A loss stays on the device as a one-element array: the backward reads the seed
gradient and the row count from device memory, so a training step never waits
for the host. Labels outside [0, K) give a NaN row loss (the CPU raises; here
the runtime's non-finite check names the loss instead).
"""
from __future__ import annotations

import math

import numpy as np
from numba import cuda

from ..pointwise import BCE_LOGITS, MSE, SMOOTH_L1, loss_divisor, loss_weight, point_loss
from . import TPB_RED, device, empty, flat, full, kernel, launch, launch_rows, tree_max, tree_sum

PART_BLOCKS = 256   # blocks (partial sums) of a whole-array reduction


@kernel("alaaiii")
def _softmax_ce(z, labels, probs, rowloss, R, K, ignore):
    """One block per row: max and sum of exponentials by trees in shared memory.
    rowloss[r] = log-sum-exp - z[label] (exact even when probs[label] underflows); 0 if ignored."""
    T = z.dtype.type
    sh = cuda.shared.array(TPB_RED, z.dtype)
    t = cuda.threadIdx.x
    for r in range(cuda.blockIdx.x, R, cuda.gridDim.x):
        base = r * K
        m = T(-np.inf)
        for j in range(t, K, TPB_RED):
            m = max(m, z[base + j])
        sh[t] = m
        tree_max(sh, t)
        m = sh[0]
        cuda.syncthreads()
        s = T(0)
        for j in range(t, K, TPB_RED):
            e = math.exp(z[base + j] - m)
            probs[base + j] = e
            s += e
        sh[t] = s
        tree_sum(sh, t)
        s = sh[0]
        inv = T(1) / s
        for j in range(t, K, TPB_RED):
            probs[base + j] *= inv
        if t == 0:
            lab = labels[r]
            if lab == ignore:
                rowloss[r] = T(0)
            elif lab < 0 or lab >= K:
                rowloss[r] = T(np.nan)
            else:
                rowloss[r] = math.log(s) + m - z[base + lab]
        cuda.syncthreads()


@kernel("alaii")
def _count_valid(rowloss, labels, count, R, ignore):
    """count[0] = number of rows whose label is not ignored (one block)."""
    T = rowloss.dtype.type
    sh = cuda.shared.array(TPB_RED, rowloss.dtype)
    t = cuda.threadIdx.x
    acc = T(0)
    for r in range(t, R, TPB_RED):
        if labels[r] != ignore:
            acc += T(1)
    sh[t] = acc
    tree_sum(sh, t)
    if t == 0:
        count[0] = sh[0]


@kernel("aiaa")
def _mean_of(part, n, count, out):
    """out[0] = sum(part[:n]) / count[0], or 0 when count[0] is 0 (one block)."""
    T = part.dtype.type
    sh = cuda.shared.array(TPB_RED, part.dtype)
    t = cuda.threadIdx.x
    acc = T(0)
    for i in range(t, n, TPB_RED):
        acc += part[i]
    sh[t] = acc
    tree_sum(sh, t)
    if t == 0:
        out[0] = sh[0] / count[0] if count[0] != T(0) else T(0)    # nothing labelled: 0, as on the CPU


@kernel("alaaaii")
def _softmax_ce_bwd(probs, labels, gl, count, gz, K, ignore):
    T = probs.dtype.type
    scale = gl[0] / count[0] if count[0] != T(0) else T(0)
    for e in range(cuda.grid(1), probs.size, cuda.gridsize(1)):
        lab = labels[e // K]
        v = T(0)
        if lab != ignore:
            v = probs[e] * scale
            if e % K == lab:
                v -= scale
        gz[e] = v


def softmax_cross_entropy(logits, labels, ignore_index=-1):
    """(loss[1], probs, count[1]): mean over rows whose label != ignore_index, logits[R, K]."""
    R, K = logits.shape
    probs = empty((R, K), logits.dtype)
    rowloss = empty(R, logits.dtype)
    count = empty(1, logits.dtype)
    loss = empty(1, logits.dtype)
    launch_rows(_softmax_ce, R, flat(logits), flat(labels), flat(probs), rowloss, R, K, int(ignore_index))
    _count_valid[1, TPB_RED](rowloss, flat(labels), count, R, int(ignore_index))
    _mean_of[1, TPB_RED](rowloss, R, count, loss)
    return loss, probs, count


def softmax_cross_entropy_backward(probs, labels, count, gloss, ignore_index=-1):
    """(probs - onehot) * gloss / count, zero on ignored rows; gloss and count are device scalars."""
    gz = empty(probs.shape, probs.dtype)
    launch(_softmax_ce_bwd, probs.size, flat(probs), flat(labels), flat(gloss), count, flat(gz),
           probs.shape[1], int(ignore_index))
    return gz


# ---------------------------------------------------------------- pointwise losses
#
# sum(w * loss) / divisor as on the CPU: the weight w (optional, kinds "a" with D = 0
# for none) per element or per row (w[i // D]); the divisor is a device scalar (the
# sum of the weights for norm "weight"), so no step waits for the host.

_point = device(point_loss)


@device
def _w(w, i, D, one):
    return w[i // D] if D > 0 else one


@kernel("aaaiiffa")
def _point_partial(a, b, w, D, kind, beta, one, part):
    """part[block] = sum of this block's weighted element losses (grid-stride, then a tree)."""
    sh = cuda.shared.array(TPB_RED, a.dtype)
    t = cuda.threadIdx.x
    acc = one - one
    for i in range(cuda.grid(1), a.size, cuda.gridsize(1)):
        acc += _w(w, i, D, one) * _point(a[i], b[i], kind, beta, one)[0]
    sh[t] = acc
    tree_sum(sh, t)
    if t == 0:
        part[cuda.blockIdx.x] = sh[0]


@kernel("aaaiiffaaa")
def _point_grad(a, b, w, D, kind, beta, one, gl, den, g):
    scale = gl[0] / den[0] if den[0] != one - one else one - one
    for i in range(cuda.grid(1), a.size, cuda.gridsize(1)):
        g[i] = _w(w, i, D, one) * _point(a[i], b[i], kind, beta, one)[1] * scale


@kernel("aifa")
def _sum_scaled(x, n, scale, out):
    """out[0] = sum(x[:n]) * scale (one block)."""
    T = x.dtype.type
    sh = cuda.shared.array(TPB_RED, x.dtype)
    t = cuda.threadIdx.x
    acc = T(0)
    for i in range(t, n, TPB_RED):
        acc += x[i]
    sh[t] = acc
    tree_sum(sh, t)
    if t == 0:
        out[0] = sh[0] * scale


@kernel("aiaa")
def _ratio_of(part, n, den, out):
    """out[0] = sum(part[:n]) / den[0], 0 when den[0] is 0 (one block)."""
    T = part.dtype.type
    sh = cuda.shared.array(TPB_RED, part.dtype)
    t = cuda.threadIdx.x
    acc = T(0)
    for i in range(t, n, TPB_RED):
        acc += part[i]
    sh[t] = acc
    tree_sum(sh, t)
    if t == 0:
        out[0] = sh[0] / den[0] if den[0] != T(0) else T(0)


def _weighting(pred, weight, norm):
    """(weight array, D, divisor as a device scalar): D = 0 without a weight (a one-element
    placeholder array is passed, never read)."""
    w, D = loss_weight(pred.shape, weight)
    if norm in ("weight", "weight_rows") and w is not None:
        den = empty(1, pred.dtype)
        scale = D if norm == "weight" else D / max(tuple(pred.shape)[-1], 1)   # (the simulator: tuple)
        _sum_scaled[1, TPB_RED](flat(w), w.size, np.dtype(pred.dtype).type(scale), den)
    else:
        den = full(1, loss_divisor(pred.shape, norm), pred.dtype)
    return (flat(w), D) if w is not None else (den, 0), den


def _forward(kind, pred, target, beta=1.0, weight=None, norm="elements"):
    t = np.dtype(pred.dtype).type
    (w, D), den = _weighting(pred, weight, norm)
    nb = min(PART_BLOCKS, max(1, math.ceil(pred.size / TPB_RED)))
    part = empty(nb, pred.dtype)
    _point_partial[nb, TPB_RED](flat(pred), flat(target), w, D, kind, t(beta), t(1), part)
    out = empty(1, pred.dtype)
    _ratio_of[1, TPB_RED](part, nb, den, out)
    return out


def _backward(kind, pred, target, gloss, beta=1.0, weight=None, norm="elements"):
    t = np.dtype(pred.dtype).type
    (w, D), den = _weighting(pred, weight, norm)
    g = empty(pred.shape, pred.dtype)
    launch(_point_grad, pred.size, flat(pred), flat(target), w, D, kind, t(beta), t(1), flat(gloss), den,
           flat(g))
    return g


def mse_loss(pred, target, weight=None, norm="elements"):
    return _forward(MSE, pred, target, 1.0, weight, norm)


def mse_loss_backward(pred, target, gloss, weight=None, norm="elements"):
    return _backward(MSE, pred, target, gloss, 1.0, weight, norm)


def smooth_l1_loss(pred, target, beta=1.0, weight=None, norm="elements"):
    return _forward(SMOOTH_L1, pred, target, beta, weight, norm)


def smooth_l1_loss_backward(pred, target, gloss, beta=1.0, weight=None, norm="elements"):
    return _backward(SMOOTH_L1, pred, target, gloss, beta, weight, norm)


def bce_with_logits(logits, target, weight=None, norm="elements"):
    return _forward(BCE_LOGITS, logits, target, 1.0, weight, norm)


def bce_with_logits_backward(logits, target, gloss, weight=None, norm="elements"):
    return _backward(BCE_LOGITS, logits, target, gloss, 1.0, weight, norm)


# ---------------------------------------------------------------- softmax over an axis

@kernel("aaiiii")
def _softmax(x, y, O, K, I, log):
    """Rows (o, i) of an [O, K, I] view, one block each: max and sum by shared-memory trees."""
    T = x.dtype.type
    sh = cuda.shared.array(TPB_RED, x.dtype)
    t = cuda.threadIdx.x
    for r in range(cuda.blockIdx.x, O * I, cuda.gridDim.x):
        base = (r // I) * K * I + r % I
        m = T(-np.inf)
        for k in range(t, K, TPB_RED):
            m = max(m, x[base + k * I])
        sh[t] = m
        tree_max(sh, t)
        m = sh[0]
        cuda.syncthreads()
        s = T(0)
        for k in range(t, K, TPB_RED):
            s += math.exp(x[base + k * I] - m)
        sh[t] = s
        tree_sum(sh, t)
        lse = m + math.log(sh[0])
        for k in range(t, K, TPB_RED):
            v = x[base + k * I] - lse
            y[base + k * I] = v if log else math.exp(v)
        cuda.syncthreads()


@kernel("aaaiiii")
def _softmax_bwd(gy, y, gx, O, K, I, log):
    """softmax: gx = y * (gy - sum(gy * y)); log_softmax: gx = gy - exp(y) * sum(gy)."""
    T = gy.dtype.type
    sh = cuda.shared.array(TPB_RED, gy.dtype)
    t = cuda.threadIdx.x
    for r in range(cuda.blockIdx.x, O * I, cuda.gridDim.x):
        base = (r // I) * K * I + r % I
        s = T(0)
        for k in range(t, K, TPB_RED):
            i = base + k * I
            s += gy[i] if log else gy[i] * y[i]
        sh[t] = s
        tree_sum(sh, t)
        s = sh[0]
        for k in range(t, K, TPB_RED):
            i = base + k * I
            gx[i] = gy[i] - math.exp(y[i]) * s if log else y[i] * (gy[i] - s)
        cuda.syncthreads()


def _oki(shape, axis):
    axis %= len(shape)
    return math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:])


def softmax(x, axis, log=False):
    O, K, I = _oki(x.shape, axis)
    y = empty(x.shape, x.dtype)
    launch_rows(_softmax, O * I, flat(x), flat(y), O, K, I, int(log))
    return y


def softmax_backward(gy, y, axis, log=False):
    O, K, I = _oki(y.shape, axis)
    gx = empty(y.shape, y.dtype)
    launch_rows(_softmax_bwd, O * I, flat(gy), flat(y), flat(gx), O, K, I, int(log))
    return gx
