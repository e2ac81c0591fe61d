"""torchvision's pure-Python code as a test reference, without its C++ operators.

The installed torchvision (0.28.0, torch 2.13's) is the PyPI CUDA build: its compiled ops
cannot load beside CPU torch, and `import torchvision` fails. Its pure-PyTorch modules are
still the reference implementations, so this registers a bare `torchvision` package (its
__path__ the installed directory, its __init__ never run) and imports only the submodules
the tests need. `load()` returns a namespace of them, or None when torchvision is not
installed (tests then skip with that reason).

- `roi_align(...)`: torchvision.ops.roi_align._roi_align, the pure-PyTorch RoIAlign
  (differentiable by autograd), called without its lazy torch.compile wrapper; with
  `cpp_bounds=True` it also zeroes samples more than one pixel outside the map as the C++
  and CUDA kernels do (the Python transcription clamps them to the edge instead; inside
  that one-pixel margin the two agree).
- `boxes` (box_iou, box_convert, _batched_nms_vanilla...), `det_utils` (BoxCoder, Matcher,
  BalancedPositiveNegativeSampler), `anchor_utils` (AnchorGenerator, DefaultBoxGenerator),
  `roi_heads` (keypoints_to_heatmap, fastrcnn_loss...), `ssd` (SSD.compute_loss: its hard
  negative mining).
- `project_masks_on_boxes(...)`: roi_heads' own function, its roi_align call served by the
  pure-Python RoIAlign above (C++ bounds) instead of the missing C++ op.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from contextlib import contextmanager

SKIP_REASON = "torchvision (the test-only reference, pyproject's test extra) is not installed"
_NS = None


def load():
    """The reference modules (a SimpleNamespace), or None without torchvision."""
    global _NS
    if _NS is not None:
        return _NS
    spec = importlib.util.find_spec("torchvision")
    if spec is None:
        return None
    if "torchvision" not in sys.modules:
        pkg = types.ModuleType("torchvision")
        pkg.__path__ = list(spec.submodule_search_locations)
        pkg.__file__ = spec.origin
        sys.modules["torchvision"] = pkg
    # (ops/__init__ rebinds `roi_align` to the function: take the modules from sys.modules)
    mods = {name: importlib.import_module(f"torchvision.{path}") for name, path in (
        ("roi_align_module", "ops.roi_align"), ("boxes", "ops.boxes"),
        ("det_utils", "models.detection._utils"), ("anchor_utils", "models.detection.anchor_utils"),
        ("roi_heads", "models.detection.roi_heads"), ("ssd", "models.detection.ssd"))}
    _NS = types.SimpleNamespace(**mods, roi_align=roi_align, project_masks_on_boxes=project_masks_on_boxes)
    return _NS


@contextmanager
def _cpp_bounds(module):
    """Patch the module's bilinear sampler to drop samples with y < -1, y > H, x < -1 or
    x > W (torchvision/csrc/ops/cpu/roi_align_kernel.cpp's "empty" samples)."""
    original = module._bilinear_interpolate

    def sampler(input, roi_batch_ind, y, x, ymask, xmask):
        H, W = input.shape[-2:]
        iny = ((y >= -1.0) & (y <= H)).to(input.dtype)     # [K, PH, IY]
        inx = ((x >= -1.0) & (x <= W)).to(input.dtype)     # [K, PW, IX]
        keep = iny[:, None, :, None, :, None] * inx[:, None, None, :, None, :]
        return original(input, roi_batch_ind, y, x, ymask, xmask) * keep

    module._bilinear_interpolate = sampler
    try:
        yield
    finally:
        module._bilinear_interpolate = original


def roi_align(input, rois, scale, out, sampling, aligned, cpp_bounds=True):
    """torchvision's pure-Python RoIAlign: [N, C, H, W], [K, 5] -> [K, C, oh, ow]."""
    m = load().roi_align_module
    fn = getattr(m._roi_align, "__wrapped__", m._roi_align)     # not torch.compile'd
    oh, ow = (out, out) if isinstance(out, int) else out
    if not cpp_bounds:
        return fn(input, rois, scale, oh, ow, sampling, aligned)
    with _cpp_bounds(m):
        return fn(input, rois, scale, oh, ow, sampling, aligned)


def project_masks_on_boxes(gt_masks, boxes, matched_idxs, M):
    """torchvision's roi_heads.project_masks_on_boxes: [G, H, W] masks, [R, 4] boxes, [R]
    gt indices -> [R, M, M]. Its module-level `roi_align` (the C++ op's wrapper) is swapped
    for the pure-Python one while it runs."""
    m = load().roi_heads
    original = m.roi_align

    def pure(input, rois, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False):
        return roi_align(input, rois, spatial_scale, output_size, sampling_ratio, aligned)

    m.roi_align = pure
    try:
        return m.project_masks_on_boxes(gt_masks, boxes, matched_idxs, M)
    finally:
        m.roi_align = original
