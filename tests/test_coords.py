"""`coords` (CoordConv's coordinate channels, Liu et al. 2018): each cell's centre in
[-1, 1], x then y, for any batch; no gradient reaches the features through them. (The
CUDA simulator's training step in test_cuda_sim.py runs it on the device.)"""
import numpy as np
import torch

from helpers import compile_text
from netdsl.runtime.model import Model

NET = """network n() {
  input x: f32[N, 3, 2, 4]
  input y: f32[N, 2]
  g = coords(x)
  z = concat(x, g) -> global_avgpool -> flatten -> linear(2, name="fc")
  output g, z
  loss l = l2(z, y)
}
"""


def test_values_are_cell_centres_in_minus_one_to_one(tmp_path):
    m = Model(compile_text(tmp_path, NET), dtype=np.float64)
    x = np.random.default_rng(0).standard_normal((3, 3, 2, 4))
    g = m.infer({"x": x, "y": np.zeros((3, 2))})["g"]
    ys, xs = torch.meshgrid(torch.linspace(-0.5, 0.5, 2), torch.linspace(-0.75, 0.75, 4), indexing="ij")
    want = torch.stack([xs, ys]).expand(3, 2, 2, 4).numpy()
    np.testing.assert_allclose(g, want, rtol=0, atol=1e-15)


def test_no_gradient_flows_through_them(tmp_path):
    """The network's gradients equal torch's with the coordinates as constants."""
    m = Model(compile_text(tmp_path, NET), dtype=np.float64, seed=3)
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((2, 3, 2, 4)), rng.standard_normal((2, 2))
    total, _, out, grads = m.train_step({"x": x, "y": y})
    w, b = (torch.tensor(m.host_params()[k], requires_grad=True) for k in ("fc.weight", "fc.bias"))
    feats = torch.cat([torch.tensor(x), torch.tensor(out["g"])], 1).mean((2, 3))
    loss = torch.nn.functional.mse_loss(feats @ w.T + b, torch.tensor(y), reduction="sum") / 2 / 2
    loss.backward()
    assert abs(total - loss.item()) < 1e-12 * max(1, abs(total))
    np.testing.assert_allclose(grads["fc.weight"], w.grad.numpy(), rtol=1e-10)
