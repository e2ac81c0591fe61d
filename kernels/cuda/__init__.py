"""Hand-written numba.cuda kernels (NCHW, float32 or float64), forward and backward.

The CUDA twin of `kernels/cpu/`: each public host function takes device arrays
and returns device arrays, with the same name and meaning as its CPU sibling.
Elementwise and fused kernels are not here: `kernels/codegen` renders them for
CUDA from the same scalar definitions as for the CPU.

Kernels take flat (1-D, C-contiguous) arrays and int64 geometry, and are typed
by their arguments: float constants come from the array dtype (`T = x.dtype.type`)
and integers are converted before they meet a float, so no float64 enters a
float32 kernel. `tests/test_cuda_ptx.py` checks that on the PTX of every kernel
listed in REGISTRY, each compiled for the signature its `kinds` string describes.

Every kernel is `cuda.jit(cache=True)`: compiled code is cached on disk beside
this package (`__pycache__`), so a second process does not recompile.
"""
from __future__ import annotations

import math
import os

import numpy as np
from numba import cuda

if not hasattr(np, "row_stack"):
    # numba-cuda (<= 0.30.4, the newest) registers an overload of np.row_stack, which
    # NumPy 2.5 removed: without the alias every kernel's first compile or cache load
    # fails with an AttributeError. Seen on the GPU machine's numpy 2.5.2.
    np.row_stack = np.vstack

# Threads per block of flat grid-stride kernels. The simulator runs every thread
# as a Python thread, so it gets small blocks (the loops are grid-stride: any
# block size computes the same thing).
TPB = 64 if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1" else 256
TPB_RED = 128        # threads per block of a shared-memory tree reduction (a power of two)
MAX_BLOCKS = 65535   # grid-stride loops cover the rest

# (name, dispatcher, kinds) of every kernel, for the PTX test. kinds: one letter
# per argument: a = float array, f = float scalar, i = int64, l = int64 array,
# b = uint8 array, u = uint64 scalar, w = float32 array whatever the dtype.
REGISTRY: list[tuple[str, object, str]] = []


