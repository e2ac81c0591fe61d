"""`netdsl run` end to end: training to accuracy, checkpoints, resume, bad input."""
import json
from pathlib import Path

import numpy as np
import pytest

from helpers import ROOT, SPECS, cli, compile_spec
from netdsl.errors import NetdslError
from netdsl.runtime import load_checkpoint
from netdsl.runtime.train import Trainer


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    r = cli("run", SPECS / "digits_cnn.net", "--out", out, "--no-progress")
    assert r.returncode == 0, r.stderr
    return out, r


def test_digits_cnn_reaches_098_test_accuracy(digits_run):
    out, r = digits_run
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in recs] == list(range(1, 16))
    assert recs[-1]["test_acc"] >= 0.98, recs[-1]
    assert recs[-1]["train_loss"] < recs[0]["train_loss"] / 10
    assert (out / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    c = load_checkpoint(str(out / "checkpoint.npz"))
    assert c.epoch == 15 and c.step == 15 * 45
    assert "epoch 15:" in r.stdout and "Traceback" not in r.stderr


def test_eval_and_predict_from_checkpoint(digits_run, tmp_path):
    out, _ = digits_run
    r = cli("run", SPECS / "digits_cnn.net", "--out", out, "--eval")
    assert r.returncode == 0, r.stderr
    assert float(r.stdout.split("test_acc")[1].split()[0]) >= 0.98
    from sklearn.datasets import load_digits
    d = load_digits()
    np.save(tmp_path / "five.npy", (d.images[-5:] / 16.0).astype(np.float32)[:, None])
    r = cli("run", SPECS / "digits_cnn.net", "--out", out, "--predict", tmp_path / "five.npy")
    assert r.returncode == 0, r.stderr
    preds = json.loads((out / "predictions.json").read_text())["predictions"]
    assert sum(p == t for p, t in zip(preds, d.target[-5:])) >= 4


def _trainer(out, epochs):
    g = compile_spec("digits_cnn.net")
    cfg = dict(g.train, epochs=epochs)
    return Trainer(g, cfg, str(out), (SPECS / "digits_cnn.net").read_text(), log=lambda s: None)


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    whole = _trainer(tmp_path / "whole", 3)
    whole.fit(progress=False)
    first = _trainer(tmp_path / "split", 3)
    first.fit(progress=False, until=1)        # as if the run were killed after epoch 1
    rest = _trainer(tmp_path / "split", 3)
    rest.resume()
    rest.fit(progress=False)
    assert rest.model.step == whole.model.step
    for k, v in whole.model.params.items():
        assert np.array_equal(v, rest.model.params[k]), k


NAN_SPEC = """
network blowup() {
  input image: f32[N, 1, 8, 8]
  input label: i64[N]
  logits = image -> flatten -> linear(64) -> relu -> linear(10)
  output logits
  loss ce = cross_entropy(logits, label)
  train { optimizer = sgd(lr = 1e12) epochs = 3 batch = 64 data = digits() }
}
"""


def test_non_finite_loss_names_the_operator_and_line(tmp_path):
    spec = tmp_path / "blowup.net"
    spec.write_text(NAN_SPEC)
    r = cli("run", spec, "--out", tmp_path / "run", "--no-progress")
    assert r.returncode == 2
    assert "non-finite values" in r.stderr and "blowup.net:" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("args, message", [
    (["--epochs", "0"], "--epochs must be positive"),
    (["--data", "digitz"], "did you mean 'digits'"),
    (["--data", "mnist:/nonexistent/mnist"], "/nonexistent/mnist"),
    (["--data", "fashion_mnist"], "holds examples of shape [1, 28, 28]"),
    (["--device", "cuda"], "cuda"),
    (["--eval"], "no checkpoint"),
    (["--threads", "0"], "--threads"),
    (["--set", "clases=3"], "no parameter, dimension or top-level const 'clases'"),
    (["--data", "digits:/tmp"], "--data digits:/tmp: digits takes no argument after ':'"),
    (["--data", "synthetic:many"], "synthetic's size must be an integer"),
    (["--data", "synthetic:0"], "synthetic data needs at least 1 example"),
])
def test_bad_run_flags_are_clear_errors(tmp_path, args, message):
    r = cli("run", SPECS / "digits_cnn.net", "--out", tmp_path / "run", "--no-progress", *args)
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("batch", ["0", "-3"])
def test_compile_refuses_a_batch_below_one(batch):
    """--batch 0 was taken as 'no batch given' and the spec's batch used in silence."""
    r = cli("compile", SPECS / "digits_cnn.net", "--explain", "--batch", batch)
    assert r.returncode == 2 and f"--batch must be positive, got {batch}" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_synthetic_data_from_the_command_line(tmp_path):
    r = cli("run", SPECS / "resnet20_cifar.net", "--data", "synthetic", "--epochs", "1", "--batch", "32",
            "--out", tmp_path / "run", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "training resnet20_cifar on synthetic: 256 train / 64 test" in r.stdout


def test_detector_on_data_without_boxes_says_so(tmp_path):
    """Every detection operator runs now (test_registry_closed.py covers an operator that
    cannot run yet); a detector given data without boxes (digits: images and labels) names
    the ground-truth inputs nothing fills."""
    r = cli("run", SPECS / "det" / "faster_rcnn.net", "--data", "digits", "--out", tmp_path / "run")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "has nothing for input 'gt_boxes' of 'faster_rcnn'" in r.stderr, r.stderr


SMALL_SPEC = """
network small() {
  input image: f32[N, 1, 8, 8]
  input label: i64[N]
  logits = image -> flatten -> linear(32) -> relu -> linear(10)
  output logits
  loss ce = cross_entropy(logits, label)
  train { optimizer = adam(lr = 1e-2) epochs = 1 batch = 64 data = digits() }
}
"""


def test_a_spec_edited_after_training_still_evaluates_but_does_not_resume(tmp_path):
    spec, out = tmp_path / "small.net", tmp_path / "run"
    spec.write_text(SMALL_SPEC)
    r = cli("run", spec, "--out", out, "--no-progress")
    assert r.returncode == 0, r.stderr
    before = cli("eval", out)
    assert before.returncode == 0 and "earlier version" not in before.stderr, before.stderr
    spec.write_text("# a comment added after training\n" + SMALL_SPEC)
    after = cli("eval", out)
    assert after.returncode == 0, after.stderr
    assert "earlier version of the spec" in after.stderr and "by name" in after.stderr
    assert after.stdout.split("wrote")[0] == before.stdout.split("wrote")[0]     # the same weights
    r = cli("run", spec, "--out", out, "--resume", "--epochs", "2")
    assert r.returncode == 2 and "different spec" in r.stderr and "--weights" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
