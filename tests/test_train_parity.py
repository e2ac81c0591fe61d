"""Whole models against PyTorch with copied weights: forward, loss and every gradient."""
import numpy as np
import pytest
import torch

from helpers import SPECS, compile_text
from parity import copy_into_torch, rel_err, torch_step
from reference.resnet import BasicBlock, ResNet
from netdsl.runtime.model import Model

TOL = 1e-4


def _resnet_spec(tmp_path, depths, size, classes):
    lib = (SPECS / "lib" / "resnet.net").as_posix()
    return compile_text(tmp_path, f'''
import "{lib}"
network r(classes = {classes}) {{
  input image: f32[N, 3, {size}, {size}]
  input label: i64[N]
  logits = resnet(image, basic, {list(depths)}, classes, name="")
  output logits
  loss ce = cross_entropy(logits, label)
}}''')


def _compare(model, module, x, y):
    params_before = {k: v.copy() for k, v in model.params.items()}
    copy_into_torch(params_before, module)
    total, losses, outs, grads = model.train_step({"image": x, "label": y})
    tl, tout, tgrads = torch_step(module, x, y, torch.nn.functional.cross_entropy)
    assert rel_err(outs["logits"], tout.detach().numpy()) <= TOL
    assert abs(total - tl) <= TOL * abs(tl)
    assert set(grads) == set(tgrads)
    worst = max(grads, key=lambda n: rel_err(grads[n], tgrads[n]))
    assert rel_err(grads[worst], tgrads[worst]) <= TOL, worst
    # running statistics moved the same way
    st = module.state_dict()
    for k in model.params:
        if k.endswith("running_mean") or k.endswith("running_var"):
            assert rel_err(model.params[k], st[k].numpy()) <= TOL, k


def test_resnet18_at_32x32_matches_torch(tmp_path):
    torch.manual_seed(0)
    g = _resnet_spec(tmp_path, (2, 2, 2, 2), 32, 10)
    model = Model(g, seed=1)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 10, 8)
    _compare(model, ResNet(BasicBlock, [2, 2, 2, 2], 10), x, y)
