"""Character-level language models from the command line: `netdsl run` trains a charlm
spec on a text file with truncated BPTT, `netdsl sample` generates from the run; at a
temperature near 0 sampling is argmax; mistakes are clear errors (exit 2)."""
import json

import numpy as np
import pytest

from helpers import SPECS, cli, compile_spec
from netdsl.runtime.model import Model
from netdsl.runtime.sample import generate

SMALL = ["--set", "hidden=32", "--set", "embed=8", "--set", "layers=1", "--set", "chunk=20"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("charlm")
    text = d / "abc.txt"
    text.write_text("abcd" * 1000)
    out = d / "run"
    r = cli("run", SPECS / "rnn/charlm_lstm.net", "--data", f"text:{text}", "--epochs", "4", "--batch", "4", "--lr", "0.01",
            *SMALL, "--out", out, "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


def test_training_reads_the_text_in_chunks_and_learns_it(run):
    out, r = run
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 4
    # "abcd" repeated: after a few epochs the next character is certain
    assert recs[-1]["test_loss_per_token"] < 0.1 < recs[0]["train_loss_per_token"]
    assert json.loads((out / "run.json").read_text())["set"]["chunk"] == 20


def test_sample_continues_the_pattern(run):
    out, _ = run
    r = cli("sample", out, "--prime", "ab", "-n", "30", "--temperature", "0.05")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.rstrip("\n") == ("abcd" * 9)[:32]


@pytest.mark.parametrize("args, message", [
    (["--prime", "xyz"], "--prime has character(s) the model never saw: 'x', 'y', 'z'"),
    (["-n", "-1"], "-n must be 0 or more"),
    (["--temperature", "0"], "the temperature must be positive"),
])
def test_sample_mistakes_are_clear(run, args, message):
    out, _ = run
    r = cli("sample", out, *args)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert message in r.stderr


def test_sample_of_a_directory_that_is_no_run(tmp_path):
    r = cli("sample", tmp_path)
    assert r.returncode == 2 and "holds no run.json" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "run.json").write_text('{"spec": 3}')
    r = cli("sample", tmp_path)
    assert r.returncode == 2 and "run.json is damaged" in r.stderr


def test_a_cold_temperature_samples_the_argmax():
    g = compile_spec("rnn/charlm_gru.net", vocab=11, embed=4, hidden=8, layers=1, temperature=1e-4)
    m = Model(g, seed=3)
    x = np.random.default_rng(0).integers(0, 11, (16, 5))
    out = m.infer({"chars": x}, want=["logits", "sampled"])
    np.testing.assert_array_equal(out["sampled"], out["logits"][:, -1].argmax(-1))


def test_generation_reads_the_primer_once_then_one_character_at_a_time():
    """Sampling step by step with the state handed on equals reading primer + samples at once."""
    g = compile_spec("rnn/charlm_rnn.net", vocab=5, embed=3, hidden=6, layers=2, temperature=1e-4)
    m = Model(g, seed=1)
    text = generate(m, "abcde", "abca", 6)
    ids = np.array([["abcde".index(c) for c in text]])
    logits = m.infer({"chars": ids})["logits"][0]
    # each drawn character is the argmax after what precedes it
    assert "".join("abcde"[i] for i in logits[3:-1].argmax(-1)) == text[4:]
