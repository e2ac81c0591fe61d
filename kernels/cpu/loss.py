"""Losses (mean reduction), forward and backward.

Forwards return the loss as a numpy scalar of the input dtype; sums are
accumulated in float64 on purpose.
"""
import numpy as np

from ..pointwise import BCE_LOGITS, MSE, SMOOTH_L1, loss_divisor, loss_weight, point_loss
from . import as_float, kernel, njit, prange


# ---------------------------------------------------------------- softmax CE

def _softmax_ce(z, labels, ignore, probs, rowloss):
    N, K = z.shape
    for n in prange(N):
        m = z[n, 0]
        for j in range(1, K):
            m = max(m, z[n, j])
        s = z.dtype.type(0)
        for j in range(K):
            e = np.exp(z[n, j] - m)
            probs[n, j] = e
            s += e
        inv = z.dtype.type(1) / s
        for j in range(K):
            probs[n, j] *= inv
        lab = labels[n]
        # log-sum-exp form: exact even when probs[lab] underflows to 0
        rowloss[n] = 0.0 if lab == ignore else np.log(s) + m - z[n, lab]
    return rowloss


def _softmax_ce_bwd(probs, labels, ignore, scale, gz):
    N, K = probs.shape
    for n in prange(N):
        lab = labels[n]
        for j in range(K):
            gz[n, j] = 0 if lab == ignore else probs[n, j] * scale
        if lab != ignore:
            gz[n, lab] -= scale
    return gz


_softmax_ce = kernel(_softmax_ce)
_softmax_ce_bwd = kernel(_softmax_ce_bwd)


def _labels(labels, N, K, ignore_index):
    labels = np.ascontiguousarray(labels, np.int64).reshape(N)
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= K))
    if bad.any():
        raise ValueError(f"cross-entropy: label {labels[bad][0]} outside [0, {K})")
    return labels


def softmax_cross_entropy(logits, labels, ignore_index=-1):
    """(loss, probs): mean over the rows whose label != ignore_index, logits[N, K], integer
    labels[N]. Keep probs for the backward. With no such row the loss is 0 and so is its
    gradient (torch gives NaN): a detector's batch with nothing labelled adds nothing, as
    the point losses' empty divisors do."""
    z = as_float(logits)
    N, K = z.shape
    labels = _labels(labels, N, K, ignore_index)
    probs = np.empty_like(z)
    rowloss = np.empty(N, np.float64)
    _softmax_ce(z.size, z, labels, ignore_index, probs, rowloss)
    count = int((labels != ignore_index).sum())
    loss = rowloss.sum() / count if count else 0.0
    return z.dtype.type(loss), probs


def softmax_cross_entropy_backward(probs, labels, ignore_index=-1, gloss=1.0):
    """d loss / d logits = (probs - onehot) * gloss / count, zero on ignored rows."""
    probs = as_float(probs)
    N, K = probs.shape
    labels = _labels(labels, N, K, ignore_index)
    count = int((labels != ignore_index).sum())
    scale = probs.dtype.type(gloss / count if count else 0.0)
    gz = np.empty_like(probs)
    _softmax_ce_bwd(probs.size, probs, labels, ignore_index, scale, gz)
    return gz


# ---------------------------------------------------------------- pointwise losses
#
# sum(w * loss) / divisor, the weight w (optional) per element or per row of the last
# axis (w[i // D]), the divisor chosen by `norm` (ops/tensor.py: elements, rows or weight).

_point = njit(point_loss)


def _reduce(a, b, kind, beta):
    s = 0.0
    for i in prange(a.size):
        s += _point(a[i], b[i], kind, beta, a.dtype.type(1))[0]
    return s


def _grad(a, b, kind, beta, scale, g):
    for i in prange(a.size):
        g[i] = _point(a[i], b[i], kind, beta, a.dtype.type(1))[1] * scale
    return g


