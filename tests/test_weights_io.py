"""Weights by name (netdsl/runtime/weights.py, `netdsl export`, `netdsl run --weights`)
against PyTorch: torchvision's CNNs with random weights, saved with
safetensors.torch.save_file(model.state_dict()), load into the matching spec and give
the same logits; netdsl's weights exported load into torchvision with strict=True; a
torch nn.LSTM / nn.GRU state dict loads into the fused char LM; pickles are refused."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
st_torch = pytest.importorskip("safetensors.torch")

sys.path.insert(0, os.path.dirname(__file__))
import tvref  # noqa: E402

from netdsl.cli import main  # noqa: E402
from netdsl.errors import NetdslError  # noqa: E402
from netdsl.lang.elaborate import elaborate  # noqa: E402
from netdsl.runtime import weights  # noqa: E402
from netdsl.runtime.checkpoint import save_checkpoint  # noqa: E402
from netdsl.runtime.model import Model  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECS = os.path.join(ROOT, "specs")

# (torchvision module, constructor, spec, constructor kwargs)
CNNS = [
    ("alexnet", "alexnet", "alexnet_torchvision", {}),
    ("vgg", "vgg16", "vgg16", {}),
    ("resnet", "resnet18", "resnet18", {}),
    ("resnet", "resnet50", "resnet50", {}),
    ("googlenet", "googlenet", "googlenet", {"aux_logits": True, "init_weights": True}),
    ("resnet", "resnext50_32x4d", "resnext50_32x4d", {}),
    ("resnet", "wide_resnet50_2", "wide_resnet50_2", {}),
]


def tv_model(module: str, fn: str, kw: dict, seed: int):
    """A torchvision model with random weights and random BatchNorm statistics, in eval mode."""
    if tvref.load() is None:
        pytest.skip(tvref.SKIP_REASON)
    torch.manual_seed(seed)
    model = getattr(importlib.import_module(f"torchvision.models.{module}"), fn)(**kw)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):   # the defaults (0, 1, 1, 0) would not test the mapping
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


def images(n=1, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 3, 224, 224)).astype(np.float32)


def close(got, want, tol=1e-4):
    err = float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12))
    assert err <= tol, f"relative error {err:.2e}"


@pytest.mark.parametrize("module,fn,spec,kw", CNNS, ids=[c[1] for c in CNNS])
def test_torchvision_both_ways(tmp_path, module, fn, spec, kw):
    model = tv_model(module, fn, kw, seed=0)
    x = images()
    g, _ = elaborate(os.path.join(SPECS, f"{spec}.net"), None, {})
    # torchvision -> netdsl: the state dict as PyTorch users save it
    path = tmp_path / "tv.safetensors"
    st_torch.save_file(model.state_dict(), str(path))
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    named = weights.load_named(g, path, log=lambda s: None)
    m = Model(g, params={k: np.ascontiguousarray(v, dtype=np.float32) for k, v in named.items()})
    close(m.infer({"image": x}, want=["logits"])["logits"], want)
    # netdsl -> torchvision, strict: other values (each tensor scaled by its own factor)
    rng = np.random.default_rng(1)
    host = {k: (v * rng.uniform(0.7, 1.3)).astype(np.float32) for k, v in named.items()}
    out = tmp_path / "netdsl.safetensors"
    weights.save_named(g, host, out)
    model.load_state_dict(st_torch.load_file(str(out)), strict=True)
    with torch.no_grad():
        want2 = model(torch.from_numpy(x)).numpy()
    assert not np.allclose(want, want2)
    m.params = host
    close(m.infer({"image": x}, want=["logits"])["logits"], want2)


class CharLM(torch.nn.Module):
    """charlm (specs/lib/rnn.net) in PyTorch: embed -> nn.LSTM/GRU stack -> head."""

    def __init__(self, cell, vocab, embed, hidden, layers):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, embed)
        self.rnn = getattr(torch.nn, cell)(embed, hidden, layers, batch_first=True)
        self.head = torch.nn.Linear(hidden, vocab)

    def forward(self, chars):
        return self.head(self.rnn(self.embed(chars))[0])


@pytest.mark.parametrize("cell,spec", [("LSTM", "charlm_lstm"), ("GRU", "charlm_gru"), ("RNN", "charlm_rnn")])
def test_torch_rnn_stack(tmp_path, cell, spec):
    torch.manual_seed(0)
    vocab, embed, hidden, layers = 17, 8, 12, 2
    model = CharLM(cell, vocab, embed, hidden, layers).eval()
    chars = np.random.default_rng(0).integers(0, vocab, (3, 7))
    with torch.no_grad():
        want = model(torch.from_numpy(chars)).numpy()
    g, _ = elaborate(os.path.join(SPECS, "rnn", f"{spec}.net"), None,
                     dict(vocab=vocab, embed=embed, hidden=hidden, layers=layers, fused=True))
    path = tmp_path / "lm.safetensors"
    st_torch.save_file(model.state_dict(), str(path))
    m = Model(g, seed=1)
    weights.load_into(m, path)
    close(m.infer({"chars": chars}, want=["logits"])["logits"], want)
    # and back: netdsl's initial weights into the torch module, strict
    m2 = Model(g, seed=2)
    weights.save_named(g, m2.host_params(), tmp_path / "back.npz")
    back = {k: torch.from_numpy(v) for k, v in np.load(tmp_path / "back.npz").items()}
    assert sorted(back) == sorted(model.state_dict())
    model.load_state_dict(back, strict=True)
    with torch.no_grad():
        want = model(torch.from_numpy(chars)).numpy()
    close(m2.infer({"chars": chars}, want=["logits"])["logits"], want)


# ---------------------------------------------------------------- the command line

def run_cli(*argv, cwd=None):
    """`python -m netdsl ...` in a subprocess: (exit status, stdout, stderr)."""
    env = dict(os.environ, NUMBA_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "netdsl", *map(str, argv)], capture_output=True, text=True,
                       cwd=cwd or ROOT, env=env, timeout=300)
    return p.returncode, p.stdout, p.stderr


def test_cli_predict_eval_export_resnet18(tmp_path, capsys):
    model = tv_model("resnet", "resnet18", {}, seed=5)
    st_torch.save_file(model.state_dict(), str(tmp_path / "r18.safetensors"))
    x = images(2, seed=4)
    np.savez(tmp_path / "images.npz", image=x)
    spec = os.path.join(SPECS, "resnet18.net")
    out = tmp_path / "run"
    rc = main(["run", spec, "--weights", str(tmp_path / "r18.safetensors"), "--predict", str(tmp_path / "images.npz"),
               "--out", str(out), "--batch", "2"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "num_batches_tracked" in err     # the note
    # --predict normalises the images with the training data's channel statistics (train's normalize)
    from netdsl.runtime.train import Trainer
    g, loader = elaborate(spec, None, {})
    t = Trainer(g, dict(g.train, batch=2), str(tmp_path / "t"), "", training=False)
    norm = t.norm["image"]
    xn = ((x - norm[0].reshape(1, -1, 1, 1)) / norm[1].reshape(1, -1, 1, 1)).astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(xn)).numpy()
    close(np.load(out / "predictions.npz")["logits"], want)

    # export: a run directory (run.json + checkpoint) -> safetensors -> torchvision, strict
    from netdsl.runtime.sample import write_run_file
    m = Model(g, seed=7)
    write_run_file(str(out), spec, None, {}, None)
    save_checkpoint(out / "checkpoint.npz", m.host_params(), t.opt.state_dict(), step=3, rng=t.rng, spec_text="".join(loader.sources.values()))
    assert main(["export", str(out), "-o", str(tmp_path / "exp.safetensors")]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["export", str(out), "-o", str(tmp_path / "exp.npz")]) == 0
    sd = st_torch.load_file(str(tmp_path / "exp.safetensors"))
    npz = np.load(tmp_path / "exp.npz")
    assert sorted(sd) == sorted(npz.files) and all(np.array_equal(sd[k].numpy(), npz[k]) for k in sd)
    model.load_state_dict(sd, strict=True)
    with torch.no_grad():
        close(m.infer({"image": x}, want=["logits"])["logits"], model(torch.from_numpy(x)).numpy())
        want = model(torch.from_numpy(xn)).numpy()
    # the exported npz loads back by name through --predict (same logits)
    assert main(["run", spec, "--weights", str(tmp_path / "exp.npz"), "--predict", str(tmp_path / "images.npz"),
                 "--out", str(tmp_path / "run2"), "--batch", "2"]) == 0
    close(np.load(tmp_path / "run2" / "predictions.npz")["logits"], want)
    # the native checkpoint still works for --weights (spec hash checked, as before)
    assert main(["run", spec, "--weights", str(out / "checkpoint.npz"), "--predict", str(tmp_path / "images.npz"),
                 "--out", str(tmp_path / "run3"), "--batch", "2"]) == 0
    close(np.load(tmp_path / "run3" / "predictions.npz")["logits"], want)


def test_training_starts_from_weights(tmp_path):
    """--weights without --resume initialises training (step 0, fresh optimiser)."""
    spec = os.path.join(SPECS, "digits_cnn.net")
    g, _ = elaborate(spec, None, {})
    start = {k: v + 0.5 for k, v in Model(g, seed=9).host_params().items()}
    weights.save_named(g, start, tmp_path / "start.safetensors")
    rc, out, err = run_cli("run", spec, "--weights", tmp_path / "start.safetensors", "--epochs", "1", "--lr", "1e-12",
                           "--out", tmp_path / "run", "--no-progress", "--threads", "1")
    assert rc == 0, err
    assert "loaded 8 parameters and buffers by name" in err
    from netdsl.runtime.checkpoint import load_checkpoint
    ck = load_checkpoint(tmp_path / "run" / "checkpoint.npz")
    for k, v in start.items():      # lr 1e-12: the weights are still the file's
        np.testing.assert_allclose(ck.params[k], v, atol=1e-6)
    # --resume needs a checkpoint, not a weights file
    rc, _, err = run_cli("run", spec, "--weights", tmp_path / "start.safetensors", "--resume",
                         "--out", tmp_path / "run", "--no-progress")
    assert rc == 2 and "--resume continues a netdsl checkpoint" in err


# ---------------------------------------------------------------- refusals

def _cli_error(argv, capsys) -> str:
    assert main([str(a) for a in argv]) == 2
    return capsys.readouterr().err


def test_pickles_refused(tmp_path, capsys):
    spec = os.path.join(SPECS, "digits_cnn.net")
    sd = {"w": torch.zeros(2)}
    for name in ("model.pt", "model.pth"):
        torch.save(sd, tmp_path / name)
        err = _cli_error(["run", spec, "--weights", tmp_path / name, "--eval", "--out", tmp_path / "r"], capsys)
        assert "pickle" in err and "safetensors.torch" in err and "save_file" in err
    # not there at all: still refused by its extension, before anything is opened
    err = _cli_error(["run", spec, "--weights", tmp_path / "absent.pth", "--eval", "--out", tmp_path / "r"], capsys)
    assert "save_file" in err
    # torch.save's zip under another name: a pickle inside is found
    torch.save(sd, tmp_path / "disguised.npz")
    with pytest.raises(NetdslError, match="pickle"):
        weights.read_file(tmp_path / "disguised.npz")
    torch.save(sd, tmp_path / "legacy.weights", _use_new_zipfile_serialization=False)
    with pytest.raises(NetdslError, match="pickle"):
        weights.read_file(tmp_path / "legacy.weights")
    g, _ = elaborate(spec, None, {})
    with pytest.raises(NetdslError, match=".safetensors or .npz"):
        weights.save_named(g, Model(g).host_params(), tmp_path / "out.pt")


def test_name_problems_listed(tmp_path, capsys):
    if tvref.load() is None:
        pytest.skip(tvref.SKIP_REASON)
    sd = tv_model("resnet", "resnet18", {}, seed=0).state_dict()
    del sd["layer1.0.conv1.weight"]
    sd["layer9.extra.weight"] = torch.zeros(3)
    sd["fc.weight"] = torch.zeros(10, 512)
    st_torch.save_file(sd, str(tmp_path / "bad.safetensors"))
    err = _cli_error(["run", os.path.join(SPECS, "resnet18.net"), "--weights", tmp_path / "bad.safetensors",
                      "--eval", "--out", tmp_path / "r"], capsys)
    assert "1 missing, 1 unexpected, 1 wrong-shaped" in err
    assert "missing: layer1.0.conv1.weight (expected shape (64, 64, 3, 3))" in err
    assert "unexpected: layer9.extra.weight" in err
    assert "wrong shape: fc.weight is (10, 512), expected (1000, 512)" in err


def test_bfloat16_and_damaged_files(tmp_path):
    g, _ = elaborate(os.path.join(SPECS, "digits_cnn.net"), None, {})
    host = Model(g, seed=0).host_params()
    sd = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in host.items()}
    st_torch.save_file(sd, str(tmp_path / "bf16.safetensors"))
    got = weights.load_named(g, tmp_path / "bf16.safetensors")
    for k, v in sd.items():
        np.testing.assert_array_equal(got[k], v.float().numpy())
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(NetdslError, match="not a readable safetensors file"):
        weights.read_file(tmp_path / "junk.safetensors")
    (tmp_path / "junk.npz").write_bytes(b"hello")
    with pytest.raises(NetdslError, match="not an .npz"):
        weights.read_file(tmp_path / "junk.npz")
