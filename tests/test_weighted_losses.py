"""Weighted point losses (l2, smooth_l1, bce with the optional third input) against PyTorch.

The reduction is sum(w * loss) / divisor (ops/tensor.py, docs/language.md), the weight per
element or per row (the prediction's shape without its last axis), the divisor by `norm`:
elements (torch's mean of w * loss, `binary_cross_entropy_with_logits(weight=)`), rows
(torchvision's box regression: summed over the box, divided by the RoIs) or weight (the
mean over what is weighted). Kernels forward and backward in float32 and float64, float64
finite differences, and the same losses through a netdsl graph run by Model.
"""
import math

import numpy as np
import pytest
import torch

from helpers import compile_text
from netdsl.errors import NetdslError
from netdsl.kernels import cpu as C
from netdsl.runtime.model import Model

F = torch.nn.functional
TOL = {np.float32: 2e-6, np.float64: 1e-13}
SHAPE = (3, 5, 4)
KERNELS = {"l2": (C.mse_loss, C.mse_loss_backward), "smooth_l1": (C.smooth_l1_loss, C.smooth_l1_loss_backward),
           "bce": (C.bce_with_logits, C.bce_with_logits_backward)}


def elementwise(op, x, t, beta=0.5):
    """torch's per-element loss of each operator (reduction='none')."""
    if op == "l2":
        return F.mse_loss(x, t, reduction="none")
    if op == "smooth_l1":
        return F.smooth_l1_loss(x, t, reduction="none", beta=beta)
    return F.binary_cross_entropy_with_logits(x, t, reduction="none")


def torch_loss(op, x, t, w, norm, beta=0.5):
    """sum(w * loss) / divisor written in torch: the reference formula."""
    wb = w if w.shape == x.shape else w[..., None]
    total = (wb * elementwise(op, x, t, beta)).sum()
    den = {"elements": x.numel(), "rows": x.numel() // x.shape[-1],
           "weight": wb.expand(x.shape).sum()}[norm]
    return total / den