def _reduce_w(a, b, w, D, kind, beta):
    s = 0.0
    for i in prange(a.size):
        s += w[i // D] * _point(a[i], b[i], kind, beta, a.dtype.type(1))[0]
    return s


def _grad_w(a, b, w, D, kind, beta, scale, g):
    for i in prange(a.size):
        g[i] = w[i // D] * _point(a[i], b[i], kind, beta, a.dtype.type(1))[1] * scale
    return g


_reduce = kernel(_reduce)
_grad = kernel(_grad)
_reduce_w = kernel(_reduce_w)
_grad_w = kernel(_grad_w)


def _pair(pred, target):
    a = as_float(pred)
    b = np.ascontiguousarray(target, a.dtype)
    if a.shape != b.shape:
        raise ValueError(f"loss: prediction {a.shape} and target {b.shape} differ")
    return a, b


def scalar(g) -> float:
    """A loss's incoming gradient as a float: a 0-d array, or the one-element array a loss
    scaled by a constant (`loss a = l2(p, t) * 2`) passes back."""
    a = np.asarray(g)
    if a.size != 1:
        raise ValueError(f"a loss's gradient must be one number, got shape {a.shape}")
    return float(a.reshape(()))


def _ratio(s, den):
    """s / den, 0 for an empty denominator (nothing weighted: nothing to learn)."""
    return s / den if den != 0 else 0.0


def _forward(kind, pred, target, beta=1.0, weight=None, norm="elements"):
    a, b = _pair(pred, target)
    w, D = loss_weight(a.shape, weight)
    t = a.dtype.type
    if w is None:
        s = _reduce(a.size, a.reshape(-1), b.reshape(-1), kind, t(beta))
        return t(_ratio(s, loss_divisor(a.shape, norm)))
    w = np.ascontiguousarray(w, a.dtype).reshape(-1)
    s = _reduce_w(a.size, a.reshape(-1), b.reshape(-1), w, D, kind, t(beta))
    return t(_ratio(s, loss_divisor(a.shape, norm, w.sum(dtype=np.float64), D)))


def _backward(kind, pred, target, gloss, beta=1.0, weight=None, norm="elements"):
    """Gradient wrt pred; the gradient wrt target of MSE / smooth-L1 is its negation.
    The weight gets none."""
    a, b = _pair(pred, target)
    w, D = loss_weight(a.shape, weight)
    t = a.dtype.type
    g = np.empty_like(a)
    if w is None:
        scale = t(_ratio(scalar(gloss), loss_divisor(a.shape, norm)))
        _grad(a.size, a.reshape(-1), b.reshape(-1), kind, t(beta), scale, g.reshape(-1))
        return g
    w = np.ascontiguousarray(w, a.dtype).reshape(-1)
    scale = t(_ratio(scalar(gloss), loss_divisor(a.shape, norm, w.sum(dtype=np.float64), D)))
    _grad_w(a.size, a.reshape(-1), b.reshape(-1), w, D, kind, t(beta), scale, g.reshape(-1))
    return g


def mse_loss(pred, target, weight=None, norm="elements"):
    return _forward(MSE, pred, target, 1.0, weight, norm)


def mse_loss_backward(pred, target, gloss=1.0, weight=None, norm="elements"):
    return _backward(MSE, pred, target, gloss, 1.0, weight, norm)


def smooth_l1_loss(pred, target, beta=1.0, weight=None, norm="elements"):
    return _forward(SMOOTH_L1, pred, target, beta, weight, norm)


def smooth_l1_loss_backward(pred, target, gloss=1.0, beta=1.0, weight=None, norm="elements"):
    return _backward(SMOOTH_L1, pred, target, gloss, beta, weight, norm)


def bce_with_logits(logits, target, weight=None, norm="elements"):
    return _forward(BCE_LOGITS, logits, target, 1.0, weight, norm)


def bce_with_logits_backward(logits, target, gloss=1.0, weight=None, norm="elements"):
    return _backward(BCE_LOGITS, logits, target, gloss, 1.0, weight, norm)
