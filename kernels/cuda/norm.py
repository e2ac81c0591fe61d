"""Batch norm (shared-memory reductions per channel), local response norm, dropout.

Batch norm works on [N, C, L] views (L = H*W, or 1 for [N, C]). Each channel's
statistics come from one block: threads stride over its N*L elements, then a
tree in shared memory sums their partials; the mean is found first and the
variance from centred values (two passes, as the CPU kernel does), which keeps
float32 accurate when |mean| >> std.
"""
from __future__ import annotations

import math

import numpy as np
from numba import cuda, uint64

from . import TPB_RED, device, empty, flat, full, kernel, launch, launch_rows, tree_sum


@kernel("aiiiaaaaiffaai")
def _bn_stats(x, N, C, L, mean, invstd, rmean, rvar, has_running, momentum, eps, gamma, scale, want_scale):
    """Per channel: batch mean and 1/sqrt(var + eps); running stats updated like torch
    (unbiased variance). has_running is 0 or 1 (rmean/rvar are dummies when 0).
    want_scale 1: also scale = gamma * invstd (a fused norm-apply's factor; 2: no gamma,
    scale = invstd); gamma and scale are dummies when 0."""
    T = x.dtype.type
    sh = cuda.shared.array(TPB_RED, x.dtype)
    t = cuda.threadIdx.x
    M = N * L
    for c in range(cuda.blockIdx.x, C, cuda.gridDim.x):
        acc = T(0)
        for j in range(t, M, TPB_RED):
            n = j // L
            acc += x[(n * C + c) * L + j - n * L]
        sh[t] = acc
        tree_sum(sh, t)
        mu = sh[0] / T(M)
        cuda.syncthreads()
        acc = T(0)
        for j in range(t, M, TPB_RED):
            n = j // L
            d = x[(n * C + c) * L + j - n * L] - mu
            acc += d * d
        sh[t] = acc
        tree_sum(sh, t)
        if t == 0:
            var = sh[0] / T(M)
            mean[c] = mu
            s = T(1) / math.sqrt(var + eps)
            invstd[c] = s
            if want_scale == 1:
                scale[c] = gamma[c] * s
            elif want_scale == 2:
                scale[c] = s
            if has_running:
                rmean[c] = rmean[c] * (T(1) - momentum) + momentum * mu
                rvar[c] = rvar[c] * (T(1) - momentum) + momentum * var * (T(M) / T(max(M - 1, 1)))
        cuda.syncthreads()


@kernel("aaaaiif")
def _bn_scale(gamma, invstd, var, scale, has_gamma, from_var, eps):
    """scale[c] = gamma[c] * invstd[c] (the factor of a fused norm-apply); from_var 1:
    invstd[c] = 1/sqrt(var[c] + eps) first (running statistics, inference)."""
    T = scale.dtype.type
    for c in range(cuda.grid(1), scale.size, cuda.gridsize(1)):
        if from_var:
            invstd[c] = T(1) / math.sqrt(var[c] + eps)
        scale[c] = gamma[c] * invstd[c] if has_gamma else invstd[c]


