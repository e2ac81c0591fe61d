"""lib/det.net's rpn_losses is torchvision's RegionProposalNetwork.compute_loss.

torchvision (models/detection/rpn.py): objectness BCE averaged over the sampled anchors;
box smooth-L1 (beta 1/9) summed over the sampled positives' 4 deltas and divided by the
number of sampled anchors, positives and negatives. The block gets this from
`positive(labels, min=0)` (1 on every sampled anchor) and smooth_l1's norm "weight_rows"
(the sum of a per-row weight). Checked: the block through a graph (losses and gradients)
against compute_loss itself, its sampler replaced by the graph's own labels; the new norm's
kernels against the torch formula; and the CUDA twins against the CPU under the simulator.
"""
import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import tvref
from helpers import SPECS, compile_text, script_results
from netdsl.kernels import cpu as C
from netdsl.runtime.model import Model

HERE = Path(__file__).resolve()
F = torch.nn.functional
K = 96      # anchors an image: 4x4 cells x 6; fewer than the 256 sampled, so every labelled one is

GRAPH = f"""import "{SPECS}/lib/det.net"
network t() {{
  input features: f32[2, 1, 4, 4]
  input gt_boxes: f32[2, 3, 4]
  input gt_labels: i64[2, 3]
  input one: f32[1, 1]
  anchors = anchors(features, sizes=[16.0, 32.0], ratios=[0.5, 1.0, 2.0], stride=16)
  scores = one -> linear({2 * K} * 2, bias=false, name="s") -> reshape([2, {K}, 2])
  deltas = one -> linear({2 * K} * 4, bias=false, name="d") -> reshape([2, {K}, 4])
  c, b = rpn_losses(scores, deltas, anchors, gt_boxes, gt_labels, name="rpn_loss")
  labels, matched = assign_targets(anchors, gt_boxes, gt_labels, fg_iou=0.7, bg_iou=0.3, binary=true)
  output labels, matched, anchors
  loss cls = c
  loss box = b
}}
"""


class _Sampler:
    """compute_loss's fg_bg_sampler, answering with the graph's labels (all sampled)."""

    def __init__(self, labels):
        self.labels = labels

    def __call__(self, _):
        return [torch.tensor(l == 1) for l in self.labels], [torch.tensor(l == 0) for l in self.labels]


