"""Every broadcast the shape rules accept trains: + - * / on a table of operand shapes,
both orders, fused and unfused, float32 and float64, forward and both operands'
gradients against PyTorch; and the same steps on the CUDA target under the simulator
against the CPU (this file run as a script `sim` in a subprocess, as test_cuda_sim.py
does, since NUMBA_ENABLE_CUDASIM must be set before numba is imported).

The operands are parameters so that the training step returns their gradients:
`one -> linear(P, bias=false) -> reshape(S)` is the weight itself, shaped S, and its
gradient is the operand's.
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

from helpers import compile_text  # noqa: E402
from netdsl.errors import NetdslError  # noqa: E402
from netdsl.runtime.model import Model  # noqa: E402

if __name__ != "__main__":
    import torch

OPS = {"+": "add", "-": "sub", "*": "mul", "/": "div"}
NCHW = (2, 3, 4, 5)
# (shape of a, shape of b): each is tested as a OP b and b OP a
PATTERNS = [
    (NCHW, (2, 3, 1, 1)),       # squeeze-excitation's gate
    (NCHW, (1, 3, 1, 1)),
    (NCHW, (3, 1, 1)),
    (NCHW, (5,)),
    (NCHW, (1, 1, 4, 1)),
    (NCHW, (2, 1, 4, 5)),
    (NCHW, (2, 1, 1, 5)),
    (NCHW, (4, 5)),
    (NCHW, (1,)),               # scalar-like
    (NCHW, NCHW),
    ((6, 7), (7,)),
    ((6, 7), (6, 1)),
    ((6, 7), (1, 7)),
    ((6, 7), (1,)),
    ((2, 1, 4, 1), (1, 3, 1, 5)),   # neither operand has the result's shape
    ((6, 1), (1, 7)),
    ((3, 1, 5), (2, 1, 4, 1)),
]
CASES = [(a, b) for a, b in PATTERNS] + [(b, a) for a, b in PATTERNS if a != b]
TOL = {np.float32: 2e-5, np.float64: 1e-11}


def spec(sa, sb, op):
    out = np.broadcast_shapes(sa, sb)
    dims = lambda s: ", ".join(map(str, s))
    return f"""
network bc() {{
  input one: f32[1, 1]
  input t: f32[{dims(out)}]
  a = one -> linear({math.prod(sa)}, bias=false, name="a") -> reshape([{dims(sa)}])
  b = one -> linear({math.prod(sb)}, bias=false, name="b") -> reshape([{dims(sb)}])
  y = a {op} b
  output y
  loss l = l2(y, t)
}}
"""


def operands(sa, sb, dt, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(sa)
    b = rng.standard_normal(sb)
    b = np.sign(b) * (0.5 + np.abs(b))      # away from 0: b is a divisor
    t = rng.standard_normal(np.broadcast_shapes(sa, sb))
    return a.astype(dt), b.astype(dt), t.astype(dt)


def step(g, a, b, t, dt, fuse=True, device="cpu"):
    params = {"a.weight": a.reshape(-1, 1).copy(), "b.weight": b.reshape(-1, 1).copy()}
    m = Model(g, params=params, fuse=fuse, dtype=dt, device=device)
    loss, _, outs, grads = m.train_step({"one": np.ones((1, 1), dt), "t": t})
    get = (lambda v: v.copy_to_host()) if device == "cuda" else np.asarray
    return loss, outs["y"], get(grads["a.weight"]).reshape(a.shape), get(grads["b.weight"]).reshape(b.shape)


def torch_step(a, b, t, op):
    """Loss, y and the operands' gradients in float64, each with the scale its error is
    measured against: a broadcast operand's gradient is a sum, whose rounding grows with
    the summed terms' magnitudes (sum of |terms|), not with the (cancelling) result."""
    out = np.broadcast_shapes(a.shape, b.shape)
    ta, tb = (torch.tensor(v, dtype=torch.float64).expand(out).contiguous().requires_grad_() for v in (a, b))
    y = {"+": torch.add, "-": torch.sub, "*": torch.mul, "/": torch.div}[op](ta, tb)
    loss = torch.nn.functional.mse_loss(y, torch.tensor(t, dtype=torch.float64))
    loss.backward()
    grads = [(x.grad.sum_to_size(v.shape).numpy(), x.grad.abs().sum_to_size(v.shape).numpy())
             for x, v in ((ta, a), (tb, b))]
    y = y.detach().numpy()
    return float(loss.detach()), (y, np.abs(y)), *grads


