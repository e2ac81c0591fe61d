"""Local response norm, batch norm and dropout."""
import numpy as np

from . import U, as_float, kernel, njit, out_array, prange
from .rand import mix


# ---------------------------------------------------------------- LRN
# torch.nn.LocalResponseNorm: scale[c] = k + alpha/size * sum(x[c']^2) over
# c' in [c - size//2, c + (size-1)//2] (zero outside), y = x * scale^-beta.

def _lrn_fwd(x, y, scale, size, alpha, beta, k):
    N, C, L = x.shape
    a = alpha / x.dtype.type(size)
    for n in prange(N):
        for c in range(C):
            s = scale[n, c]
            s[:] = k
            for cc in range(max(0, c - size // 2), min(C, c + (size - 1) // 2 + 1)):
                xc = x[n, cc]
                for i in range(L):
                    s[i] += a * xc[i] * xc[i]
            for i in range(L):
                y[n, c, i] = x[n, c, i] * s[i] ** -beta
    return y


def _lrn_bwd(x, scale, gy, gx, size, alpha, beta):
    """gx = gy*s^-b - 2ab/size * x * sum_{windows containing c} gy x s^(-b-1)."""
    N, C, L = x.shape
    coef = x.dtype.type(2) * alpha * beta / x.dtype.type(size)
    one = x.dtype.type(1)
    for n in prange(N):
        t = np.empty((C, L), x.dtype)
        for c in range(C):
            for i in range(L):
                t[c, i] = gy[n, c, i] * x[n, c, i] * scale[n, c, i] ** (-beta - one)
        for c in range(C):
            g = gx[n, c]
            for i in range(L):
                g[i] = gy[n, c, i] * scale[n, c, i] ** -beta
            acc = np.zeros(L, x.dtype)
            for cc in range(max(0, c - (size - 1) // 2), min(C, c + size // 2 + 1)):
                for i in range(L):
                    acc[i] += t[cc, i]
            for i in range(L):
                g[i] -= coef * x[n, c, i] * acc[i]
    return gx


_lrn_fwd = kernel(_lrn_fwd)
_lrn_bwd = kernel(_lrn_bwd)


def _as3(x):
    x = as_float(x)
    return x, x.reshape(x.shape[0], x.shape[1], -1)


def local_response_norm(x, size, alpha=1e-4, beta=0.75, k=1.0):
    """(y, scale) for x[N, C, ...]; keep `scale` for the backward."""
    x, x3 = _as3(x)
    t = x.dtype.type
    y = np.empty_like(x)
    scale = np.empty_like(x)
    _lrn_fwd(x.size, x3, y.reshape(x3.shape), scale.reshape(x3.shape), int(size), t(alpha), t(beta), t(k))
    return y, scale


def local_response_norm_backward(x, scale, gy, size, alpha=1e-4, beta=0.75):
    x, x3 = _as3(x)
    t = x.dtype.type
    gx = np.empty_like(x)
    _lrn_bwd(x.size, x3, np.ascontiguousarray(scale, x.dtype).reshape(x3.shape),
             np.ascontiguousarray(gy, x.dtype).reshape(x3.shape), gx.reshape(x3.shape),
             int(size), t(alpha), t(beta))
    return gx


# ---------------------------------------------------------------- batch norm
# Works on [N, C, L] views (L = H*W for 2-D, 1 for [N, C]); per-channel sums
# are accumulated in float64 on purpose (M can be large), results stored in x.dtype.

def _bn_stats(x, mean, var):
    N, C, L = x.shape
    M = N * L
    xf = x.reshape(-1)
    for c in prange(C):
        s = 0.0
        for n in range(N):
            base = (n * C + c) * L
            for i in range(L):
                s += xf[U(base + i)]
        mu = s / M
        v = 0.0
        for n in range(N):
            base = (n * C + c) * L
            for i in range(L):
                d = xf[U(base + i)] - mu
                v += d * d
        mean[c] = mu
        var[c] = v / M
    return mean


def _affine(x, m, a, b, y):
    """y[n, c, :] = (x[n, c, :] - m[c]) * a[c] + b[c]. Centring first matters in float32:
    x*a + (b - m*a) cancels badly when |mean| >> std and flips signs near zero."""
    N, C, L = x.shape
    xf, yf = x.reshape(-1), y.reshape(-1)
    for n in prange(N):
        for c in range(C):
            base, mc, ac, bc = (n * C + c) * L, m[c], a[c], b[c]
            for i in range(L):
                yf[U(base + i)] = (xf[U(base + i)] - mc) * ac + bc
    return y


def _bn_bwd(x, gy, mean, invstd, gamma, gx, ggamma, gbeta):
    N, C, L = x.shape
    M = N * L
    xf, gyf, gxf = x.reshape(-1), gy.reshape(-1), gx.reshape(-1)
    for c in prange(C):
        sg = 0.0
        sgx = 0.0
        mc = mean[c]
        for n in range(N):
            base = (n * C + c) * L
            for i in range(L):
                g = gyf[U(base + i)]
                sg += g
                sgx += g * (xf[U(base + i)] - mc)
        sgx *= invstd[c]  # = sum(gy * xhat)
        ggamma[c] = sgx
        gbeta[c] = sg
        k = gamma[c] * invstd[c]
        mg = x.dtype.type(sg / M)
        mx = x.dtype.type(sgx / M) * invstd[c]
        for n in range(N):
            base = (n * C + c) * L
            for i in range(L):
                xh = xf[U(base + i)] - mc
                gxf[U(base + i)] = k * (gyf[U(base + i)] - mg - xh * mx)
    return gx


_bn_stats = kernel(_bn_stats)
_affine = kernel(_affine)
_bn_bwd = kernel(_bn_bwd)


def _vec(v, C, dtype, fill):
    return np.full(C, fill, dtype) if v is None else np.ascontiguousarray(v, dtype).reshape(C)


def batchnorm_stats(x, running_mean=None, running_var=None, momentum=0.1, eps=1e-5):
    """Batch statistics of x[N, C, ...]: (mean, invstd) in x's dtype, accumulated in float64.

    running_mean / running_var (if given) are updated in place like torch:
    r = (1 - momentum) * r + momentum * stat, with the unbiased batch variance."""
    x, x3 = _as3(x)
    N, C, L = x3.shape
    mean = np.empty(C, np.float64)
    var = np.empty(C, np.float64)
    _bn_stats(x.size, x3, mean, var)
    M = N * L
    if running_mean is not None:
        running_mean *= 1 - momentum
        running_mean += momentum * mean
    if running_var is not None:
        running_var *= 1 - momentum
        running_var += momentum * var * (M / max(M - 1, 1))
    return mean.astype(x.dtype), (1.0 / np.sqrt(var + eps)).astype(x.dtype)


def batchnorm_train(x, gamma=None, beta=None, running_mean=None, running_var=None,
                    momentum=0.1, eps=1e-5, out=None):
    """Training batch norm over x[N, C, ...]: returns (y, batch_mean, batch_invstd);
    out (here and below): an array of x's size to write y into."""
    mean, invstd = batchnorm_stats(x, running_mean, running_var, momentum, eps)
    return batchnorm_apply(x, gamma, beta, mean, invstd, out), mean, invstd


def batchnorm_apply(x, gamma, beta, mean, invstd, out=None):
    """The normalisation of batchnorm_train with given statistics (its replay: same bits)."""
    x, x3 = _as3(x)
    C = x3.shape[1]
    y = out_array(out, x.shape, x.dtype)
    _affine(x.size, x3, mean, _vec(gamma, C, x.dtype, 1) * invstd, _vec(beta, C, x.dtype, 0), y.reshape(x3.shape))
    return y


def batchnorm_backward(x, gy, gamma, mean, invstd, gx_out=None):
    """(gx, ggamma, gbeta) for batchnorm_train, from its saved mean / invstd."""
    x, x3 = _as3(x)
    C = x3.shape[1]
    gx = out_array(gx_out, x.shape, x.dtype)
    ggamma = np.empty(C, x.dtype)
    gbeta = np.empty(C, x.dtype)
    _bn_bwd(x.size, x3, np.ascontiguousarray(gy, x.dtype).reshape(x3.shape),
            _vec(mean, C, x.dtype, 0), _vec(invstd, C, x.dtype, 0), _vec(gamma, C, x.dtype, 1),
            gx.reshape(x3.shape), ggamma, gbeta)
    return gx, ggamma, gbeta


def batchnorm_infer(x, gamma, beta, running_mean, running_var, eps=1e-5, out=None):
    x, x3 = _as3(x)
    C = x3.shape[1]
    invstd = 1.0 / np.sqrt(np.asarray(running_var, np.float64) + eps)
    a = (_vec(gamma, C, np.float64, 1) * invstd)
    y = out_array(out, x.shape, x.dtype)
    _affine(x.size, x3, _vec(running_mean, C, x.dtype, 0), a.astype(x.dtype), _vec(beta, C, x.dtype, 0),
            y.reshape(x3.shape))
    return y


def _check(ndim, want, name):
    if ndim not in want:
        raise ValueError(f"{name}: expected {' or '.join(map(str, want))}-D input, got {ndim}-D")


def batchnorm2d_train(x, *a, **kw):
    _check(np.ndim(x), (4,), "batchnorm2d")
    return batchnorm_train(x, *a, **kw)


def batchnorm1d_train(x, *a, **kw):
    _check(np.ndim(x), (2, 3), "batchnorm1d")
    return batchnorm_train(x, *a, **kw)


batchnorm2d_backward = batchnorm1d_backward = batchnorm_backward
batchnorm2d_infer = batchnorm1d_infer = batchnorm_infer


# ---------------------------------------------------------------- dropout
# The mask comes from a counter-based hash (splitmix64 of seed and element
# index, rand.py): deterministic for a seed regardless of thread count, and a GPU
# kernel can reproduce it bit for bit.

def _mask(mask, seed, threshold):
    base = mix(seed)
    for i in prange(mask.size):
        mask[i] = (mix(base + np.uint64(i)) >> np.uint64(11)) >= threshold
    return mask


def _scale_by_mask(x, mask, scale, y):
    for i in prange(x.size):
        y[i] = x[i] * scale if mask[i] else x.dtype.type(0)
    return y


_mask = kernel(_mask)
_scale_by_mask = kernel(_scale_by_mask)


def dropout_mask(shape, p, seed):
    """uint8 keep-mask: each element kept with probability 1 - p."""
    mask = np.empty(shape, np.uint8)
    thr = np.uint64(min(max(p, 0.0), 1.0) * 2.0 ** 53)
    _mask(mask.size, mask.reshape(-1), np.uint64(seed % 2 ** 64), thr)
    return mask


def _inv_keep(p, dtype):
    return dtype.type(0 if p >= 1 else 1.0 / (1.0 - p))


def dropout(x, p, seed=None, mask=None):
    """Inverted dropout: (y, mask) with y = x * mask / (1 - p).
    Pass `mask` to reuse one, else it is drawn from `seed` (random if None)."""
    x = as_float(x)
    if mask is None:
        if seed is None:
            seed = int(np.random.randint(0, 2 ** 63 - 1))
        mask = dropout_mask(x.shape, p, seed)
    mask = np.ascontiguousarray(mask, np.uint8)
    y = np.empty_like(x)
    _scale_by_mask(x.size, x.reshape(-1), mask.reshape(-1), _inv_keep(p, x.dtype), y.reshape(-1))
    return y, mask


def dropout_backward(gy, mask, p):
    gy = as_float(gy)
    gx = np.empty_like(gy)
    _scale_by_mask(gy.size, gy.reshape(-1), np.ascontiguousarray(mask, np.uint8).reshape(-1),
                   _inv_keep(p, gy.dtype), gx.reshape(-1))
    return gx


# ---------------------------------------------------------------- stochastic depth
# torchvision.ops.stochastic_depth(mode="row"): one keep draw per sample, the dropout
# hash on sample indices (CUDA draws the same), the sample scaled by 1/(1 - p) or zeroed.

def _scale_rows(x, keep, scale, y):
    N, Q = x.shape
    zero = x.dtype.type(0)
    for n in prange(N):
        s = scale if keep[n] else zero
        for q in range(Q):
            y[n, q] = x[n, q] * s
    return y


_scale_rows = kernel(_scale_rows)


def drop_path(x, p, seed):
    """(y, keep): each sample x[n] kept whole with probability 1 - p, scaled by 1/(1 - p)."""
    x = as_float(x)
    keep = dropout_mask((x.shape[0],), p, seed)
    return drop_path_backward(x, keep, p), keep


def drop_path_backward(gy, keep, p):
    gy = as_float(gy)
    gx = np.empty_like(gy)
    N = gy.shape[0]
    Q = gy.size // N if N else 0
    _scale_rows(gy.size, gy.reshape(N, Q), keep, _inv_keep(p, gy.dtype), gx.reshape(N, Q))
    return gx
