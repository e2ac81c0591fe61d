"""The operators of modern CNNs against PyTorch: relu6, hardswish, silu/swish, gelu,
clamp, sum/mean over several axes, and stochastic depth (drop_path); forward and
backward on the CPU in float32 and float64, fused and not; the CUDA runtime under
the simulator against the CPU (this file run as a script `sim` in a subprocess);
and a squeeze-excitation network training from the CLI.

The tensor an operator is applied to is a parameter (`one -> linear(P, bias=false)
-> reshape(S)` is the weight shaped S), so the training step returns its gradient.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))

from helpers import cli, compile_text  # noqa: E402
from netdsl.errors import NetdslError  # noqa: E402
from netdsl.ops import OPS  # noqa: E402
from netdsl.runtime.model import Model  # noqa: E402

if __name__ != "__main__":
    import torch
    F = torch.nn.functional

SHAPE = (2, 3, 4, 5)
TOL = {np.float32: 1e-5, np.float64: 1e-12}


def spec(expr, shape=SHAPE, out_shape=None):
    dims = lambda s: ", ".join(map(str, s))
    return f"""
network m() {{
  input one: f32[1, 1]
  input t: f32[{dims(out_shape or shape)}]
  x = one -> linear({math.prod(shape)}, bias=false, name="x") -> reshape([{dims(shape)}])
  y = {expr}
  output y
  loss l = l2(y, t)
}}
"""


def run(g, x, t, dt, fuse=True, device="cpu", step=0, seed=0):
    m = Model(g, params={"x.weight": x.reshape(-1, 1).astype(dt)}, fuse=fuse, dtype=dt, device=device, seed=seed)
    m.step = step
    loss, _, outs, grads = m.train_step({"one": np.ones((1, 1), dt), "t": t.astype(dt)})
    gx = grads["x.weight"]
    gx = gx.copy_to_host() if device == "cuda" else np.array(gx)
    return loss, outs["y"], gx.reshape(x.shape)


def torch_ref(fn, x, t, dt):
    tx = torch.tensor(x.astype(dt), requires_grad=True)
    y = fn(tx)
    loss = F.mse_loss(y, torch.tensor(t.astype(dt)))
    loss.backward()
    return float(loss.detach()), y.detach().numpy(), tx.grad.numpy()


def close(got, want, dt, what):
    assert got.shape == want.shape, (what, got.shape, want.shape)
    err = float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))
    assert err < TOL[dt], f"{what}: relative error {err:.2e}"


def data(shape, seed=0, spread=4.0):
    """Values over the activations' kinks (relu6's 6, hardswish's -3 and 3), none on one."""
    x = np.random.default_rng(seed).uniform(-2 * spread, 2 * spread, shape)
    for k in (-3.0, 0.0, 3.0, 6.0):
        x[np.abs(x - k) < 1e-3] += 2e-3
    return x


ACTIVATIONS = {
    # netdsl expression: torch reference
    "relu6(x)": lambda x: F.relu6(x),
    "hardswish(x)": lambda x: F.hardswish(x),
    "silu(x)": lambda x: F.silu(x),
    "swish(x)": lambda x: F.silu(x),
    "gelu(x)": lambda x: F.gelu(x),        # torch's default: the exact erf form
    "clamp(x, -1.5, 2)": lambda x: torch.clamp(x, -1.5, 2.0),
    "x -> clamp(min=0.5)": lambda x: torch.clamp(x, min=0.5),
    "clamp(x, max=-1)": lambda x: torch.clamp(x, max=-1.0),
    "x -> hardswish -> relu6 -> gelu": lambda x: F.gelu(F.relu6(F.hardswish(x))),
}


