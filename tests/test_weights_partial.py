"""`netdsl run --weights FILE --weights-partial` (netdsl/runtime/weights.py load_partial):
a classifier's trunk loads into another network by name. A tiny spec pair: `pre` (trunk
+ global pool + fc, as yolo_v1_pretrain.net) and `det` (the same trunk, under the same
path, then a conv, a batch norm and another head). The shared names (batch-norm running
statistics included) take the file's values exactly, every other parameter and buffer
keeps the initialiser a run without --weights would give it; no shared name, a shared
name of another shape, and the flags it cannot go with are NetdslErrors (exit 2)."""
from __future__ import annotations

import numpy as np
import pytest

from netdsl.cli import main
from netdsl.errors import NetdslError
from netdsl.lang.elaborate import elaborate
from netdsl.runtime import weights
from netdsl.runtime.checkpoint import load_checkpoint, save_checkpoint
from netdsl.runtime.model import Model

SPEC = """
block trunk(x, c = 4) {
  return x -> conv(c, k=3, p=1) -> bn -> relu
}
network pre(classes = 3, c = 4) {
  input image: f32[N, 3, 8, 8]
  input label: i64[N]
  logits = image -> trunk(c=c, name="features") -> global_avgpool -> flatten -> linear(classes, name="fc")
  output logits
  loss ce = cross_entropy(logits, label)
  train { data = synthetic(size = 16)  optimizer = adam(lr = 1e-3)  epochs = 1  batch = 8 }
}
network det(classes = 2) {
  input image: f32[N, 3, 8, 8]
  input label: i64[N]
  f = image -> trunk(name="features") -> conv(5, k=1, name="extra") -> bn(name="extra_bn")
  logits = f -> flatten -> linear(classes, name="head")
  output logits
  loss ce = cross_entropy(logits, label)
  train { data = synthetic(size = 16)  optimizer = adam(lr = 1e-3)  epochs = 1  batch = 8 }
}
network other(classes = 2) {
  input image: f32[N, 3, 8, 8]
  input label: i64[N]
  logits = image -> flatten -> linear(classes, name="head2")
  output logits
  loss ce = cross_entropy(logits, label)
  train { data = synthetic(size = 16)  optimizer = adam(lr = 1e-3)  epochs = 1  batch = 8 }
}
"""
TRUNK = ["features.conv1.weight", "features.conv1.bias", "features.bn1.weight", "features.bn1.bias",
         "features.bn1.running_mean", "features.bn1.running_var"]


@pytest.fixture
def spec(tmp_path):
    p = tmp_path / "pair.net"
    p.write_text(SPEC)
    return p


def pretrained(spec, path, c=4):
    """The classifier's weights, none of them an initialiser's value (running statistics
    included), written by name (.safetensors, .npz) or as a netdsl checkpoint (.ckpt.npz)."""
    g, _ = elaborate(str(spec), "pre", {"c": c})
    rng = np.random.default_rng(3)
    w = {k: (v + rng.uniform(0.5, 1.0, v.shape)).astype(v.dtype) for k, v in Model(g, seed=11).host_params().items()}
    if str(path).endswith(".ckpt.npz"):
        save_checkpoint(path, w, step=7, spec_text=SPEC)
    else:
        weights.save_named(g, w, path)
    return w


@pytest.mark.parametrize("name", ["pre.safetensors", "pre.npz", "pre.ckpt.npz"])
def test_loads_the_shared_names_only(spec, tmp_path, name):
    w = pretrained(spec, tmp_path / name)
    g, _ = elaborate(str(spec), "det", {})
    m = Model(g, seed=5)
    loaded, kept, unused = weights.load_partial(m, tmp_path / name, log=lambda s: None)
    assert loaded == TRUNK and unused == ["fc.bias", "fc.weight"]
    assert kept == [k for k in g.params if k not in TRUNK] and "extra_bn.running_var" in kept
    init = Model(g, seed=5).host_params()
    got = m.host_params()
    for k in g.params:
        np.testing.assert_array_equal(got[k], w[k] if k in TRUNK else init[k], err_msg=k)


def test_cli_starts_training_from_them(spec, tmp_path, capsys):
    w = pretrained(spec, tmp_path / "pre.npz")
    out = tmp_path / "run"
    rc = main(["run", str(spec), "--network", "det", "--weights", str(tmp_path / "pre.npz"), "--weights-partial",
               "--lr", "1e-12", "--out", str(out), "--no-progress", "--threads", "1"])
    err = capsys.readouterr().err
    assert rc == 0, err
    g, _ = elaborate(str(spec), "det", {})
    assert f"loaded 6 of the network's {len(g.params)} parameters and buffers by name" in err
    assert ("kept their initialiser (8): extra.{weight,bias}, extra_bn.{weight,bias,running_mean,running_var}, "
            "head.{weight,bias}") in err
    assert "not in the network, unused (2): fc.{bias,weight}" in err
    ck = load_checkpoint(out / "checkpoint.npz").params
    init = Model(g, seed=0).host_params()       # the train section's seed (0): what a plain run starts from
    for k in g.params:
        if g.params[k].role != "buffer":        # (a training epoch moves the running statistics)
            np.testing.assert_allclose(ck[k], w[k] if k in TRUNK else init[k], atol=1e-6, err_msg=k)


def _error(argv, capsys) -> str:
    assert main([str(a) for a in argv]) == 2
    return capsys.readouterr().err


def test_refusals(spec, tmp_path, capsys):
    pretrained(spec, tmp_path / "pre.safetensors")
    pretrained(spec, tmp_path / "wide.safetensors", c=6)
    run = ["run", spec, "--out", tmp_path / "r", "--no-progress", "--threads", "1"]
    err = _error(run + ["--network", "other", "--weights", tmp_path / "pre.safetensors", "--weights-partial"], capsys)
    assert "shares no parameter name with the network other" in err
    assert "the network's: head2.{weight,bias}" in err and "features.bn1.{bias,running_mean" in err
    # a shared name of another shape: an error naming it, nothing loaded
    err = _error(run + ["--network", "det", "--weights", tmp_path / "wide.safetensors", "--weights-partial"], capsys)
    assert "wrong shape: features.conv1.weight is (6, 3, 3, 3), expected (4, 3, 3, 3)" in err
    g, _ = elaborate(str(spec), "det", {})
    m = Model(g, seed=5)
    with pytest.raises(NetdslError, match="wrong-shaped"):
        weights.load_partial(m, tmp_path / "wide.safetensors", log=lambda s: None)
    init = Model(g, seed=5).host_params()
    assert all(np.array_equal(v, init[k]) for k, v in m.host_params().items())
    # the flags it needs and the ones it cannot go with
    err = _error(run + ["--network", "det", "--weights-partial"], capsys)
    assert "--weights-partial needs --weights FILE" in err
    for flag in ("--eval", "--resume"):
        err = _error(run + ["--network", "det", "--weights", tmp_path / "pre.safetensors", "--weights-partial", flag],
                     capsys)
        assert f"does not take {flag}" in err
    # without --weights-partial the same file is refused as before, every difference listed
    err = _error(run + ["--network", "det", "--weights", tmp_path / "pre.safetensors"], capsys)
    assert "missing: head.weight" in err and "unexpected: fc.weight" in err
