"""ONNX export (netdsl/convert/onnx_export.py, `netdsl export --onnx`) against onnxruntime:
each network gets random weights (and batch-norm statistics off their defaults), is
exported, passes onnx.checker with shape inference (full_check), and onnxruntime's
outputs equal netdsl's inference (Model.infer) within 1e-4 relative to the largest
magnitude, at batch 2 and at batch 1 (and, for the char LMs, at two sequence lengths):
the batch and sequence axes are dynamic. The CLI: a run directory, a spec with
--weights, --outputs, and the errors (exit 2, no traceback)."""
from __future__ import annotations

import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from netdsl.cli import main
from netdsl.convert.onnx_export import OPSET, _check_exportable, export_onnx, needed_nodes
from netdsl.errors import NetdslError
from netdsl.lang.elaborate import elaborate
from netdsl.runtime import weights
from netdsl.runtime.checkpoint import save_checkpoint
from netdsl.runtime.model import Model
from netdsl.runtime.sample import write_run_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECS = os.path.join(ROOT, "specs")

# Every CNN family of specs/: (spec, --set). resnet34/101/152, vgg16, vgg19 and vgg19_bn
# are the same blocks at other depths (test_every_cnn_spec_exports checks their operators).
CNNS = [
    ("alexnet", {}),                    # LRN, overlapping max pools
    ("alexnet_torchvision", {}),        # adaptive average pool
    ("vgg16_bn", {}),
    ("googlenet", {}),                  # ceil-mode pools, concat; the auxiliary heads are training-only
    ("resnet18", {}),
    ("resnet50", {}),
    ("resnext50_32x4d", {}),            # grouped convolutions
    ("wide_resnet50_2", {}),
    ("wrn28_10", {"depth": 16, "widen": 4}),   # the CIFAR wide ResNet, shallower and narrower
    ("nin_cifar10", {}),                # average pool, global pool
    ("resnet20_cifar", {}),             # channel padding shortcuts
    ("senet_small", {}),                # squeeze-excitation, hardswish, drop_path
    ("digits_cnn", {}),
    ("fashion_cnn", {}),
]


def random_params(g, seed=0) -> dict[str, np.ndarray]:
    """Weights ~ N(0, 2/fan_in) (activations keep their scale through deep stacks),
    biases U(-0.1, 0.1), batch norm's scale, shift and statistics off their defaults
    (0, 1, 1, 0 would not test its mapping). Drawn directly: netdsl's initialisers take
    seconds for VGG's 138M weights."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, p in g.params.items():
        shape = tuple(int(d) for d in p.shape)
        if p.role == "shift" or k.endswith("running_mean"):
            a = rng.uniform(-0.2, 0.2, shape)
        elif p.role == "scale" or k.endswith("running_var"):
            a = rng.uniform(0.5, 1.5, shape)
        elif len(shape) >= 2:
            a = rng.standard_normal(shape, dtype=np.float32) * np.float32(np.sqrt(2 / np.prod(shape[1:])))
        else:
            a = rng.uniform(-0.1, 0.1, shape)
        out[k] = a.astype(np.float32, copy=False)
    return out


def session(path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def close(got, want, tol=1e-4, what=""):
    assert got.shape == want.shape and got.dtype == want.dtype, (what, got.shape, want.shape, got.dtype, want.dtype)
    err = float(np.abs(got.astype(np.float64) - want).max() / max(float(np.abs(want).max()), 1e-12))
    assert err <= tol, f"{what}: relative error {err:.2e}"


def exported(g, params, path, outputs=None) -> ort.InferenceSession:
    export_onnx(g, params, path, outputs)     # (onnx.checker has passed, or this raised)
    if os.path.getsize(path) < 100 << 20:     # shape inference agrees with netdsl's shapes (VGG's size: slow)
        onnx.checker.check_model(str(path), full_check=True)
    return session(path)


def compare(sess, m, feeds: dict, outputs, batch_too=True):
    """onnxruntime against netdsl on `feeds`, and (batch_too) on the first example alone."""
    want = m.infer(feeds, want=list(outputs))
    for o, got in zip(outputs, sess.run(list(outputs), feeds)):
        close(got, want[o], what=o)
    if batch_too:
        for o, got in zip(outputs, sess.run(list(outputs), {k: v[:1] for k, v in feeds.items()})):
            close(got, want[o][:1], what=f"{o} at batch 1")


def input_dims(path) -> dict[str, list]:
    m = onnx.load(str(path), load_external_data=False)
    return {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in m.graph.input}


@pytest.mark.parametrize("spec,sets", CNNS, ids=[c[0] for c in CNNS])
def test_cnn(tmp_path, spec, sets):
    g, _ = elaborate(os.path.join(SPECS, f"{spec}.net"), None, dict(classes=10, **sets))
    params = random_params(g)
    path = tmp_path / f"{spec}.onnx"
    sess = exported(g, params, path)
    dims = input_dims(path)
    assert list(dims) == ["image"] and dims["image"][0] == "N"      # the label only feeds the loss
    shape = [int(d) for d in g.inputs["image"].shape[1:]]
    x = np.random.default_rng(1).standard_normal((2, *shape)).astype(np.float32)
    compare(sess, Model(g, params=params), {"image": x}, ["logits"])


def test_every_cnn_spec_exports():
    """Every operator the CNN specs' inference graphs use has an ONNX rule."""
    for f in sorted(os.listdir(SPECS)):
        if f.endswith(".net"):
            g, _ = elaborate(os.path.join(SPECS, f), None, {})
            _check_exportable(g, needed_nodes(g.nodes, list(g.outputs.values())), list(g.outputs))


