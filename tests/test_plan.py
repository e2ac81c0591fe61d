"""The planner's fusion, liveness and in-place decisions, checked against an unfused run."""
import json
import re

import numpy as np
import pytest

from helpers import cli, compile_spec, compile_text
from netdsl.autodiff import build
from netdsl.plan import plan
from netdsl.runtime.model import Model


def test_resnet18_plan_fuses_norms_activations_and_their_gradients():
    g = compile_spec("resnet18.net")
    tg = build(g)
    p = plan(tg.nodes, tg.keep(), {"N": 64})
    names = {s.name for s in p.steps if len(s.nodes) > 1}
    assert {"bn+relu", "bn+add+relu", "relu'0+bn_grad", "add+relu'0"} <= names
    assert sum(len(s.nodes) for s in p.steps) == len(tg.nodes)      # every node runs exactly once
    assert p.peak_planned < p.peak_naive / 2
    assert any(s.inplace for s in p.steps)


def test_norm_and_relu_outputs_are_recomputed_in_the_backward_not_kept():
    g = compile_spec("resnet18.net")
    kept, again = build(g, recompute=False), build(g)
    assert again.nodes[:again.n_forward] == kept.nodes[:kept.n_forward]     # the forward is untouched
    replays = {n.path: n for n in again.backward if n.path.endswith(".recompute")}
    # each basic block's first norm + ReLU, and the stem's, replayed from the norm's saved
    # statistics; and the stem conv, which reads only the image and its weights
    assert {"bn1.recompute", "relu1.recompute", "layer1.0.bn1.recompute", "layer4.1.relu1.recompute",
            "conv1.recompute"} <= set(replays)
    assert not any(p.startswith("layer1.0.conv") for p in replays)     # a conv of a kept activation is kept
    assert all(n.fwd is not None and n.fwd.path + ".recompute" == n.path for n in replays.values())
    # placed just before its first reader: layer1.0's relu1 is first read by conv2's gradient
    order = [n.path for n in again.backward]
    assert order.index("layer1.0.relu1.recompute") == order.index("layer1.0.conv2.conv_grad") - 1
    p0, p1 = (plan(t.nodes, t.keep(), {"N": 8}) for t in (kept, again))
    assert p1.peak_planned < 0.75 * p0.peak_planned       # 183 -> 127 MiB at 224x224


def test_compile_explain_reports_the_plan():
    r = cli("compile", "specs/resnet18.net", "--explain", "--batch", "8")
    assert r.returncode == 0, r.stderr
    assert "relu'0+bn_grad" in r.stdout
    assert int(re.search(r"recomputed\s+(\d+) forward nodes", r.stdout).group(1)) >= 19
    unplanned, planned = map(float, re.search(r"([\d.]+) MiB with every intermediate kept; ([\d.]+) MiB planned",
                                              r.stdout).groups())
    assert planned < unplanned / 2
    j = json.loads(cli("compile", "specs/resnet18.net", "--explain", "--json", "--batch", "8").stdout)["plan"]
    assert {"conv1", "bn1", "relu1", "layer4.1.relu1"} <= set(j["recomputed"])
    assert j["peak_bytes_planned"] == pytest.approx(planned * 2**20, rel=1e-3)


VIEW_SPEC = """
network views() {
  input image: f32[N, 1, 6, 6]
  input label: i64[N]
  a = image -> conv(4, k=3, p=1)
  f = flatten(a)                 # a view of a's buffer, alive until the concat
  c = relu(a) * 2.0              # a's last use: an in-place candidate the view must veto
  logits = concat(flatten(c), f, axis=1) -> linear(10)
  output logits
  loss ce = cross_entropy(logits, label)
}
"""


def _step(g, fuse, x, y):
    m = Model(g, seed=3, fuse=fuse)
    total, _, outs, grads = m.train_step({"image": x, "label": y})
    return total, outs, grads


def test_fused_and_in_place_execution_equals_unfused(tmp_path):
    rng = np.random.default_rng(0)
    for g, shape in ((compile_text(tmp_path, VIEW_SPEC), (4, 1, 6, 6)),
                     (compile_spec("resnet20_cifar.net"), (4, 3, 32, 32))):
        x = rng.standard_normal(shape).astype(np.float32)
        y = rng.integers(0, 10, shape[0])
        t1, o1, g1 = _step(g, True, x, y)
        t0, o0, g0 = _step(g, False, x, y)
        assert abs(t1 - t0) <= 1e-5 * abs(t0)
        assert np.allclose(o1["logits"], o0["logits"], rtol=1e-5, atol=1e-6)
        for k in g0:     # (float32 sums in another order: near-zero entries differ by ~1e-6 of the largest)
            assert np.allclose(g1[k], g0[k], rtol=1e-4, atol=1e-5 * np.abs(g0[k]).max()), k