def test_rpn_losses_is_torchvisions_compute_loss(tmp_path):
    tv = tvref.load()
    if tv is None:
        pytest.skip(tvref.SKIP_REASON)
    rpn = importlib.import_module("torchvision.models.detection.rpn")
    g = compile_text(tmp_path, GRAPH)
    rng = np.random.default_rng(5)
    gb = np.array([[[4, 6, 30, 34], [30, 28, 60, 50], [0, 0, 0, 0]],
                   [[16, 8, 48, 56], [0, 0, 0, 0], [0, 0, 0, 0]]], np.float32)
    gl = np.array([[1, 2, -1], [3, -1, -1]])
    s = rng.standard_normal((2 * K * 2, 1)) * 2
    d = rng.standard_normal((2 * K * 4, 1)) * 0.3
    m = Model(g, params={"s.weight": s, "d.weight": d}, dtype=np.float64)
    feeds = {"features": np.zeros((2, 1, 4, 4)), "gt_boxes": gb, "gt_labels": gl, "one": np.ones((1, 1))}
    _, losses, outs, grads = m.train_step(feeds)
    labels, matched, anchors = outs["labels"], outs["matched"], outs["anchors"]
    assert (labels == 1).sum() >= 3 and (labels == 0).sum() > 100 and (labels == -1).any()

    scores = torch.tensor(s.reshape(2 * K, 2), requires_grad=True)
    deltas = torch.tensor(d.reshape(2 * K, 4), requires_grad=True)
    coder = tv.det_utils.BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
    a = torch.tensor(anchors[:, -4:])
    targets = [coder.encode_single(torch.tensor(matched[n]), a) for n in range(2)]
    this = type("RPN", (), {"fg_bg_sampler": _Sampler(labels)})()
    # one logit (object - background) is the 2-way softmax's binary cross-entropy
    cls, box = rpn.RegionProposalNetwork.compute_loss(
        this, scores[:, 1] - scores[:, 0], deltas, [torch.tensor(l, dtype=torch.float64) for l in labels], targets)
    (cls + box).backward()
    assert losses["cls"] == pytest.approx(cls.item(), rel=1e-12)
    assert losses["box"] == pytest.approx(box.item(), rel=1e-12) and box.item() > 0.01
    np.testing.assert_allclose(np.asarray(grads["s.weight"]).reshape(-1), scores.grad.numpy().reshape(-1),
                               rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(np.asarray(grads["d.weight"]).reshape(-1), deltas.grad.numpy().reshape(-1),
                               rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("dt", [np.float32, np.float64], ids=["f32", "f64"])
def test_weight_rows_kernels_match_torch(dt):
    """sum(w * loss) / sum of the weights with each row once, per row and per element."""
    rng = np.random.default_rng(2)
    x, t = rng.standard_normal((2, 7, 4)).astype(dt), rng.standard_normal((2, 7, 4)).astype(dt)
    for w in (rng.random((2, 7)).astype(dt), rng.random((2, 7, 4)).astype(dt)):
        tx = torch.tensor(x, requires_grad=True)
        wb = torch.tensor(w if w.shape == x.shape else w[..., None])
        want = (wb * F.smooth_l1_loss(tx, torch.tensor(t), beta=0.5, reduction="none")).sum() / (
            wb.expand(x.shape).sum() / 4)
        want.backward()
        got = C.smooth_l1_loss(x, t, 0.5, weight=w, norm="weight_rows")
        g = C.smooth_l1_loss_backward(x, t, 0.7, 0.5, weight=w, norm="weight_rows")
        assert got.dtype == dt and got == pytest.approx(want.item(), rel=2e-6)
        np.testing.assert_allclose(g, 0.7 * tx.grad.numpy(), rtol=2e-5, atol=1e-7)
    # no weight: the mean over rows; every weight 0: 0, not NaN
    assert C.smooth_l1_loss(x, t, 0.5, norm="weight_rows") == pytest.approx(C.smooth_l1_loss(x, t, 0.5, norm="rows"))
    assert C.smooth_l1_loss(x, t, 0.5, weight=np.zeros((2, 7), dt), norm="weight_rows") == 0
    lab = np.array([[-1, 0, 1, 3], [2, -1, 0, -1]])
    np.testing.assert_array_equal(C.positive(lab, np.float32, 0), lab >= 0)
    np.testing.assert_array_equal(C.positive(lab), lab > 0)


def test_cuda_twins_match_the_cpu_under_the_simulator():
    errs = script_results(HERE, {"sim": True})["sim"]
    assert errs and all(v <= 1e-6 for v in errs.values()), errs


# ---------------------------------------------------------------- the subprocess side

def main_sim():
    from netdsl.kernels import cuda as G
    from numba import cuda
    rng = np.random.default_rng(3)
    x, t = rng.standard_normal((5, 4)).astype(np.float32), rng.standard_normal((5, 4)).astype(np.float32)
    lab = np.array([-1, 0, 1, 2, 0])
    d = cuda.to_device
    out = {}
    for tag, w in (("rows", C.positive(lab, np.float32, 0)), ("elements", rng.random((5, 4)).astype(np.float32))):
        kw = {"beta": 0.5, "norm": "weight_rows"}
        out[f"loss_{tag}"] = (G.smooth_l1_loss(d(x), d(t), weight=d(w), **kw).copy_to_host()[0],
                              C.smooth_l1_loss(x, t, weight=w, **kw))
        out[f"grad_{tag}"] = (G.smooth_l1_loss_backward(d(x), d(t), d(np.array([1.3], np.float32)), weight=d(w),
                                                        **kw).copy_to_host(),
                              C.smooth_l1_loss_backward(x, t, 1.3, weight=w, **kw))
    out["positive_min0"] = (G.positive(d(lab), np.float32, 0).copy_to_host(), C.positive(lab, np.float32, 0))
    return {k: float(np.abs(np.asarray(a, np.float64) - b).max() / max(np.abs(b).max(), 1e-6))
            for k, (a, b) in out.items()}


if __name__ == "__main__":
    import warnings
    warnings.simplefilter("ignore")
    print(json.dumps({"sim": main_sim}[sys.argv[1]]()))