@kernel("aiiaaaaa")
def _bn_apply(x, C, L, mean, invstd, gamma, beta, y):
    """y = (x - mean[c]) * gamma[c] * invstd[c] + beta[c]: centring first matters in float32."""
    for e in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        c = (e // L) % C
        y[e] = (x[e] - mean[c]) * (gamma[c] * invstd[c]) + beta[c]


@kernel("aiiaaaaaf")
def _bn_apply_running(x, C, L, rmean, rvar, gamma, beta, y, eps):
    T = x.dtype.type
    for e in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        c = (e // L) % C
        y[e] = (x[e] - rmean[c]) * (gamma[c] * (T(1) / math.sqrt(rvar[c] + eps))) + beta[c]


@kernel("aaiiiaaaa")
def _bn_bwd_sums(x, gy, N, C, L, mean, invstd, ggamma, gbeta):
    """gbeta[c] = sum gy, ggamma[c] = sum gy * xhat: two trees in one pass."""
    T = x.dtype.type
    sa = cuda.shared.array(TPB_RED, x.dtype)
    sb = cuda.shared.array(TPB_RED, x.dtype)
    t = cuda.threadIdx.x
    M = N * L
    for c in range(cuda.blockIdx.x, C, cuda.gridDim.x):
        a = T(0)
        b = T(0)
        for j in range(t, M, TPB_RED):
            n = j // L
            i = (n * C + c) * L + j - n * L
            a += gy[i]
            b += gy[i] * (x[i] - mean[c])
        sa[t] = a
        sb[t] = b
        tree_sum(sa, t)
        tree_sum(sb, t)
        if t == 0:
            gbeta[c] = sa[0]
            ggamma[c] = sb[0] * invstd[c]
        cuda.syncthreads()


@kernel("aaiiiaaaaaa")
def _bn_bwd_apply(x, gy, N, C, L, mean, invstd, gamma, ggamma, gbeta, gx):
    T = x.dtype.type
    M = T(N * L)
    for e in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        c = (e // L) % C
        k = gamma[c] * invstd[c]
        mx = ggamma[c] / M * invstd[c]
        gx[e] = k * (gy[e] - gbeta[c] / M - (x[e] - mean[c]) * mx)


def _ncl(x):
    return x.shape[0], x.shape[1], math.prod(x.shape[2:])


def _vec(v, C, dtype, fill):
    return full(C, fill, dtype) if v is None else flat(v)


def batchnorm_train(x, gamma=None, beta=None, running_mean=None, running_var=None, momentum=0.1, eps=1e-5):
    """(y, batch_mean, batch_invstd); running stats (device arrays) are updated in place."""
    N, C, L = _ncl(x)
    t = np.dtype(x.dtype).type
    mean, invstd = empty(C, x.dtype), empty(C, x.dtype)
    has = running_mean is not None and running_var is not None
    rm = flat(running_mean) if has else mean
    rv = flat(running_var) if has else invstd
    launch_rows(_bn_stats, C, flat(x), N, C, L, mean, invstd, rm, rv, int(has), t(momentum), t(eps), mean, mean, 0)
    return batchnorm_apply(x, gamma, beta, mean, invstd), mean, invstd


def batchnorm_stats_scale(x, gamma=None, running_mean=None, running_var=None, momentum=0.1, eps=1e-5):
    """(mean, invstd, gamma * invstd) of x[N, C, ...] in one launch, for a norm-apply fused
    with what follows it (runtime/fused.py); running stats updated as batchnorm_train does."""
    N, C, L = _ncl(x)
    t = np.dtype(x.dtype).type
    mean, invstd, scale = empty(C, x.dtype), empty(C, x.dtype), empty(C, x.dtype)
    has = running_mean is not None and running_var is not None
    rm = flat(running_mean) if has else mean
    rv = flat(running_var) if has else invstd
    launch_rows(_bn_stats, C, flat(x), N, C, L, mean, invstd, rm, rv, int(has), t(momentum), t(eps),
                mean if gamma is None else flat(gamma), scale, 2 if gamma is None else 1)
    return mean, invstd, scale


def batchnorm_scale(gamma, invstd=None, running_var=None, eps=1e-5):
    """(invstd, gamma * invstd) per channel: of the given invstd (a replay), or of the
    running variance (inference: invstd = 1/sqrt(var + eps))."""
    v = invstd if invstd is not None else running_var
    t = np.dtype(v.dtype).type
    scale = empty(v.size, v.dtype)
    inv = flat(invstd) if invstd is not None else empty(v.size, v.dtype)
    launch(_bn_scale, v.size, scale if gamma is None else flat(gamma), inv,
           inv if running_var is None else flat(running_var), scale, int(gamma is not None),
           int(invstd is None), t(eps))
    return inv, scale


def batchnorm_apply(x, gamma, beta, mean, invstd):
    """The normalisation of batchnorm_train with given statistics (its replay: same bits)."""
    N, C, L = _ncl(x)
    y = empty(x.shape, x.dtype)
    launch(_bn_apply, x.size, flat(x), C, L, mean, invstd, _vec(gamma, C, x.dtype, 1),
           _vec(beta, C, x.dtype, 0), flat(y))
    return y


def batchnorm_infer(x, gamma, beta, running_mean, running_var, eps=1e-5):
    N, C, L = _ncl(x)
    y = empty(x.shape, x.dtype)
    launch(_bn_apply_running, x.size, flat(x), C, L, flat(running_mean), flat(running_var),
           _vec(gamma, C, x.dtype, 1), _vec(beta, C, x.dtype, 0), flat(y), np.dtype(x.dtype).type(eps))
    return y


def batchnorm_backward(x, gy, gamma, mean, invstd, gg_out=None, gb_out=None):
    """(gx, ggamma, gbeta) for batchnorm_train, from its saved mean / invstd; ggamma and
    gbeta into gg_out / gb_out if given (a model's gradient buffer)."""
    from .tensor import _given
    N, C, L = _ncl(x)
    ggamma, gbeta = _given(gg_out, (C,), x.dtype), _given(gb_out, (C,), x.dtype)
    launch_rows(_bn_bwd_sums, C, flat(x), flat(gy), N, C, L, mean, invstd, ggamma, gbeta)
    gx = empty(x.shape, x.dtype)
    launch(_bn_bwd_apply, x.size, flat(x), flat(gy), N, C, L, mean, invstd, _vec(gamma, C, x.dtype, 1),
           ggamma, gbeta, flat(gx))
    return gx, ggamma, gbeta


# ---------------------------------------------------------------- LRN
# torch.nn.LocalResponseNorm: scale = k + alpha/size * sum(x[c']^2) over
# c' in [c - size//2, c + (size-1)//2], y = x * scale^-beta.

@kernel("aaaiiiifff")
def _lrn_fwd(x, y, scale, N, C, L, size, alpha, beta, k):
    T = x.dtype.type
    a = alpha / T(size)
    for e in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        c = (e // L) % C
        base = e - c * L
        s = k
        for cc in range(max(0, c - size // 2), min(C, c + (size - 1) // 2 + 1)):
            v = x[base + cc * L]
            s += a * v * v
        scale[e] = s
        y[e] = x[e] * math.pow(s, -beta)


@kernel("aaaaiiiiff")
def _lrn_bwd(x, scale, gy, gx, N, C, L, size, alpha, beta):
    """gx = gy*s^-b - 2ab/size * x * sum over the windows containing c of gy x s^(-b-1)."""
    T = x.dtype.type
    coef = T(2) * alpha * beta / T(size)
    for e in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        c = (e // L) % C
        base = e - c * L
        acc = T(0)
        for cc in range(max(0, c - (size - 1) // 2), min(C, c + size // 2 + 1)):
            i = base + cc * L
            acc += gy[i] * x[i] * math.pow(scale[i], -beta - T(1))
        gx[e] = gy[e] * math.pow(scale[e], -beta) - coef * x[e] * acc


def local_response_norm(x, size, alpha=1e-4, beta=0.75, k=1.0):
    N, C, L = _ncl(x)
    t = np.dtype(x.dtype).type
    y, scale = empty(x.shape, x.dtype), empty(x.shape, x.dtype)
    launch(_lrn_fwd, x.size, flat(x), flat(y), flat(scale), N, C, L, int(size), t(alpha), t(beta), t(k))
    return y, scale


def local_response_norm_backward(x, scale, gy, size, alpha=1e-4, beta=0.75):
    N, C, L = _ncl(x)
    t = np.dtype(x.dtype).type
    gx = empty(x.shape, x.dtype)
    launch(_lrn_bwd, x.size, flat(x), flat(scale), flat(gy), flat(gx), N, C, L, int(size), t(alpha), t(beta))
    return gx


# ---------------------------------------------------------------- dropout
# The CPU's counter-based hash (splitmix64 of seed and element index), bit for bit.

@device
def _mix(z):
    z = (z ^ (z >> uint64(30))) * uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> uint64(27))) * uint64(0x94D049BB133111EB)
    return z ^ (z >> uint64(31))


@kernel("buu")
def _mask(mask, seed, threshold):
    base = _mix(seed)
    for i in range(cuda.grid(1), mask.size, cuda.gridsize(1)):
        mask[i] = 1 if (_mix(base + uint64(i)) >> uint64(11)) >= threshold else 0


@kernel("abfa")
def _scale_by_mask(x, mask, scale, y):
    T = x.dtype.type
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        y[i] = x[i] * scale if mask[i] else T(0)


def dropout_mask(shape, p, seed):
    mask = empty(shape, np.uint8)
    thr = np.uint64(min(max(p, 0.0), 1.0) * 2.0 ** 53)
    launch(_mask, mask.size, flat(mask), np.uint64(seed % 2 ** 64), thr)
    return mask


def _inv_keep(p, dtype):
    return np.dtype(dtype).type(0 if p >= 1 else 1.0 / (1.0 - p))


def dropout(x, p, seed):
    """(y, mask): inverted dropout with the CPU's mask for the same seed."""
    mask = dropout_mask(x.shape, p, seed)
    y = empty(x.shape, x.dtype)
    launch(_scale_by_mask, x.size, flat(x), flat(mask), _inv_keep(p, x.dtype), flat(y))
    return y, mask


def dropout_backward(gy, mask, p):
    gx = empty(gy.shape, gy.dtype)
    launch(_scale_by_mask, gy.size, flat(gy), flat(mask), _inv_keep(p, gy.dtype), flat(gx))
    return gx


# ---------------------------------------------------------------- stochastic depth
# torchvision.ops.stochastic_depth(mode="row"): one keep draw per sample, the CPU's
# dropout hash on sample indices, so both targets drop the same samples for a seed.

@kernel("aibfa")
def _scale_rows(x, Q, keep, scale, y):
    """y[n, q] = x[n, q] * (scale if keep[n] else 0): x as rows of Q elements."""
    T = x.dtype.type
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        y[i] = x[i] * (scale if keep[i // Q] else T(0))


def drop_path(x, p, seed):
    """(y, keep): each sample x[n] kept whole with probability 1 - p, scaled by 1/(1 - p)."""
    keep = dropout_mask((x.shape[0],), p, seed)
    return drop_path_backward(x, keep, p), keep


def drop_path_backward(gy, keep, p):
    gx = empty(gy.shape, gy.dtype)
    Q = gy.size // gy.shape[0] if gy.shape[0] else 0
    launch(_scale_rows, gy.size, flat(gy), Q, keep, _inv_keep(p, gy.dtype), flat(gx))
    return gx
