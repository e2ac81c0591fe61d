"""Reductions over axes, and data movement: transpose, concat, split, slice, pad,
broadcast, embedding, one-hot.

Every copy between two layouts is one kernel, `_strided_copy`: an n-d index walks
the (contiguous) iteration shape and addresses source and destination through
their own strides. A transpose permutes the source strides, a slice offsets and
steps them, concat / split / pad / slice_grad offset the destination, a broadcast
gives the source zero strides.
"""
from __future__ import annotations

import math

import numpy as np
from numba import cuda

from . import TPB_RED, empty, flat, kernel, launch, launch_rows, to_device, tree_sum, zeros

MAX_DIMS = 8


# ---------------------------------------------------------------- reductions

@kernel("aiiiaf")
def _sum_pq(x, P, C, Q, out, scale):
    """out[c] = scale * sum over p, q of x[p, c, q]: one block per channel, tree in shared memory."""
    T = x.dtype.type
    sh = cuda.shared.array(TPB_RED, x.dtype)
    t = cuda.threadIdx.x
    for c in range(cuda.blockIdx.x, C, cuda.gridDim.x):
        acc = T(0)
        for j in range(t, P * Q, TPB_RED):
            p = j // Q
            acc += x[(p * C + c) * Q + j - p * Q]
        sh[t] = acc
        tree_sum(sh, t)
        if t == 0:
            out[c] = sh[0] * scale
        cuda.syncthreads()


@kernel("aiiiaf")
def _sum_mid_rows(x, O, K, I, out, scale):
    """out[o, i] = scale * sum over k of x[o, k, i]: one block per output (long K)."""
    T = x.dtype.type
    sh = cuda.shared.array(TPB_RED, x.dtype)
    t = cuda.threadIdx.x
    for r in range(cuda.blockIdx.x, O * I, cuda.gridDim.x):
        o = r // I
        i = r % I
        acc = T(0)
        for k in range(t, K, TPB_RED):
            acc += x[(o * K + k) * I + i]
        sh[t] = acc
        tree_sum(sh, t)
        if t == 0:
            out[r] = sh[0] * scale
        cuda.syncthreads()


@kernel("aiiiaf")
def _sum_mid_threads(x, O, K, I, out, scale):
    """The same with one thread per output (short K, many outputs; reads coalesce along i)."""
    T = x.dtype.type
    for r in range(cuda.grid(1), O * I, cuda.gridsize(1)):
        o = r // I
        i = r % I
        acc = T(0)
        for k in range(K):
            acc += x[(o * K + k) * I + i]
        out[r] = acc * scale


def _split3(shape, axis):
    axis %= len(shape)
    return math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:])


def _given(out, shape, dtype):
    """`out` checked against the result's shape and dtype, or a new array."""
    if out is None:
        return empty(shape, dtype)
    if tuple(out.shape) != tuple(shape) or out.dtype != np.dtype(dtype):
        raise ValueError(f"output buffer {out.dtype}{list(out.shape)}, expected {np.dtype(dtype)}{list(shape)}")
    return out


def channel_sum(x, axis=1, out=None):
    """Sum over every axis but `axis`: [C] (into `out` if given)."""
    P, C, Q = _split3(x.shape, axis)
    out = _given(out, (C,), x.dtype)
    launch_rows(_sum_pq, C, flat(x), P, C, Q, out, np.dtype(x.dtype).type(1))
    return out


def reduce_axis(x, axis, mean=False, keepdims=False, scale=None, out=None):
    """Sum (or mean) over one axis, times `scale` if given (instead of mean's 1/K); into
    `out` if given."""
    O, K, I = _split3(x.shape, axis)
    axis %= x.ndim
    shape = x.shape[:axis] + ((1,) if keepdims else ()) + x.shape[axis + 1:]
    out = _given(out, shape, x.dtype)
    scale = np.dtype(x.dtype).type(scale if scale is not None else 1.0 / K if mean else 1.0)
    if K >= 4 * TPB_RED or O * I < 1024:
        launch_rows(_sum_mid_rows, O * I, flat(x), O, K, I, flat(out), scale)
    else:
        launch(_sum_mid_threads, O * I, flat(x), O, K, I, flat(out), scale)
    return out