def problem(op, wshape, dt, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(SHAPE).astype(dt) * 2
    t = (rng.random(SHAPE) > 0.5).astype(dt) if op == "bce" else rng.standard_normal(SHAPE).astype(dt)
    w = (rng.random(wshape) * (rng.random(wshape) > 0.3)).astype(dt)   # some weights exactly 0
    return x, t, w


def rel(got, want):
    want = np.asarray(want, np.float64)
    return float(np.abs(np.asarray(got, np.float64) - want).max() / max(np.abs(want).max(), 1e-30))


def extra(op):
    return {"beta": 0.5} if op == "smooth_l1" else {}


# ---------------------------------------------------------------- kernels against torch

@pytest.mark.parametrize("dt", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("norm", ["elements", "rows", "weight"])
@pytest.mark.parametrize("wshape", [SHAPE, SHAPE[:-1]], ids=["per_element", "per_row"])
@pytest.mark.parametrize("op", list(KERNELS))
def test_weighted_kernel_matches_torch(op, wshape, norm, dt):
    x, t, w = problem(op, wshape, dt)
    tx = torch.tensor(x, requires_grad=True)
    want = torch_loss(op, tx, torch.tensor(t), torch.tensor(w), norm)
    want.backward()
    fwd, bwd = KERNELS[op]
    got = fwd(x, t, weight=w, norm=norm, **extra(op))
    g = bwd(x, t, 0.7, weight=w, norm=norm, **extra(op))
    assert got.dtype == dt and g.dtype == dt
    assert rel(got, want.item()) < TOL[dt]
    assert rel(g, 0.7 * tx.grad.numpy()) < TOL[dt]


@pytest.mark.parametrize("dt", [np.float32, np.float64], ids=["f32", "f64"])
def test_torch_weighted_apis_are_the_same_figures(dt):
    """The norms are torch's and torchvision's own reductions, not just our formula:
    elements = binary_cross_entropy_with_logits(weight=w); rows with a 0/1 weight =
    torchvision's fastrcnn_loss (smooth-L1 summed over the positives, / number of RoIs)."""
    x, t, w = problem("bce", SHAPE, dt)
    want = F.binary_cross_entropy_with_logits(torch.tensor(x), torch.tensor(t), weight=torch.tensor(w))
    assert rel(C.bce_with_logits(x, t, weight=w), want.item()) < TOL[dt]
    rng = np.random.default_rng(3)
    deltas, targets = rng.standard_normal((16, 4)).astype(dt), rng.standard_normal((16, 4)).astype(dt)
    labels = rng.integers(0, 4, 16)
    pos = torch.tensor(labels > 0)
    d = torch.tensor(deltas, requires_grad=True)
    box = F.smooth_l1_loss(d[pos], torch.tensor(targets)[pos], beta=1 / 9, reduction="sum") / labels.size
    box.backward()
    w = (labels > 0).astype(dt)
    assert rel(C.smooth_l1_loss(deltas, targets, 1 / 9, weight=w, norm="rows"), box.item()) < TOL[dt]
    assert rel(C.smooth_l1_loss_backward(deltas, targets, 1.0, 1 / 9, weight=w, norm="rows"), d.grad.numpy()) < TOL[dt]


def test_unweighted_is_weight_one_and_zero_weights_leave_nothing():
    x, t, _ = problem("l2", SHAPE, np.float64)
    ones = np.ones(SHAPE[:-1])
    for norm in ("elements", "rows", "weight"):
        assert C.mse_loss(x, t, weight=ones, norm=norm) == pytest.approx(C.mse_loss(x, t, norm=norm), rel=1e-14)
    assert C.mse_loss(x, t) == pytest.approx(F.mse_loss(torch.tensor(x), torch.tensor(t)).item(), rel=1e-14)
    # every weight 0 (a batch without positives): loss and gradient 0 for every norm, not NaN
    zero = np.zeros(SHAPE[:-1])
    for op, (fwd, bwd) in KERNELS.items():
        for norm in ("elements", "rows", "weight"):
            assert fwd(x, t, weight=zero, norm=norm, **extra(op)) == 0
            g = bwd(x, t, 1.0, weight=zero, norm=norm, **extra(op))
            assert np.all(g == 0), (op, norm)
    # a weight 0 element does not see its prediction at all, even a huge one
    w = np.ones(SHAPE[:-1])
    w[0, 0] = 0
    far = x.copy()
    far[0, 0] = 1e6
    assert C.mse_loss(far, t, weight=w, norm="weight") == pytest.approx(C.mse_loss(x, t, weight=w, norm="weight"))


@pytest.mark.parametrize("norm", ["elements", "rows", "weight"])
@pytest.mark.parametrize("op", list(KERNELS))
def test_gradient_matches_finite_differences(op, norm):
    x, t, w = problem(op, (2, 3), np.float64, seed=1)
    x, t = x[:2, :3, :2].copy(), t[:2, :3, :2].copy()
    if op == "smooth_l1":   # keep clear of the |d| = beta kink
        d = x - t
        x[np.abs(np.abs(d) - 0.5) < 1e-3] += 1e-2
    fwd, bwd = KERNELS[op]
    g = bwd(x, t, 1.0, weight=w, norm=norm, **extra(op))
    eps = 1e-6
    fd = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[i] += eps
        xm[i] -= eps
        fd[i] = (fwd(xp, t, weight=w, norm=norm, **extra(op)) - fwd(xm, t, weight=w, norm=norm, **extra(op))) / (2 * eps)
    assert np.abs(g - fd).max() < 1e-8, (g, fd)


def test_smooth_l1_with_beta_zero_is_l1():
    x, t, _ = problem("l2", SHAPE, np.float64)
    x[0, 0, 0] = t[0, 0, 0]          # d = 0: torch's l1 gradient there is 0
    tx = torch.tensor(x, requires_grad=True)
    want = F.smooth_l1_loss(tx, torch.tensor(t), beta=0.0)
    want.backward()
    assert C.smooth_l1_loss(x, t, 0.0) == pytest.approx(want.item(), rel=1e-14)
    np.testing.assert_allclose(C.smooth_l1_loss_backward(x, t, 1.0, 0.0), tx.grad.numpy(), rtol=1e-14)


# ---------------------------------------------------------------- through a graph

GRAPH = """
network m() {{
  input one: f32[1, 1]
  input t: f32[3, 5, 4]
  input w: f32[{wshape}]
  x = one -> linear(60, bias=false, name="x") -> reshape([3, 5, 4])
  output x
  loss l = {op}(x, t, w{args}) weight 2.0
}}
"""


@pytest.mark.parametrize("dt", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("op,norm,wshape", [
    ("l2", "weight", SHAPE[:-1]),              # pose: invisible joints weigh 0, mean over the visible
    ("smooth_l1", "rows", SHAPE[:-1]),         # Fast R-CNN: positives only, / number of RoIs
    ("bce", "elements", SHAPE),                # torch's weighted mean
    ("l2", "elements", SHAPE),
])
def test_weighted_loss_trains_through_a_graph(tmp_path, op, norm, wshape, dt):
    args = (", beta=0.5" if op == "smooth_l1" else "") + f', norm="{norm}"'
    g = compile_text(tmp_path, GRAPH.format(op=op, args=args, wshape=", ".join(map(str, wshape))))
    x, t, w = problem(op, wshape, dt, seed=2)
    m = Model(g, params={"x.weight": x.reshape(-1, 1)}, dtype=dt)
    total, losses, outs, grads = m.train_step({"one": np.ones((1, 1), dt), "t": t, "w": w})
    tx = torch.tensor(x, requires_grad=True)
    want = torch_loss(op, tx, torch.tensor(t), torch.tensor(w), norm)
    (2.0 * want).backward()
    assert rel(losses["l"], want.item()) < TOL[dt] and rel(total, 2.0 * want.item()) < TOL[dt]
    assert rel(np.asarray(grads["x.weight"]).reshape(SHAPE), tx.grad.numpy()) < TOL[dt]


def test_a_loss_without_weight_keeps_its_old_figures(tmp_path):
    g = compile_text(tmp_path, GRAPH.replace(", w{args}", "").format(op="smooth_l1", wshape="1"))
    x, t, _ = problem("l2", SHAPE, np.float64)
    m = Model(g, params={"x.weight": x.reshape(-1, 1)}, dtype=np.float64)
    _, losses, _, grads = m.train_step({"one": np.ones((1, 1)), "t": t, "w": np.ones(1)})
    tx = torch.tensor(x, requires_grad=True)
    want = F.smooth_l1_loss(tx, torch.tensor(t))
    (2.0 * want).backward()
    assert rel(losses["l"], want.item()) < 1e-13
    assert rel(np.asarray(grads["x.weight"]).reshape(SHAPE), tx.grad.numpy()) < 1e-13


@pytest.mark.parametrize("text,msg", [
    ('l2(x, t, w, norm="mean")', "attribute 'norm' must be one of elements, rows, weight"),
    ("l2(x, t, t2)", "the weight must have the prediction's shape, or that shape without its last axis"),
    ("bce(x, t, ids)", "the weight must be floating point, got i64"),
    ("smooth_l1(x, t, beta=-1.0)", "'beta' must not be negative"),
])
def test_bad_weights_are_located_errors(tmp_path, text, msg):
    with pytest.raises(NetdslError, match=msg) as e:
        compile_text(tmp_path, f"""network m() {{
  input x: f32[N, 4]
  input t: f32[N, 4]
  input t2: f32[N, 2]
  input w: f32[N]
  input ids: i64[N, 4]
  loss l = {text}
}}""")
    assert e.value.pos is not None and e.value.pos.line == 7


def test_a_loss_scaled_by_a_constant_trains(tmp_path):
    """`loss a = l2(z, y) * 2`: the loss a 0-d value (not [1]) and every gradient twice the
    unscaled loss's."""
    import numpy as np
    from helpers import compile_text
    from netdsl.runtime.model import Model
    net = ("network n() {{\n  input x: f32[N, 4]\n  input y: f32[N, 4]\n  z = x -> linear(4, name=\"fc\")\n"
           "  output z\n  loss a = l2(z, y){}\n}}\n")
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    one = Model(compile_text(tmp_path, net.format("")), dtype=np.float64, seed=1)
    two = Model(compile_text(tmp_path, net.format(" * 2"), name="two.net"), dtype=np.float64,
                params={k: v.copy() for k, v in one.params.items()})
    t1, l1, _, g1 = one.train_step({"x": x, "y": y})
    t2, l2, _, g2 = two.train_step({"x": x, "y": y})
    assert np.ndim(two.infer({"x": x, "y": y})["a"]) == 0
    assert abs(t2 - 2 * t1) < 1e-12 and abs(l2["a"] - 2 * l1["a"]) < 1e-12
    for k in g1:
        np.testing.assert_allclose(g2[k], 2 * g1[k], rtol=1e-12)


def test_cross_entropy_with_every_label_ignored_is_zero():
    """A batch with nothing labelled (an SSD image without a positive keeps no negative)
    adds nothing: loss 0 and gradient 0, where torch gives NaN; the point losses' empty
    divisors behave the same."""
    z = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    loss, probs = C.softmax_cross_entropy(z, np.full(4, -1), -1)
    assert loss == 0 and np.isfinite(probs).all()
    assert not C.softmax_cross_entropy_backward(probs, np.full(4, -1), -1, 1.0).any()
