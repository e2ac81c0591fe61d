"""extract_patches (the sliding-window baseline's crops) against PyTorch: F.unfold with its
columns made a batch, [N, C*kh*kw, L] -> [N*L, C, kh, kw]; forward and backward on the CPU
kernels in float32 and float64, float64 finite differences, and through a graph run by
Model. (The CUDA twin is checked against the CPU in test_cuda_sim.py.)"""
import numpy as np
import pytest
import torch

from helpers import compile_text
from netdsl.errors import NetdslError
from netdsl.kernels import cpu as C
from netdsl.runtime.model import Model

F = torch.nn.functional
TOL = {np.float32: 1e-6, np.float64: 1e-14}

# (x shape, k, s, p): square and rectangular windows, strides that skip pixels, padding
# wider than the window's half (windows that see only a corner of the image)
CASES = [((2, 3, 7, 6), 3, 1, 1), ((1, 2, 9, 8), (3, 2), (2, 3), (1, 0)), ((2, 1, 5, 5), 5, 1, 2),
         ((1, 2, 6, 6), 2, 2, 0), ((1, 1, 3, 4), 3, 2, (2, 3)), ((3, 2, 4, 4), 1, 1, 0)]


def pair(v):
    return tuple(v) if isinstance(v, tuple) else (v, v)


def torch_patches(x, k, s, p):
    N, C_ = x.shape[:2]
    u = F.unfold(x, pair(k), padding=pair(p), stride=pair(s))         # [N, C*kh*kw, L]
    return u.transpose(1, 2).reshape(N * u.shape[2], C_, *pair(k))


def rel(got, want):
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


@pytest.mark.parametrize("dt", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"x{c[0]}k{c[1]}s{c[2]}p{c[3]}".replace(" ", ""))
def test_patches_match_torch_unfold(case, dt):
    shape, k, s, p = case
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(dt)
    tx = torch.tensor(x, requires_grad=True)
    ty = torch_patches(tx, k, s, p)
    gy = rng.standard_normal(tuple(ty.shape)).astype(dt)
    (ty * torch.tensor(gy)).sum().backward()
    y = C.extract_patches(x, k, s, p)
    assert y.dtype == dt and y.shape == tuple(ty.shape)
    assert np.array_equal(y, ty.detach().numpy())            # a copy: exact
    gx = C.extract_patches_backward(gy, shape, k, s, p)
    assert gx.dtype == dt and rel(gx, tx.grad.numpy()) < TOL[dt]


def test_backward_matches_finite_differences():
    rng = np.random.default_rng(1)
    shape, k, s, p = (1, 2, 4, 3), (3, 2), (1, 2), (1, 1)
    x = rng.standard_normal(shape)
    gy = rng.standard_normal(C.extract_patches(x, k, s, p).shape)
    loss = lambda v: float((C.extract_patches(v, k, s, p) * gy).sum())
    eps = 1e-6
    fd = np.zeros(shape)
    for i in np.ndindex(shape):
        xp, xm = x.copy(), x.copy()
        xp[i] += eps
        xm[i] -= eps
        fd[i] = (loss(xp) - loss(xm)) / (2 * eps)
    assert np.abs(C.extract_patches_backward(gy, shape, k, s, p) - fd).max() < 1e-8


def test_one_window_per_pixel_centres_each_pixel():
    """stride 1 and padding k // 2 (the sliding-window spec): window i is centred on pixel i."""
    x = np.arange(2 * 5 * 6, dtype=np.float32).reshape(1, 2, 5, 6)
    y = C.extract_patches(x, 3, 1, 1)
    assert y.shape == (30, 2, 3, 3)
    np.testing.assert_array_equal(y[:, :, 1, 1].reshape(5, 6, 2).transpose(2, 0, 1), x[0])


GRAPH = """
network m() {{
  input one: f32[1, 1]
  input t: f32[{tshape}]
  x = one -> linear({size}, bias=false, name="x") -> reshape([{shape}])
  y = x -> extract_patches(k={k}, s={s}, p={p})
  output y
  loss l = l2(y, t)
}}
"""


@pytest.mark.parametrize("dt", [np.float32, np.float64], ids=["f32", "f64"])
def test_patches_train_through_a_graph(tmp_path, dt):
    shape, k, s, p = (2, 3, 5, 4), [3, 2], [2, 1], [1, 0]
    rng = np.random.default_rng(2)
    x = rng.standard_normal(shape)
    tx = torch.tensor(x, requires_grad=True)
    ty = torch_patches(tx, tuple(k), tuple(s), tuple(p))
    t = rng.standard_normal(tuple(ty.shape))
    want = F.mse_loss(ty, torch.tensor(t))
    want.backward()
    dims = lambda v: ", ".join(map(str, v))
    g = compile_text(tmp_path, GRAPH.format(tshape=dims(ty.shape), size=x.size, shape=dims(shape), k=k, s=s, p=p))
    m = Model(g, params={"x.weight": x.reshape(-1, 1).astype(dt)}, dtype=dt)
    total, _, outs, grads = m.train_step({"one": np.ones((1, 1), dt), "t": t.astype(dt)})
    assert rel(np.asarray(outs["y"]), ty.detach().numpy()) < TOL[dt]
    assert abs(total - want.item()) <= 10 * TOL[dt] * want.item()
    assert rel(np.asarray(grads["x.weight"]).reshape(shape), tx.grad.numpy()) < 10 * TOL[dt]


def test_a_window_larger_than_the_padded_image_is_a_located_error(tmp_path):
    with pytest.raises(NetdslError, match="a 9x9 window does not fit the 6x6 input") as e:
        compile_text(tmp_path, """network m() {
  input image: f32[N, 3, 6, 6]
  output y = image -> extract_patches(k=9, p=1)
}""")
    assert e.value.pos.line == 3