def kernel(kinds: str):
    """cuda.jit(cache=True) that also records the kernel's argument kinds."""
    def wrap(fn):
        if len(kinds) != fn.__code__.co_argcount:
            raise TypeError(f"{fn.__name__}: {len(kinds)} kinds for {fn.__code__.co_argcount} arguments")
        d = cuda.jit(cache=True)(fn)
        REGISTRY.append((f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}", d, kinds))
        return d
    return wrap


def device(fn):
    """A device function called from kernels (inlined)."""
    return cuda.jit(device=True, inline=True)(fn)


def signature(kinds: str, dtype):
    """The numba signature of a kernel with these argument kinds for one float dtype."""
    from numba import from_dtype, int64, uint8, uint64, float32
    t = from_dtype(np.dtype(dtype))
    table = {"a": t[::1], "f": t, "i": int64, "l": int64[::1], "b": uint8[::1], "u": uint64,
             "w": float32[::1]}
    return tuple(table[k] for k in kinds)


def blocks(n, tpb=TPB):
    return max(1, min(math.ceil(n / tpb), MAX_BLOCKS))


def launch(k, n, *args):
    """Run a grid-stride kernel over n items."""
    if n > 0:
        k[blocks(n), TPB](*args)


def launch_rows(k, rows, *args):
    """Run a reduction kernel: one block of TPB_RED threads per row (grid-stride over rows)."""
    if rows > 0:
        k[min(rows, MAX_BLOCKS), TPB_RED](*args)


def empty(shape, dtype):
    return cuda.device_array(shape, dtype)


def zeros(shape, dtype):
    a = cuda.device_array(shape, dtype)
    if a.size:
        launch(_fill, a.size, flat(a), np.dtype(dtype).type(0))
    return a


def full(shape, value, dtype):
    a = cuda.device_array(shape, dtype)
    if a.size:
        launch(_fill, a.size, flat(a), np.dtype(dtype).type(value))
    return a


def flat(a):
    return a.reshape(a.size) if a.ndim != 1 else a


def to_device(x, dtype=None):
    """A device array: device arrays pass through (checked), host arrays are copied up."""
    if not cuda.devicearray.is_cuda_ndarray(x) and getattr(cuda, "is_cuda_array", lambda _: False)(x):
        x = cuda.as_cuda_array(x)     # CuPy, torch...: anything with __cuda_array_interface__
    if cuda.devicearray.is_cuda_ndarray(x):
        if dtype is not None and x.dtype != np.dtype(dtype):
            raise TypeError(f"device array has dtype {x.dtype}, expected {np.dtype(dtype)}")
        return x
    return cuda.to_device(np.ascontiguousarray(x, dtype=dtype))


from ..geometry import pair  # noqa: E402,F401  (shared by both targets)


@cuda.jit(cache=True)
def _fill(y, v):
    for i in range(cuda.grid(1), y.size, cuda.gridsize(1)):
        y[i] = v


REGISTRY.append(("fill", _fill, "af"))


@device
def tree_sum(sh, t):
    """Sum sh[0:TPB_RED] into sh[0]; all threads of the block must call it."""
    cuda.syncthreads()
    s = TPB_RED // 2
    while s > 0:
        if t < s:
            sh[t] += sh[t + s]
        cuda.syncthreads()
        s //= 2


@device
def tree_max(sh, t):
    cuda.syncthreads()
    s = TPB_RED // 2
    while s > 0:
        if t < s:
            sh[t] = max(sh[t], sh[t + s])
        cuda.syncthreads()
        s //= 2


from .gemm import (conv2d, conv2d_backward, conv_transpose2d, conv_transpose2d_backward,  # noqa: E402
                   gemm, linear, linear_backward)
from .patches import extract_patches, extract_patches_backward  # noqa: E402
from .boxes import (  # noqa: E402
    anchors, default_boxes, box_encode, box_decode, box_iou, nms, batched_nms, detect_nms, proposals, to_rois,
)
from .roi import (  # noqa: E402
    roi_pool, roi_pool_backward, roi_align, roi_align_backward, crop_resize, crop_resize_backward,
    l2norm, l2norm_backward, select_class, select_class_backward,
)
from .targets import (  # noqa: E402
    assign_targets, sample_anchors, sample_rois, hard_negatives, negative_loss, positive,
    match_gather, mask_targets, keypoint_targets, yolo_targets, yolo_decode,
)
from .pool import (  # noqa: E402
    maxpool2d, maxpool2d_backward, max_unpool2d, max_unpool2d_backward,
    avgpool2d, avgpool2d_backward, global_avgpool2d, global_avgpool2d_backward,
    global_maxpool2d, adaptive_avgpool2d, adaptive_avgpool2d_backward,
    upsample_nearest2d, upsample_nearest2d_backward, upsample_bilinear2d, upsample_bilinear2d_backward,
    bed_of_nails, bed_of_nails_backward,
)
from .norm import (  # noqa: E402
    batchnorm_train, batchnorm_apply, batchnorm_backward, batchnorm_infer, batchnorm_stats_scale, batchnorm_scale,
    local_response_norm, local_response_norm_backward,
    dropout, dropout_backward, dropout_mask, drop_path, drop_path_backward,
)
from .loss import (  # noqa: E402
    softmax_cross_entropy, softmax_cross_entropy_backward,
    mse_loss, mse_loss_backward, smooth_l1_loss, smooth_l1_loss_backward,
    bce_with_logits, bce_with_logits_backward, softmax, softmax_backward,
)
from .tensor import (  # noqa: E402
    reduce_axis, reduce_axes, expand_axes, broadcast_axis, sum_to, transpose, copy_into, concat, split, slice_, slice_backward, pad,
    embedding, embedding_backward, one_hot, broadcast_to, all_finite,
)
from .recurrent import (  # noqa: E402
    project, project_backward, cell_step, cell_step_grads, cell_step_backward, cell_forward, cell_backward,
    matmul_rows, weight_grad,
    attention_scores, attention_scores_backward, weighted_sum, weighted_sum_backward,
    gather_location, gather_location_backward, sample_categorical, argmax,
)
from .optim import adam_update, global_norm, scale, sgd_update  # noqa: E402