@pytest.mark.parametrize("dt", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("expr", list(ACTIVATIONS))
def test_activation_matches_torch(tmp_path, expr, fuse, dt):
    g = compile_text(tmp_path, spec(expr))
    x, t = data(SHAPE), np.random.default_rng(1).standard_normal(SHAPE)
    loss, y, gx = run(g, x, t, dt, fuse)
    want = torch_ref(ACTIVATIONS[expr], x, t, dt)
    assert abs(loss - want[0]) <= TOL[dt] * want[0]
    close(y, want[1], dt, "y")
    close(gx, want[2], dt, "grad")


def test_silu_at_extremes_has_finite_gradients(tmp_path):
    """exp(-a) overflows float32 below -88: the gradient is 0 there, not NaN."""
    g = compile_text(tmp_path, spec("silu(x) + gelu(x)", (6,)))
    x = np.array([-1e4, -100.0, -89.0, 0.0, 100.0, 1e4])
    _, y, gx = run(g, x, np.zeros(6), np.float32)
    want = torch_ref(lambda v: F.silu(v) + F.gelu(v), x, np.zeros(6), np.float32)
    assert np.isfinite(gx).all()
    np.testing.assert_allclose(y, want[1], rtol=1e-6)
    np.testing.assert_allclose(gx, want[2], rtol=1e-6, atol=1e-30)


def test_swish_is_silu_under_another_name(tmp_path):
    g = compile_text(tmp_path, spec("swish(x)"))
    assert OPS["swish"] is OPS["silu"]
    assert [n.op for n in g.nodes if n.op in ("silu", "swish")] == ["silu"]
    assert "swish" in OPS["silu"].doc


@pytest.mark.parametrize("text,msg", [
    ("clamp(x, 2, 1)", "clamp: min \\(2\\) is above max \\(1\\)"),
    ("sum(x, [1, 1])", "axis 1 is given twice"),
    ("mean(x, [0, 4])", "axis 4 is out of range for a tensor of rank 4"),
    ("sum(x, [])", "needs at least one axis"),
    ("drop_path(x, 1.0)", "'p' must be in \\[0, 1\\)"),
])
def test_bad_attributes_are_located_errors(tmp_path, text, msg):
    with pytest.raises(NetdslError, match=msg) as e:
        compile_text(tmp_path, spec(text))
    assert e.value.pos is not None and e.value.pos.line == 6


# ---------------------------------------------------------------- sum and mean over several axes

REDUCTIONS = {
    # expression: (torch reference, output shape)
    "sum(x, [2, 3])": (lambda x: x.sum((2, 3)), (2, 3)),
    "mean(x, [2, 3])": (lambda x: x.mean((2, 3)), (2, 3)),
    "mean(x, [0, 2], keepdim=true)": (lambda x: x.mean((0, 2), keepdim=True), (1, 3, 1, 5)),
    "sum(x, [-1, 1])": (lambda x: x.sum((1, 3)), (2, 4)),
    "mean(x, [0, 1, 2, 3])": (lambda x: x.mean((0, 1, 2, 3)).reshape(()), ()),
    "x -> sum(1)": (lambda x: x.sum(1), (2, 4, 5)),            # the one-axis form
    "mean(x, 3, keepdim=true)": (lambda x: x.mean(3, keepdim=True), (2, 3, 4, 1)),
    "mean(x)": (lambda x: x.mean(-1), (2, 3, 4)),
}


@pytest.mark.parametrize("dt", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("expr", list(REDUCTIONS))
def test_reduction_matches_torch(tmp_path, expr, dt):
    fn, out = REDUCTIONS[expr]
    if out == ():
        expr, out, fn = f"reshape({expr}, [1])", (1,), (lambda f: lambda x: f(x).reshape(1))(fn)
    g = compile_text(tmp_path, spec(expr, out_shape=out))
    x, t = data(SHAPE), np.random.default_rng(2).standard_normal(out)
    loss, y, gx = run(g, x, t, dt)
    want = torch_ref(fn, x, t, dt)
    close(y, want[1], dt, "y")
    close(gx, want[2], dt, "grad")



@pytest.mark.parametrize("dt", [np.float32, np.float64], ids=["f32", "f64"])
def test_a_loss_that_is_a_mean_over_every_axis_trains(tmp_path, dt):
    """A loss written as a reduction (an entropy penalty: mean over every axis) is 0-d at
    run time as its shape says (it used to come back [1] and stop the step)."""
    g = compile_text(tmp_path, f"""
network m() {{
  input one: f32[1, 1]
  x = one -> linear({math.prod(SHAPE)}, bias=false, name="x") -> reshape([{", ".join(map(str, SHAPE))}])
  output x
  loss l = 0.5 * mean(x * x, [0, 1, 2, 3])
}}
""")
    x = data(SHAPE)
    m = Model(g, params={"x.weight": x.reshape(-1, 1).astype(dt)}, dtype=dt)
    loss, losses, _, grads = m.train_step({"one": np.ones((1, 1), dt)})
    assert losses["l"] == pytest.approx(0.5 * float(np.mean(x.astype(dt) ** 2)), rel=1e-5)
    np.testing.assert_allclose(np.asarray(grads["x.weight"]).reshape(SHAPE), x / x.size, rtol=1e-5)

# ---------------------------------------------------------------- stochastic depth

DROP = spec("x + drop_path(x * 3, 0.4)", (64, 3, 2, 2))


def test_drop_path_is_torchvisions_row_mode(tmp_path):
    """Each sample's branch is zeroed or scaled by 1/(1-p) whole; the gradient goes
    through the same mask. torchvision.ops.stochastic_depth(mode="row") is
    input * bernoulli(1-p per sample) / (1-p); the mask is ours, read off the output."""
    g = compile_text(tmp_path, DROP)
    x = data((64, 3, 2, 2)) + 20.0      # no sample of the branch is zero by chance
    t = np.random.default_rng(3).standard_normal(x.shape)
    loss, y, gx = run(g, x, t, np.float64, step=5)
    kept = np.abs(y - x).reshape(64, -1).max(axis=1) > 0
    assert 10 < kept.sum() < 60                         # p = 0.4 of 64 samples
    noise = torch.tensor(kept, dtype=torch.float64).reshape(64, 1, 1, 1) / (1 - 0.4)
    want = torch_ref(lambda v: v + (v * 3) * noise, x, t, np.float64)
    close(y, want[1], np.float64, "y")
    close(gx, want[2], np.float64, "grad")


def test_drop_path_repeats_by_seed_and_step_and_is_identity_in_inference(tmp_path):
    g = compile_text(tmp_path, DROP)
    x = data((64, 3, 2, 2)) + 20.0
    t = np.zeros(x.shape)
    masks = {}
    for seed, step in ((0, 0), (0, 0), (0, 1), (1, 0)):
        _, y, _ = run(g, x, t, np.float32, step=step, seed=seed)
        masks.setdefault((seed, step), []).append(tuple(np.abs(y - x).reshape(64, -1).max(axis=1) > 1))
    assert masks[(0, 0)][0] == masks[(0, 0)][1]                    # a run repeats exactly
    assert masks[(0, 0)][0] != masks[(0, 1)][0] != masks[(1, 0)][0]
    m = Model(g, params={"x.weight": x.reshape(-1, 1).astype(np.float32)})
    y = m.infer({"one": np.ones((1, 1), np.float32)})["y"]
    np.testing.assert_allclose(y, 4 * x, rtol=1e-6)              # x + x*3: nothing dropped, nothing scaled


def test_drop_path_kernels_match_on_both_targets_and_p0_is_identity():
    from netdsl.kernels import cpu as K
    x = np.random.default_rng(0).standard_normal((8, 3, 5)).astype(np.float32)
    y, keep = K.drop_path(x, 0.5, seed=7)
    assert keep.shape == (8,) and set(np.unique(keep)) <= {0, 1}
    np.testing.assert_array_equal(y, x * (keep[:, None, None] / np.float32(0.5)))
    np.testing.assert_array_equal(K.drop_path_backward(x, keep, 0.5), y)
    y0, keep0 = K.drop_path(x, 0.0, seed=7)
    assert keep0.all() and np.array_equal(y0, x)


# ---------------------------------------------------------------- docs, CLI, squeeze-excitation

def test_ops_lists_the_new_operators_and_docs_name_them():
    r = cli("ops", "relu6", "hardswish", "silu", "swish", "gelu", "clamp", "drop_path", "sum", "mean")
    assert r.returncode == 0, r.stderr
    assert "clamp(a; min=-inf, max=inf)" in r.stdout and "keepdim=false" in r.stdout
    doc = (HERE.parent.parent / "docs" / "language.md").read_text()
    for name in ("relu6", "hardswish", "silu", "swish", "gelu", "clamp", "drop_path", "keepdim"):
        assert f"`{name}" in doc, name


def test_senet_spec_trains_from_the_cli(tmp_path):
    r = cli("run", "specs/senet_small.net", "--data", "digits", "--epochs", "1", "--out", tmp_path / "run")
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(np.isfinite(v) for row in rows for v in row.values() if isinstance(v, float))


# ---------------------------------------------------------------- CUDA, under the simulator

SIM_SPEC = """
network sim() {
  input one: f32[1, 1]
  input t: f32[2, 3]
  x = one -> linear(24, bias=false, name="x") -> reshape([2, 3, 2, 2])
  a = relu6(x * 2) + hardswish(x) - silu(x) * gelu(x) + clamp(x, -0.5, 0.7)
  b = x + drop_path(a, 0.5)
  s = b -> sum([1, 3], keepdim=true) -> mean([2, 3])
  y = mean(b, [2, 3]) + s
  output y
  loss l = l2(y, t)
}
"""


def test_cuda_simulator_matches_cpu():
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
    p = subprocess.run([sys.executable, str(HERE), "sim"], capture_output=True, text=True, env=env,
                       cwd=HERE.parent.parent, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    errors = json.loads(p.stdout.strip().splitlines()[-1])
    bad = {k: v for k, v in errors.items() if not v < 1e-5}
    assert len(errors) == 2 * SIM_STEPS + 6 and not bad, errors


SIM_STEPS = 2    # drop_path's draws differ by step (the simulator runs each GPU thread in Python: kept small)


def _script_sim():
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        g = compile_text(tmp, SIM_SPEC)
    x = data((2, 3, 2, 2), spread=2.0).astype(np.float32)
    t = np.random.default_rng(4).standard_normal((2, 3)).astype(np.float32)
    errors = {}
    for step in range(SIM_STEPS):
        want = run(g, x, t, np.float32, step=step)
        got = run(g, x, t, np.float32, device="cuda", step=step)
        for what, a, b in (("y", got[1], want[1]), ("grad", got[2], want[2])):
            errors[f"{step}:{what}"] = float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))
    from netdsl.kernels import cpu as C, cuda as G     # the same samples dropped for a seed
    z = data((16, 3, 2), spread=1.0).astype(np.float32)
    for seed in (1, 2):
        (cy, ck), (gy, gk) = C.drop_path(z, 0.5, seed), G.drop_path(G.to_device(z), 0.5, seed)
        assert 0 < ck.sum() < 16
        errors[f"mask{seed}"] = float(not np.array_equal(gk.copy_to_host(), ck))
        errors[f"drop_path{seed}"] = float(np.abs(gy.copy_to_host() - cy).max())
        errors[f"drop_path_grad{seed}"] = float(np.abs(G.drop_path_backward(G.to_device(z), gk, 0.5).copy_to_host()
                                                       - C.drop_path_backward(z, ck, 0.5)).max())
    return errors


if __name__ == "__main__":
    print(json.dumps({"sim": _script_sim}[sys.argv[1]]()))