@pytest.mark.parametrize("sets", [{}, {"skips": True}], ids=["plain", "skips"])
def test_fcn(tmp_path, sets):
    """All four unpooling kinds: max unpooling with the pool's switches (ONNX MaxPool's
    indices into MaxUnpool), bed of nails, nearest upsampling, transpose convolution."""
    g, _ = elaborate(os.path.join(SPECS, "det", "fcn.net"), None, dict(size=32, width=16, classes=5, **sets))
    params = random_params(g)
    sess = exported(g, params, tmp_path / "fcn.onnx")
    x = np.random.default_rng(2).standard_normal((2, 3, 32, 32)).astype(np.float32)
    compare(sess, Model(g, params=params), {"image": x}, ["logits"])
    ops = {n.op_type for n in onnx.load(str(tmp_path / "fcn.onnx")).graph.node}
    assert {"MaxUnpool", "ConvTranspose", "Resize"} <= ops


LM = dict(vocab=17, embed=8, hidden=12, layers=2)


@pytest.mark.parametrize("cell,fused,onnx_op", [
    ("lstm", True, "LSTM"), ("lstm", False, "Scan"), ("gru", True, "GRU"), ("gru", False, "Scan"),
    ("rnn", True, "RNN"), ("rnn", False, "Scan")])
def test_char_lm(tmp_path, cell, fused, onnx_op):
    """The fused cells become ONNX's LSTM / GRU / RNN over the whole sequence (gate rows
    reordered); the notes' written-out steps an ONNX Scan. N and T are dynamic."""
    g, _ = elaborate(os.path.join(SPECS, "rnn", f"charlm_{cell}.net"), None, dict(LM, fused=fused))
    params = random_params(g)
    path = tmp_path / "lm.onnx"
    sess = exported(g, params, path, ["logits"])
    assert input_dims(path) == {"chars": ["N", "T"]}
    assert onnx_op in {n.op_type for n in onnx.load(str(path)).graph.node}
    m = Model(g, params=params)
    rng = np.random.default_rng(3)
    for n, t in ((3, 7), (2, 4)):
        compare(sess, m, {"chars": rng.integers(0, LM["vocab"], (n, t))}, ["logits"])


