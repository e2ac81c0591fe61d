"""Every CNN spec runs one training step and inference on the CPU (batch 2, random data):
the generated backward pass reaches every parameter with a finite gradient of the
right shape, and inference returns the declared outputs without the train-only heads."""
import numpy as np
import pytest

from helpers import SPECS, compile_spec
from netdsl.runtime.model import Model

CNN_SPECS = sorted(p.name for p in SPECS.glob("*.net"))


@pytest.mark.parametrize("spec", CNN_SPECS)
def test_one_training_step_and_inference(spec):
    g = compile_spec(spec)
    img = g.inputs["image"]
    shape = (2, *[int(d) for d in img.shape[1:]])
    classes = int(g.outputs["logits"].shape[1])
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    y = rng.integers(0, classes, 2)
    m = Model(g, seed=0)
    total, losses, outs, grads = m.train_step({"image": x, "label": y})
    assert np.isfinite(total) and set(losses) == {l.name for l in g.losses}
    trainable = {n: p for n, p in g.params.items() if p.role != "buffer"}
    assert set(grads) == set(trainable)
    for n, gr in grads.items():
        assert gr.shape == trainable[n].shape and np.isfinite(gr).all(), n
    assert any(np.abs(gr).max() > 0 for gr in grads.values())
    out = m.infer({"image": x})
    assert out["logits"].shape == (2, classes) and np.isfinite(out["logits"]).all()