def close(got, want, dt, what, scale=None):
    assert got.shape == want.shape, (what, got.shape, want.shape)
    scale = np.abs(want) if scale is None else scale
    err = float(np.abs(got - want).max() / max(scale.max(), 1e-30))
    assert err < TOL[dt], f"{what}: relative error {err:.2e}"


@pytest.mark.parametrize("dt", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("sa,sb", CASES, ids=[f"{list(a)}{list(b)}".replace(" ", "") for a, b in CASES])
def test_broadcast_trains_like_torch(tmp_path, sa, sb, op, fuse, dt):
    g = compile_text(tmp_path, spec(sa, sb, op))
    a, b, t = operands(sa, sb, dt)
    got, want = step(g, a, b, t, dt, fuse), torch_step(a, b, t, op)
    assert abs(got[0] - want[0]) <= TOL[dt] * abs(want[0])
    for what, x, (w, scale) in zip(("y", "grad a", "grad b"), got[1:], want[1:]):
        close(x, w, dt, what, scale)


CHAIN = """
network chain() {
  input x: f32[N, 1, 4, 5]
  input t: f32[N, 3, 4, 5]
  input one: f32[1, 1]
  s = one -> linear(3, bias=false, name="s") -> reshape([1, 3, 1, 1])
  c = one -> linear(5, bias=false, name="c") -> reshape([5])
  y = relu(x * s + c) - x / 2
  output y
  loss l = l2(y, t)
}
"""


@pytest.mark.parametrize("N", [1, 3])     # at N = 1 the batch axis merges index runs the plan counted apart
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
def test_fused_chain_of_broadcasts_with_a_symbolic_batch(tmp_path, N, fuse):
    g = compile_text(tmp_path, CHAIN)
    rng = np.random.default_rng(N)
    x, t = rng.standard_normal((N, 1, 4, 5)), rng.standard_normal((N, 3, 4, 5))
    s, c = rng.standard_normal(3), rng.standard_normal(5)
    m = Model(g, params={"s.weight": s.reshape(3, 1), "c.weight": c.reshape(5, 1)}, fuse=fuse, dtype=np.float64)
    loss, _, outs, grads = m.train_step({"x": x, "t": t, "one": np.ones((1, 1))})
    tx, ts, tc = torch.tensor(x), torch.tensor(s, requires_grad=True), torch.tensor(c, requires_grad=True)
    y = torch.relu(tx * ts.reshape(1, 3, 1, 1) + tc) - tx / 2
    tl = torch.nn.functional.mse_loss(y, torch.tensor(t))
    tl.backward()
    assert abs(loss - float(tl.detach())) < 1e-12
    close(outs["y"], y.detach().numpy(), np.float64, "y")
    close(grads["s.weight"].reshape(3), ts.grad.numpy(), np.float64, "grad s")
    close(grads["c.weight"].reshape(5), tc.grad.numpy(), np.float64, "grad c")
    if fuse:   # the broadcast operands are read in place by one generated kernel
        steps = [st for st in m._programs[next(iter(m._programs))].plan.steps if len(st.nodes) > 1]
        assert any({n.op for n in st.nodes} >= {"mul", "add", "relu"} for st in steps)


def test_shapes_that_do_not_broadcast_are_a_located_error(tmp_path):
    text = spec(NCHW, (3, 1, 1), "*").replace("reshape([3, 1, 1])", "reshape([4, 1, 1])").replace("(3,", "(4,")
    text = text.replace("linear(3,", "linear(4,")
    with pytest.raises(NetdslError, match="axis 1 is 3 in one and 4 in the other") as e:
        compile_text(tmp_path, text)
    assert e.value.pos is not None and e.value.pos.line == 7


def test_generated_kernel_reads_broadcast_operands_in_place():
    """codegen level: a 'bcastK' input is indexed, not copied; sizes of 1 at run time are
    padded runs; a shape that does not fit is a ValueError naming the input."""
    from netdsl.kernels.codegen import Fused, backward, broadcast_runs, compile_kernel
    assert broadcast_runs(NCHW, (2, 3, 1, 1)) == [(20, 6, 1)]
    assert broadcast_runs(NCHW, (2, 1, 4, 5)) == [(60, 2, 20), (1, 20, 1)]
    assert broadcast_runs(NCHW, (3, 1, 1)) == [(20, 3, 1)]
    k = compile_kernel(Fused.build({"x": "full", "s": "bcast2"}, [("mul", "x", "s")], [0]), np.float64)
    x, s = np.random.default_rng(0).standard_normal(NCHW), np.random.default_rng(1).standard_normal((2, 1, 4, 5))
    np.testing.assert_array_equal(k(x, s)[0], x * s)
    np.testing.assert_array_equal(k(x, s[:, :, :1])[0], x * s[:, :, :1])    # 1 run of 2: padded
    with pytest.raises(ValueError, match="broadcast input 's' of shape \\(2, 1, 4, 3\\) does not broadcast"):
        k(x, np.ones((2, 1, 4, 3)))
    gx, gs = compile_kernel(backward(k.fused), np.float64)(x, s, np.ones(NCHW))   # a broadcast input's
    np.testing.assert_array_equal(gx, np.broadcast_to(s, NCHW))                   # gradient is left full,
    np.testing.assert_allclose(gs.sum(axis=1, keepdims=True), x.sum(axis=1, keepdims=True))   # for sum_to
    with pytest.raises(ValueError, match="needs 2 index runs .* has 1"):
        compile_kernel(Fused.build({"x": "full", "s": "bcast1"}, [("mul", "x", "s")], [0]), np.float64)(x, s)


# ---------------------------------------------------------------- CUDA, under the simulator

def test_cuda_simulator_matches_cpu():
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
    p = subprocess.run([sys.executable, str(HERE), "sim"], capture_output=True, text=True, env=env,
                       cwd=HERE.parent.parent, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    errors = json.loads(p.stdout.strip().splitlines()[-1])
    assert len(errors) == len(SIM_KERNELS) + 3
    bad = {k: v for k, v in errors.items() if not v < 1e-5}
    assert not bad, bad


def test_cuda_ptx_of_broadcast_kernels_has_no_float64():
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    p = subprocess.run([sys.executable, str(HERE), "ptx"], capture_output=True, text=True, env=env,
                       cwd=HERE.parent.parent, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    found = json.loads(p.stdout.strip().splitlines()[-1])
    assert set(found) == {"float32:fwd", "float32:bwd", "float64:fwd"}
    assert not found["float32:fwd"] and not found["float32:bwd"], found
    assert found["float64:fwd"], "control: the float64 kernel uses .f64"


def _script_ptx():
    """.f64 instructions in the PTX of a kernel reading two broadcast operands (and its
    backward, which reduces a channel input), compiled without a GPU."""
    from netdsl.kernels.codegen import Fused, backward, compile_kernel
    f = Fused.build({"x": "full", "s": "bcast2", "b": "channel", "w": "bcast1"},
                    [("mul", "x", "s"), ("add", 0, "b"), ("div", 1, "w"), ("gelu", 2)], [3])
    f64 = lambda ptx: sorted({line.split()[0] for line in ptx.splitlines() if ".f64" in line})
    return {"float32:fwd": f64(compile_kernel(f, np.float32, "cuda").ptx()),
            "float32:bwd": f64(compile_kernel(backward(f, ["b"]), np.float32, "cuda").ptx()),
            "float64:fwd": f64(compile_kernel(f, np.float64, "cuda").ptx())}


# One case per index-run structure, CUDA kernels against CPU ones (each launch spawns
# a Python thread per GPU thread: the whole table takes ~10 minutes).
SIM_KERNELS = ([(NCHW, (2, 3, 1, 1), op) for op in OPS]
               + [(sa, sb, op) for sa, sb in [((3, 1, 1), NCHW), (NCHW, (2, 1, 4, 5)), ((6, 7), (6, 1)),
                                             ((2, 1, 4, 1), (1, 3, 1, 5)), (NCHW, (1,))] for op in "*/"])

# Then through the CUDA runtime: small, as the simulator runs each GPU thread in Python
# (a reduction block is 128 threads) and a step of the linear-weight operands costs
# ~50 s at the table's sizes.
SIM_SPEC = """
network sim() {
  input x: f32[2, 3, 2, 2]
  input t: f32[2, 3, 2, 2]
  input one: f32[1, 1]
  s = one -> linear(6, bias=false, name="s") -> reshape([2, 3, 1, 1])
  c = one -> linear(3, bias=false, name="c") -> reshape([1, 3, 1, 1])
  m = one -> linear(8, bias=false, name="m") -> reshape([2, 1, 2, 2])
  y = relu(x * s + c) / (m * c + 4)
  output y
  loss l = l2(y, t)
}
"""


def _script_sim():
    """Every case's generated kernels (forward, and the backward with each operand's
    gradient: full for a broadcast operand, summed for a channel or scalar one), CUDA
    against CPU; then one training step through the CUDA runtime against the CPU's."""
    import tempfile
    from types import SimpleNamespace
    from netdsl.kernels.codegen import Fused, backward, compile_kernel, cuda
    from netdsl.runtime.fused import _layout
    errors = {}

    def err(got, want):
        return max(float(np.abs(cuda.to_host(x) - w).max() / max(np.abs(w).max(), 1e-30)) for x, w in zip(got, want))

    for sa, sb, op in SIM_KERNELS:
        out = np.broadcast_shapes(sa, sb)
        lay = [_layout(SimpleNamespace(shape=v), out) for v in (sa, sb)]
        if len({ax for l, ax in lay if l == "channel"}) > 1:
            lay = [("bcast1", 1) if l == "channel" else (l, ax) for l, ax in lay]
        axis = next((ax for l, ax in lay if l == "channel"), 1)
        a, b, _ = operands(sa, sb, np.float32)
        arrays = [v if l == "full" or l.startswith("bcast") else v.reshape(-1) for v, (l, _) in zip((a, b), lay)]
        gy = np.random.default_rng(9).standard_normal(out).astype(np.float32)
        f = Fused.build({"a": lay[0][0], "b": lay[1][0]}, [(OPS[op], "a", "b")], [0])
        shape = None if "full" in (lay[0][0], lay[1][0]) else out
        cases = ((f, arrays), (backward(f), arrays + [gy]))
        errors[f"{list(sa)}{op}{list(sb)}"] = max(
            err(compile_kernel(k, np.float32, "cuda")(*xs, axis=axis, shape=shape),
                compile_kernel(k, np.float32, "cpu")(*xs, axis=axis, shape=shape)) for k, xs in cases)
    with tempfile.TemporaryDirectory() as tmp:
        g = compile_text(tmp, SIM_SPEC)
    rng = np.random.default_rng(3)
    feeds = {"x": rng.standard_normal((2, 3, 2, 2)).astype(np.float32), "one": np.ones((1, 1), np.float32),
             "t": rng.standard_normal((2, 3, 2, 2)).astype(np.float32)}
    params = {"s.weight": rng.standard_normal((6, 1)), "c.weight": rng.uniform(0.5, 1, (3, 1)),
              "m.weight": rng.uniform(0.5, 1, (8, 1))}
    steps = []
    for device in ("cpu", "cuda"):
        m = Model(g, params={k: v.astype(np.float32) for k, v in params.items()}, device=device)
        loss, _, outs, grads = m.train_step(feeds)
        steps.append((loss, {k: (v.copy_to_host() if device == "cuda" else np.array(v)) for k, v in grads.items()}))
    (lc, gc), (lg, gg) = steps
    errors["runtime:loss"] = abs(lg - lc) / abs(lc)
    for k in ("s.weight", "m.weight"):
        errors[f"runtime:{k}"] = float(np.abs(gg[k] - gc[k]).max() / np.abs(gc[k]).max())
    return errors


if __name__ == "__main__":
    print(json.dumps({"sim": _script_sim, "ptx": _script_ptx}[sys.argv[1]]()))
