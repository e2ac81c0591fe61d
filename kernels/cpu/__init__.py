"""Hand-written Numba CPU kernels (NCHW, float32 or float64), forward and backward.

Every public kernel is a plain function on numpy arrays; see the submodules.
"""
import os

# Must precede the numpy import: OpenBLAS worker threads and Numba's prange
# threads both spin-wait, and together they made a conv 24x slower. We
# parallelise over the batch with prange and keep each BLAS call serial.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# GNU OpenMP's default wait policy spins, which made each parallel kernel launch cost
# milliseconds on a 2-core machine; a passive policy does not. Must precede numba's OpenMP load.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import math  # noqa: E402
import types  # noqa: E402

import numpy as np  # noqa: E402,F401

from .. import native  # noqa: E402
from .jit import Deferred, Jit, prange  # noqa: E402,F401  (Numba only on a store miss)

# Below this many elements a parallel launch (~3 us) costs more than it saves.
PAR_MIN = 1 << 16

# Flat unsigned indices for prange kernels: with signed ones Numba's parallel copies keep
# negative-index wraparound checks that stop vectorisation (5-8x slower, codegen/cpu.py).
U = np.uint64

# Not fastmath=True: that implies 'nnan'/'ninf', which folds isnan() to False.
FAST = {"reassoc", "contract", "arcp", "nsz"}


def njit(fn, exact=False):
    """Serial, cached njit for helpers called from kernels; exact: IEEE order, no
    contraction or reciprocals (to follow a reference's rounding step by step)."""
    return Jit(fn, fastmath=set() if exact else FAST)


class Kernel:
    """One Python kernel body compiled twice: serial and parallel (prange).

    The parallel copy gets its own __qualname__ so the two never share an
    on-disk cache entry.
    """

    def __init__(self, fn, exact=False):
        flags = set() if exact else FAST
        self.serial = Jit(fn, fastmath=flags)
        par = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_par",
                                 fn.__defaults__, fn.__closure__)
        par.__qualname__ = fn.__qualname__ + "_par"
        par.__module__ = fn.__module__
        self.parallel = Jit(par, parallel=True, fastmath=flags)

    def pick(self, size):
        """(compiled function, thread count) for a problem of `size` elements."""
        if size >= PAR_MIN and (threads := native.get_num_threads()) > 1:
            return self.parallel, threads
        return self.serial, 1

    def __call__(self, size, *args):
        return self.pick(size)[0](*args)


def kernel(fn, exact=False):
    return Kernel(fn, exact)


from ..geometry import pair  # noqa: E402,F401  (shared by both targets)


def as_float(x):
    """C-contiguous float array; float32/float64 are kept, anything else -> float32."""
    x = np.asarray(x)
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float32)
    return np.ascontiguousarray(x)


def out_array(out, shape, dtype, zero=False):
    """The array a kernel writes its result into: `out` (a caller's buffer of that size,
    e.g. the planned workspace) viewed as `shape`, or a new one; zero: cleared first."""
    if out is None:
        return (np.zeros if zero else np.empty)(shape, dtype)
    if out.dtype != dtype or out.size != math.prod(shape) or not out.flags.c_contiguous:
        raise ValueError(f"out: expected {math.prod(shape)} contiguous {np.dtype(dtype)}, got {out.size} {out.dtype}")
    out = out.reshape(shape)
    if zero:
        out.fill(0)
    return out


def _load_cython_blas():
    """Load scipy.linalg.cython_blas without running scipy/linalg/__init__.py.

    Numba's BLAS shim (numba_xxgemm, which conv.py calls) reaches scipy's Fortran
    BLAS through that extension module's C-API table, and imports it by name on
    first use. The ordinary import first runs all of scipy.linalg's Python API and
    SciPy's array-API layer (which imports numpy.f2py), several times the cost of the
    extension module itself. A later `import scipy.linalg` still
    works and finds this module in sys.modules. On any surprise (an unusual scipy
    layout) nothing is done and the ordinary import runs.
    """
    import importlib.machinery
    import importlib.util
    import sys
    name = "scipy.linalg.cython_blas"
    if name in sys.modules or "scipy.linalg" in sys.modules:
        return
    scipy = importlib.util.find_spec("scipy")
    if scipy is None or not scipy.origin:
        return
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(os.path.dirname(scipy.origin), "linalg", "cython_blas" + suffix)
        if os.path.isfile(path):
            break
    else:
        return
    loader = importlib.machinery.ExtensionFileLoader(name, path)
    module = importlib.util.module_from_spec(importlib.util.spec_from_file_location(name, path, loader=loader))
    sys.modules[name] = module      # as the import system does, before executing it
    try:
        loader.exec_module(module)
    except ImportError:
        del sys.modules[name]


_load_cython_blas()

from .conv import conv2d, conv2d_backward, conv_transpose2d, conv_transpose2d_backward  # noqa: E402
from .dense import linear, linear_backward  # noqa: E402
from .patches import extract_patches, extract_patches_backward  # noqa: E402
from .boxes import (  # noqa: E402
    anchors, default_boxes, box_encode, box_decode, box_iou, nms, batched_nms, detect_nms, proposals, to_rois,
)
from .roi import (  # noqa: E402
    roi_pool, roi_pool_backward, roi_align, roi_align_backward, crop_resize, crop_resize_backward,
    l2norm, l2norm_backward, select_class, select_class_backward,
)
from .targets import (  # noqa: E402
    assign_targets, sample_anchors, sample_rois, hard_negatives, negative_loss, keep_hardest, positive,
    match_gather, mask_targets, keypoint_targets, yolo_targets, yolo_decode,
)
from .pool import (  # noqa: E402
    maxpool2d, maxpool2d_backward, max_unpool2d, max_unpool2d_backward,
    avgpool2d, avgpool2d_backward, global_avgpool2d, global_avgpool2d_backward,
    upsample_nearest2d, upsample_nearest2d_backward,
    upsample_bilinear2d, upsample_bilinear2d_backward,
)
from .norm import (  # noqa: E402
    local_response_norm, local_response_norm_backward,
    batchnorm_stats, batchnorm_train, batchnorm_apply, batchnorm_backward, batchnorm_infer,
    batchnorm2d_train, batchnorm2d_backward, batchnorm2d_infer,
    batchnorm1d_train, batchnorm1d_backward, batchnorm1d_infer,
    dropout, dropout_backward, dropout_mask, drop_path, drop_path_backward,
)
from .reduce import reduce_axes, expand_axes  # noqa: E402
from .recurrent import (  # noqa: E402
    project, project_backward, cell_step, cell_step_grads, cell_step_backward, cell_forward, cell_backward,
    matmul_rows, weight_grad,
    attention_scores, attention_scores_backward, weighted_sum, weighted_sum_backward,
    gather_location, gather_location_backward, sample_categorical, argmax,
)
from .recurrent_layer import layer_forward, layer_backward  # noqa: E402
from .loss import (  # noqa: E402
    softmax_cross_entropy, softmax_cross_entropy_backward,
    mse_loss, mse_loss_backward, smooth_l1_loss, smooth_l1_loss_backward,
    bce_with_logits, bce_with_logits_backward,
)