ZOO = """# Operators and attributes the shipped specs do not reach.
network zoo(C = 6) {
  input image: f32[N, 3, 13, 11]
  input ids: i64[N, 5]
  a = image -> conv(C, k=3, s=2, p=2, d=2, groups=3, bias=false) -> bn(affine=false) -> leaky_relu(slope=0.2)
  pools = concat(a -> maxpool(k=3, s=2, p=1, ceil=true), a -> avgpool(k=3, s=2, p=1, ceil=true),
                 a -> maxpool(k=2, s=2, p=1, ceil=true), a -> avgpool(k=2, s=2, p=1, ceil=true))
  norms = concat(a -> lrn(size=4, alpha=0.01, beta=0.5, k=1.5), a -> lrn(size=3),
                 a -> adaptive_avgpool([3, 2]) -> upsample(2, mode="bilinear") -> upsample(2)
                   -> adaptive_avgpool([7, 6]))
  up = a -> conv_transpose(4, k=3, s=2, p=1, output_padding=1, groups=2) -> relu6
  nails = a -> bed_of_nails(3)
  y, sw = image[:, :, 0:12, 1:11] -> maxpool(k=2, s=2, switches=true)
  unpooled = max_unpool(y * 2.0, sw, k=2, s=2)
  acts = concat(hardswish(a), silu(a), gelu(a), clamp(a, min=-0.5, max=0.5), sigmoid(a) + 1.0,
                tanh(a) - exp(neg(square(a))), sqrt(square(a) + 0.1) / 2.0, log(sigmoid(a)))
  f = a -> reshape([a.N, C, a.H * a.W]) -> transpose([0, 2, 1]) -> linear(7)
  p1, p2 = split(f, [3, 4], axis=2)
  s = concat(p1[:, 2:5] -> softmax(axis=1), p2[:, 1:4, 1:4] -> log_softmax, axis=1) -> pad(1, 2, axis=2)
  last = p2[:, -1] + p2[:, 0, 0:4]
  red = concat(sum(a, [2, 3]), mean(a, [2, 3]))
  flat = a -> flatten(start=2)
  e = ids -> embedding(10, 4)
  hot = ids -> one_hot(10)
  best = argmax(e, axis=1)
  output pools, norms, up, nails, sw, unpooled, acts, s, last, red, flat, e, hot, best
}
"""


def test_operator_zoo(tmp_path):
    """Grouped dilated convolution, batch norm without affine, ceil-mode pools whose last
    window torch drops, LRN of even and odd size, adaptive pooling with unequal windows,
    bilinear and nearest upsampling, grouped transpose convolution with output padding,
    bed of nails, max unpooling and the switches themselves as an output, activations,
    reshapes with the batch in them, split, slices with ranges and indices, pad,
    reductions, embedding, one-hot and argmax."""
    (tmp_path / "zoo.net").write_text(ZOO)
    g, _ = elaborate(str(tmp_path / "zoo.net"), None, {})
    params = random_params(g)
    sess = exported(g, params, tmp_path / "zoo.onnx")
    rng = np.random.default_rng(4)
    feeds = {"image": rng.standard_normal((3, 3, 13, 11)).astype(np.float32), "ids": rng.integers(0, 10, (3, 5))}
    compare(sess, Model(g, params=params), feeds, list(g.outputs))


# ---------------------------------------------------------------- the command

def test_cli_run_directory(tmp_path, capsys):
    """netdsl export RUN_DIR --onnx (the run's spec, --set and checkpoint), -o beside it."""
    spec = os.path.join(SPECS, "det", "fcn.net")
    sets = dict(size=32, width=8, classes=3)
    g, loader = elaborate(spec, None, sets)
    params = random_params(g, seed=5)
    run = tmp_path / "run"
    run.mkdir()
    write_run_file(str(run), spec, None, sets)
    save_checkpoint(run / "checkpoint.npz", params, step=3, spec_text="".join(loader.sources.values()))
    out = tmp_path / "fcn.onnx"
    assert main(["export", str(run), "--onnx", str(out), "-o", str(tmp_path / "w.safetensors")]) == 0
    said = capsys.readouterr().out
    assert f"ONNX opset {OPSET}" in said and "inputs image -> outputs logits" in said and "w.safetensors" in said
    model = onnx.load(str(out))
    assert model.opset_import[0].version == OPSET
    assert {i.name for i in model.graph.initializer} >= set(g.params)     # parameters under their paths
    x = np.random.default_rng(6).standard_normal((2, 3, 32, 32)).astype(np.float32)
    compare(session(out), Model(g, params=params), {"image": x}, ["logits"])
    assert sorted(os.listdir(tmp_path)) == ["fcn.onnx", "run", "w.safetensors"]     # no temporary file left