@pytest.mark.parametrize("spec", ["alexnet.net", "nin_cifar10.net", "googlenet.net"])
def test_planned_execution_of_other_cnns_equals_unfused(spec):
    """Fusion, in-place reuse, recomputation and the planned workspace together, on
    networks with LRN, dropout, concat and auxiliary heads. (Not ResNeXt-50 at batch 2:
    there float32 itself is the limit, torch's layer4 gradients are 10-16% off its own
    float64 ones, and netdsl's fused and unfused runs alike.)"""
    g = compile_spec(spec)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, *[int(d) for d in g.inputs["image"].shape[1:]])).astype(np.float32)
    y = rng.integers(0, int(g.outputs["logits"].shape[1]), 2)
    t1, o1, g1 = _step(g, True, x, y)
    t0, o0, g0 = _step(g, False, x, y)
    assert abs(t1 - t0) <= 1e-4 * abs(t0)
    np.testing.assert_allclose(o1["logits"], o0["logits"], rtol=1e-4, atol=1e-5)
    for k in g0:
        assert np.allclose(g1[k], g0[k], rtol=1e-3, atol=1e-5 * max(np.abs(g0[k]).max(), 1e-12)), k


UNPOOL_SPEC = """
network unpool() {
  input image: f32[N, 2, 4, 4]
  input label: i64[N]
  p, sw = maxpool(image, k=2, s=2, switches=true)
  u = max_unpool(p, sw, k=2, s=2)
  logits = flatten(u) -> linear(3)
  output logits
  output sw
  loss ce = cross_entropy(logits, label)
}
"""


def test_exposed_maxpool_switches_are_int64_and_route_the_gradient(tmp_path):
    torch = pytest.importorskip("torch")
    g = compile_text(tmp_path, UNPOOL_SPEC)
    m = Model(g, seed=0)
    x = np.random.default_rng(1).standard_normal((2, 2, 4, 4)).astype(np.float32)
    y = np.array([0, 2])
    _, _, outs, grads = m.train_step({"image": x, "label": y})
    assert outs["sw"].dtype == np.int64
    tx = torch.tensor(x)
    p, sw = torch.nn.functional.max_pool2d(tx, 2, 2, return_indices=True)
    np.testing.assert_array_equal(outs["sw"], sw.numpy())
    u = torch.nn.functional.max_unpool2d(p, sw, 2, 2)
    w = torch.tensor(m.params["linear1.weight"], requires_grad=True)
    b = torch.tensor(m.params["linear1.bias"])
    loss = torch.nn.functional.cross_entropy(u.flatten(1) @ w.T + b, torch.tensor(y))
    loss.backward()
    np.testing.assert_allclose(grads["linear1.weight"], w.grad.numpy(), rtol=1e-5, atol=1e-6)



def test_max_unpool_of_an_odd_plane_restores_its_size(tmp_path):
    """max_unpool after maxpool(k=2) of a 5 x 7 plane is 5 x 7 (torch's output_size),
    not 4 x 6, which the switches of the last row and column would fall outside of."""
    torch = pytest.importorskip("torch")
    g = compile_text(tmp_path, UNPOOL_SPEC.replace("f32[N, 2, 4, 4]", "f32[N, 2, 5, 7]"))
    assert [tuple(v.shape[2:]) for n in g.nodes if n.op == "max_unpool" for v in n.outputs] == [(5, 7)]
    m = Model(g, seed=0)
    x = np.random.default_rng(1).standard_normal((2, 2, 5, 7)).astype(np.float32)
    y = np.array([0, 2])
    _, _, outs, grads = m.train_step({"image": x, "label": y})
    tx = torch.tensor(x)
    p, sw = torch.nn.functional.max_pool2d(tx, 2, 2, return_indices=True)
    u = torch.nn.functional.max_unpool2d(p, sw, 2, 2, output_size=(5, 7))
    w = torch.tensor(m.params["linear1.weight"], requires_grad=True)
    b = torch.tensor(m.params["linear1.bias"])
    loss = torch.nn.functional.cross_entropy(u.flatten(1) @ w.T + b, torch.tensor(y))
    loss.backward()
    np.testing.assert_allclose(grads["linear1.weight"], w.grad.numpy(), rtol=1e-5, atol=1e-6)

def test_a_node_reading_one_value_twice_gets_it_twice(tmp_path):
    """concat(x, x): a kernel of its own is handed its inputs as the node lists them
    (the planner once passed each value once, shifting the inputs after a repeat)."""
    from helpers import compile_text
    g = compile_text(tmp_path, """
network n() {
  input x: f32[N, 3]
  input t: f32[N, 4]
  y = concat(x, x) -> linear(4)
  output y
  loss l = l2(y, t)
}""")
    m = Model(g, dtype=np.float64)
    x, t = np.random.default_rng(0).standard_normal((2, 3)), np.zeros((2, 4))
    _, _, out, grads = m.train_step({"x": x, "t": t})
    xx = np.concatenate([x, x], 1)
    y = xx @ m.params["linear1.weight"].T + m.params["linear1.bias"]
    np.testing.assert_allclose(out["y"], y, rtol=1e-12)
    np.testing.assert_allclose(grads["linear1.weight"], (2 * (y - t) / y.size).T @ xx, rtol=1e-12)