@kernel("aiiiaf")
def _expand_mid(g, O, K, I, y, scale):
    """y[o, k, i] = scale * g[o, i]."""
    for e in range(cuda.grid(1), O * K * I, cuda.gridsize(1)):
        y[e] = g[(e // (K * I)) * I + e % I] * scale


def broadcast_axis(g, shape, axis, scale=1.0):
    """The adjoint of reduce_axis: g (without the axis) repeated K times along it, scaled."""
    O, K, I = _split3(shape, axis)
    y = empty(shape, g.dtype)
    launch(_expand_mid, y.size, flat(g), O, K, I, flat(y), np.dtype(g.dtype).type(scale))
    return y


def reduce_axes(x, axes, mean=False, keepdims=False):
    """Sum (or mean) over several axes: adjacent ones merged into one, each group
    reduced by reduce_axis from the last, the mean's 1/count applied once, at the end."""
    shape, axes = tuple(x.shape), sorted({a % x.ndim for a in axes})
    groups = []                                  # [first, last] of runs of adjacent axes
    for a in axes:
        if groups and groups[-1][1] == a - 1:
            groups[-1][1] = a
        else:
            groups.append([a, a])
    count = math.prod(shape[a] for a in axes)
    y = x
    for j, (a, b) in enumerate(reversed(groups)):  # from the right: earlier axes keep their index
        s = y.shape
        y = y.reshape(s[:a] + (math.prod(s[a:b + 1]),) + s[b + 1:])
        last = j == len(groups) - 1
        y = reduce_axis(y, a, scale=(1.0 / count if mean else 1.0) if last else 1.0)
    out = tuple(1 if i in axes else d for i, d in enumerate(shape)) if keepdims else \
        tuple(d for i, d in enumerate(shape) if i not in axes)
    return y.reshape(out)


def expand_axes(g, shape, axes, scale=1.0):
    """The adjoint of reduce_axes: g repeated along the reduced axes of `shape`, times scale."""
    axes = {a % len(shape) for a in axes}
    y = broadcast_to(g.reshape(tuple(1 if i in axes else d for i, d in enumerate(shape))), shape)
    if scale != 1.0:
        launch(_scale_in_place, y.size, flat(y), np.dtype(y.dtype).type(scale))
    return y


@kernel("af")
def _scale_in_place(y, s):
    for e in range(cuda.grid(1), y.size, cuda.gridsize(1)):
        y[e] *= s


def sum_to(g, shape):
    """Undo broadcasting: sum leading axes away, then every axis where `shape` has 1."""
    shape = tuple(shape)
    lead = g.ndim - len(shape)
    if lead:
        g = reduce_axis(g.reshape((math.prod(g.shape[:lead]),) + g.shape[lead:]), 0)
    for ax, (a, b) in enumerate(zip(g.shape, shape)):
        if b == 1 and a != 1:
            g = reduce_axis(g, ax, keepdims=True)
    return g


# ---------------------------------------------------------------- strided copies

@kernel("ailailliii")
def _strided_copy(src, s_off, s_str, dst, d_off, d_str, shape, nd, n, accumulate):
    """dst[d_off + idx . d_str] (+)= src[s_off + idx . s_str] for every idx < shape."""
    for e in range(cuda.grid(1), n, cuda.gridsize(1)):
        r = e
        si = s_off
        di = d_off
        for a in range(nd - 1, -1, -1):
            q = r % shape[a]
            r //= shape[a]
            si += q * s_str[a]
            di += q * d_str[a]
        if accumulate:
            dst[di] += src[si]
        else:
            dst[di] = src[si]


def _strides(shape):
    st, acc = [], 1
    for d in reversed(shape):
        st.append(acc)
        acc *= d
    return st[::-1]


def _ints(v):
    return to_device(np.asarray(list(v) or [0], np.int64))


def copy_view(src, s_off, s_str, dst, d_off, d_str, shape, accumulate=False):
    """Copy an n-d block of `shape` between two strided views of flat arrays."""
    n = math.prod(shape)
    if len(shape) > MAX_DIMS:
        raise ValueError(f"tensors of more than {MAX_DIMS} dimensions")
    if n:
        launch(_strided_copy, n, flat(src), s_off, _ints(s_str), flat(dst), d_off, _ints(d_str),
               _ints(shape), len(shape), n, int(accumulate))
    return dst


def transpose(x, perm):
    shape = tuple(x.shape[p] for p in perm)
    st = _strides(x.shape)
    y = empty(shape, x.dtype)
    return copy_view(x, 0, [st[p] for p in perm], y, 0, _strides(shape), shape)


def broadcast_to(x, shape):
    """A contiguous copy of x broadcast (numpy rules) to `shape`."""
    shape = tuple(shape)
    xs = (1,) * (len(shape) - x.ndim) + tuple(x.shape)
    st = [0 if d == 1 else s for d, s in zip(xs, _strides(xs))]
    y = empty(shape, x.dtype)
    return copy_view(x, 0, st, y, 0, _strides(shape), shape)


def copy_into(dst, src, axis, offset):
    """dst[..., offset:offset + src.shape[axis], ...] = src along `axis`."""
    axis %= dst.ndim
    st = _strides(dst.shape)
    return copy_view(src, 0, _strides(src.shape), dst, offset * st[axis], st, src.shape)


def concat(xs, axis):
    axis %= xs[0].ndim
    shape = list(xs[0].shape)
    shape[axis] = sum(x.shape[axis] for x in xs)
    y = empty(tuple(shape), xs[0].dtype)
    off = 0
    for x in xs:
        copy_into(y, x, axis, off)
        off += x.shape[axis]
    return y


def split(x, sizes, axis):
    axis %= x.ndim
    st = _strides(x.shape)
    outs, off = [], 0
    for s in sizes:
        shape = x.shape[:axis] + (s,) + x.shape[axis + 1:]
        y = empty(shape, x.dtype)
        copy_view(x, off * st[axis], st, y, 0, _strides(shape), shape)
        outs.append(y)
        off += s
    return outs


def _view(shape, index):
    """(offset, strides, shape) of x[index] for a tuple of ints and (start, stop, step) slices."""
    st = _strides(shape)
    off, vst, vshape = 0, [], []
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    for d, (n, s, i) in enumerate(zip(shape, st, index)):
        if isinstance(i, slice):
            a, b, c = i.indices(n)
            off += a * s
            vst.append(s * c)
            vshape.append(len(range(a, b, c)))
        else:
            off += (i % n) * s
    return off, vst, tuple(vshape)


def slice_(x, index):
    off, vst, vshape = _view(x.shape, index)
    y = empty(vshape, x.dtype)
    return copy_view(x, off, vst, y, 0, _strides(vshape), vshape)


def slice_backward(g, shape, index):
    """Zeros of `shape` with g written where the slice read."""
    gx = zeros(shape, g.dtype)
    off, vst, vshape = _view(shape, index)
    return copy_view(g, 0, _strides(vshape), gx, off, vst, vshape)


def pad(x, axis, before, after):
    axis %= x.ndim
    shape = list(x.shape)
    shape[axis] += before + after
    y = zeros(tuple(shape), x.dtype)
    return copy_into(y, x, axis, before)


# ---------------------------------------------------------------- embedding and one-hot

@kernel("alai")
def _gather_rows(w, ids, y, D):
    for e in range(cuda.grid(1), y.size, cuda.gridsize(1)):
        y[e] = w[ids[e // D] * D + e % D]


@kernel("alai")
def _scatter_rows(g, ids, gw, D):
    for e in range(cuda.grid(1), g.size, cuda.gridsize(1)):
        cuda.atomic.add(gw, ids[e // D] * D + e % D, g[e])


def embedding(w, ids):
    D = w.shape[1]
    y = empty(tuple(ids.shape) + (D,), w.dtype)
    launch(_gather_rows, y.size, flat(w), flat(ids), flat(y), D)
    return y


def embedding_backward(g, ids, wshape):
    """gw[v] = sum of the rows of g whose id is v (atomic adds: ids repeat)."""
    gw = zeros(wshape, g.dtype)
    launch(_scatter_rows, g.size, flat(g), flat(ids), flat(gw), wshape[1])
    return gw


@kernel("lwi")
def _one_hot(ids, y, K):
    for e in range(cuda.grid(1), y.size, cuda.gridsize(1)):
        y[e] = np.float32(1.0) if ids[e // K] == e % K else np.float32(0.0)


def one_hot(ids, classes):
    y = empty(tuple(ids.shape) + (classes,), np.float32)
    launch(_one_hot, y.size, flat(ids), flat(y), classes)
    return y


# ---------------------------------------------------------------- finiteness

@kernel("ab")
def _nonfinite(x, flag):
    """flag[0] = 1 if any element of x is NaN or infinite (flag starts at 0)."""
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        v = x[i]
        if v != v or v - v != v - v:
            flag[0] = 1


def all_finite(arrays) -> bool:
    """Whether every element of every device array is finite: one byte comes down."""
    flag = cuda.to_device(np.zeros(1, np.uint8))
    for a in arrays:
        if a is not None and a.size:
            launch(_nonfinite, a.size, flat(a), flag)
    return not flag.copy_to_host()[0]