def test_cli_spec_with_weights(tmp_path, capsys):
    """netdsl export SPEC --weights FILE --onnx: a safetensors file in torch's layout
    (lstm_cell's rows i, f, g, o) gives the model netdsl runs with the same file."""
    spec = os.path.join(SPECS, "rnn", "charlm_lstm.net")
    sets = dict(LM, fused=True)
    g, _ = elaborate(spec, None, sets)
    params = random_params(g, seed=7)
    weights.save_named(g, params, tmp_path / "lm.safetensors")
    out = tmp_path / "lm.onnx"
    argv = ["export", spec, *[f"--set={k}={str(v).lower()}" for k, v in sets.items()],
            "--weights", str(tmp_path / "lm.safetensors"), "--onnx", str(out)]
    assert main(argv + ["--outputs", "logits"]) == 0, capsys.readouterr().err
    chars = np.random.default_rng(8).integers(0, LM["vocab"], (2, 6))
    compare(session(out), Model(g, params=params), {"chars": chars}, ["logits"])


def test_cli_errors(tmp_path, capsys, monkeypatch):
    """Exit 2 with a message, never a traceback; nothing written, an old file kept."""
    spec = os.path.join(SPECS, "rnn", "charlm_lstm.net")
    sets = [f"--set={k}={v}" for k, v in LM.items()]
    g, _ = elaborate(spec, None, LM)
    weights.save_named(g, random_params(g), tmp_path / "lm.npz")
    out = tmp_path / "lm.onnx"
    out.write_bytes(b"old")

    def fails(*argv, says):
        assert main(["export", *map(str, argv)]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        for s in says:
            assert s in err, err

    # an operator with no ONNX form, at its spec line; the hint names what can be exported
    fails(spec, *sets, "--weights", tmp_path / "lm.npz", "--onnx", out,
          says=["rnn.net:", "cannot export operator 'sample_categorical'", "--outputs logits"])
    fails(spec, *sets, "--weights", tmp_path / "lm.npz", "--onnx", out, "--outputs", "nope",
          says=["no output 'nope'", "logits, sampled"])
    fails(spec, *sets, "--weights", tmp_path / "missing.safetensors", "--onnx", out,
          says=["no weights file at", "missing.safetensors"])
    fails(tmp_path / "missing.net", "--weights", tmp_path / "lm.npz", "--onnx", out, says=["cannot find"])
    fails(tmp_path / "no_run", "--onnx", out, says=["run directory", "not found"])
    fails(spec, *sets, "--onnx", out, says=["give its weights with --weights"])
    fails(spec, *sets, "--weights", tmp_path / "lm.npz", says=["-o FILE", "--onnx FILE.onnx"])
    fails(spec, *sets, "--weights", tmp_path / "lm.npz", "--onnx", tmp_path / "lm.pb", says=["ends in .onnx"])
    fails(spec, "--weights", tmp_path / "lm.npz", "--onnx", out, "--outputs", "logits",
          says=["does not match the network"])        # the spec's defaults: other shapes
    monkeypatch.setitem(sys.modules, "onnx", None)      # the onnx extra not installed
    fails(spec, *sets, "--weights", tmp_path / "lm.npz", "--onnx", out, "--outputs", "logits",
          says=["needs the onnx package", "netdsl[onnx]"])
    assert out.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["lm.npz", "lm.onnx"]


def test_scan_without_sequence_is_refused():
    """A scan that runs `over T` without a sequence has no ONNX Scan form: a located error."""
    g, _ = elaborate(os.path.join(SPECS, "rnn", "one_to_many.net"), None, {})
    scans = [n for n in g.nodes if n.op == "scan" and not n.attrs["seq"]]
    if not scans:
        pytest.fail("one_to_many.net no longer has a scan without a sequence: pick another spec for this test")
    with pytest.raises(NetdslError, match="reads no sequence"):
        from netdsl.convert.onnx_export import build_model
        build_model(g, random_params(g))
