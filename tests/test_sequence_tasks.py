"""The sequence tasks (runtime/tasks.py): each binds to its spec in specs/rnn/ (the feeds
layer's checks of names, shapes, dtypes and id ranges), holds the answer it claims
(checked by an independent computation here), and is scored by the metric it names."""
import inspect

import numpy as np
import pytest
from sklearn import metrics as skm
from sklearn.datasets import load_digits

from helpers import cli, compile_spec, compile_text
from netdsl.cli import data_flag
from netdsl.errors import NetdslError
from netdsl.lang.training import CONSTRUCTORS
from netdsl.runtime import tasks
from netdsl.runtime.data import make_source
from netdsl.runtime.feeds import bind
from netdsl.runtime.loader import Loader
from netdsl.runtime.metrics import Accuracy, OneHotAccuracy, SequenceAccuracy, choose

SMALL = {"size": 300}
# source, its arguments, the spec it is for, the --set that spec needs
CASES = [
    ("polarity", SMALL, "rnn/many_to_one.net", {}),
    ("copy", {"task": "reverse", **SMALL}, "rnn/seq2seq.net", {}),
    ("echo", {"delay": 3, **SMALL}, "rnn/many_to_many.net", {}),
    ("count_up", SMALL, "rnn/one_to_many.net", {"features": 64}),
    ("translated_digits", {}, "rnn/glimpses.net", {}),
    ("recall", {"delay": 2, **SMALL}, "rnn/vanilla_rnn.net", {}),
]


def _digit_of():
    """image bytes -> label, to recover which digit an example shows."""
    d = load_digits()
    return {(img / 16.0).astype(np.float32).tobytes(): int(y) for img, y in zip(d.images, d.target)}


@pytest.mark.parametrize("name, kwargs, spec, sets", CASES, ids=[c[0] for c in CASES])
def test_each_task_binds_to_its_spec(name, kwargs, spec, sets):
    g = compile_spec(spec, **sets)
    ds = make_source(name, **kwargs)
    pairs = bind(g, ds)
    assert sorted(pairs) == sorted(g.inputs)
    assert ds.size("train") > 0 and ds.size("test") > 0
    batch = next(iter(Loader({f: ds.train[f] for f in pairs.values()}, 8)))
    for n, f in pairs.items():
        assert batch[f].dtype == {"f32": np.float32, "i64": np.int64}[g.inputs[n].dtype]


def test_digit_rows_is_the_digits_row_by_row(tmp_path):
    ds = make_source("digit_rows")
    d = make_source("digits")
    np.testing.assert_array_equal(ds.train["rows"], d.x_train[:, 0])
    np.testing.assert_array_equal(ds.test["label"], d.y_test)
    g = compile_text(tmp_path, """
network rows_n1(classes = 10) {
  input pixels: f32[N, T, 8]
  input digit: i64[N]
  logits = pixels[:, -1] -> linear(classes)
  output logits
  loss ce = cross_entropy(logits, digit)
}""")
    assert bind(g, ds) == {"pixels": "rows", "digit": "label"}
    # many_to_one embeds token ids: float rows cannot fill it, and the error says what each side has
    with pytest.raises(NetdslError, match="nothing for input 'tokens'"):
        bind(compile_spec("rnn/many_to_one.net"), make_source("digit_rows"))


def test_polarity_labels_count_the_words():
    ds = make_source("polarity", length=7, size=500)
    for split in ("train", "test"):
        t, y = ds.split(split)["tokens"], ds.split(split)["label"]
        pos = ((t >= 3) & (t < 13)).sum(1)
        neg = ((t >= 13) & (t < 23)).sum(1)
        assert (pos != neg).all() and ((t >= 3) & (t < 43)).all()
        np.testing.assert_array_equal(y, pos > neg)
    assert 0.35 < ds.train["label"].mean() < 0.65


@pytest.mark.parametrize("task", ["copy", "reverse", "sort"])
def test_copy_targets_are_the_answer_framed_by_start_end_and_padding(task):
    ds = make_source("copy", task=task, length=6, size=200)
    for src, tgt in zip(ds.train["src"], ds.train["tgt"]):
        digits = [int(x) - 3 for x in src if x != 0]
        assert 2 <= len(digits) <= 6 and (src[:6 - len(digits)] == 0).all()     # left-padded
        answer = {"copy": digits, "reverse": digits[::-1], "sort": sorted(digits)}[task]
        k = len(digits)
        assert tgt[0] == 1 and list(tgt[1:k + 1] - 3) == answer and tgt[k + 1] == 2 and (tgt[k + 2:] == 0).all()
    with pytest.raises(NetdslError, match="copy: unknown task 'backwards'; choose copy, reverse, sort"):
        make_source("copy", task="backwards")


def test_echo_tags_are_the_digit_read_delay_steps_before():
    ds = make_source("echo", delay=3, length=9, size=200)
    for tok, gold in zip(ds.train["tokens"], ds.train["gold"]):
        n = int((tok != 0).sum())
        assert (tok[:n] >= 3).all() and (tok[n:] == 0).all() and n > 3
        want = [-1] * 3 + [int(x) - 3 for x in tok[:n - 3]] + [-1] * (9 - n)
        assert list(gold) == want
    with pytest.raises(NetdslError, match=r"echo: the delay \(9\) must be shorter than the length \(9\)"):
        make_source("echo", delay=9, length=9)


def test_count_up_starts_at_the_digit_shown():
    ds, digit = make_source("count_up", length=12, size=100), _digit_of()
    for feat, words in zip(ds.test["feat"], ds.test["words"]):
        d = digit[feat.reshape(8, 8).tobytes()]
        assert list(words - 3) == [(d + i) % 10 for i in range(12)]


def test_translated_digits_hold_the_enlarged_digit_somewhere():
    ds, digit = make_source("translated_digits", canvas=40, scale=3), _digit_of()
    src = make_source("digits")
    assert ds.train["image"].shape == (len(src.y_train), 3, 40, 40)
    spots = set()
    for img, y, orig in zip(ds.test["image"][:50], ds.test["label"][:50], src.x_test[:50, 0]):
        assert (img[0] == img[1]).all() and (img[0] == img[2]).all()
        r, c = np.argwhere(img[0] > 0).min(0)
        big = np.kron(orig, np.ones((3, 3), np.float32))
        rows, cols = np.nonzero(big)
        at = (r - rows.min(), c - cols.min())
        np.testing.assert_array_equal(img[0, at[0]:at[0] + 24, at[1]:at[1] + 24], big)
        assert img[0].sum() == pytest.approx(big.sum()) and digit[orig.tobytes()] == y
        spots.add(at)
    assert len(spots) > 20      # placed at random


def test_recall_targets_are_the_class_delay_steps_before():
    ds, digit = make_source("recall", delay=2, length=5, size=60), _digit_of()
    for x, target in zip(ds.train["x"], ds.train["target"]):
        classes = [digit[step.reshape(8, 8).tobytes()] for step in x]
        assert not target[:2].any()
        for t in range(2, 5):
            assert target[t].sum() == 1 and target[t].argmax() == classes[t - 2]


# ---------------------------------------------------------------- metrics, scored against the data

def test_sequence_metrics_score_the_right_answer_and_only_it():
    g = compile_spec("rnn/seq2seq.net")
    ds = make_source("copy", task="reverse", size=64)
    bind(g, ds)
    acc, = [m for m in choose(g) if m.keys == ("acc",)]
    seq, = choose(g, ["sequence_accuracy"])
    tgt = ds.train["tgt"]
    perfect = np.eye(13, dtype=np.float32)[tgt[:, 1:]]          # logits [N, T - 1, C]: the answer
    off = np.roll(perfect, 1, axis=1)                             # each token one step late
    for m in (acc, seq):
        m.update(perfect, tgt, 0.0)
        assert m.result() == {m.keys[0]: 1.0}
        m.reset()
        m.update(off, tgt, 0.0)
    keep = tgt[:, 1:] != 0                                        # padding is not scored
    want = skm.accuracy_score(tgt[:, 1:][keep], off.argmax(-1)[keep])
    assert acc.result()["acc"] == pytest.approx(want) and 0 < want < 0.5
    exact = [(o[k] == t[k]).all() for o, t, k in zip(off.argmax(-1), tgt[:, 1:], keep)]
    assert seq.result()["seq_acc"] == pytest.approx(np.mean(exact))


def test_token_accuracy_against_scikit_learn_and_onehot_accuracy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 9, 5)).astype(np.float32)
    labels = rng.integers(0, 5, (6, 9))
    labels[:, 7:] = -1
    m = Accuracy(None, "y", "ce", -1, 5)
    m.update(logits[:2], labels[:2], 0.0)
    m.update(logits[2:], labels[2:], 0.0)
    keep = labels != -1
    assert m.result()["acc"] == pytest.approx(skm.accuracy_score(labels[keep], logits.argmax(-1)[keep]))
    ds = make_source("recall", delay=1, size=40)
    g = compile_spec("rnn/vanilla_rnn.net")
    bind(g, ds)
    oh, = choose(g, ["onehot_accuracy"])
    assert isinstance(oh, OneHotAccuracy) and oh.label == "target"
    target = ds.train["target"]
    pred = target + rng.normal(0, 0.1, target.shape).astype(np.float32)
    pred[:10] = rng.normal(size=pred[:10].shape)
    oh.update(pred, target, 0.0)
    keep = target.any(-1)
    assert oh.result()["acc"] == pytest.approx(skm.accuracy_score(target.argmax(-1)[keep], pred.argmax(-1)[keep]))
    assert SequenceAccuracy.default is False and OneHotAccuracy.default is False


# ---------------------------------------------------------------- names, arguments, the command line

def test_the_train_sections_arguments_are_the_sources():
    for name, fn in {**tasks.SOURCES, "text": make_source.__globals__["load_text"]}.items():
        sig = {k: p.default for k, p in inspect.signature(fn).parameters.items()}
        assert sig == {k: d for k, (_, d) in CONSTRUCTORS["data"][name].items()}, name


def test_data_flag_gives_the_first_argument():
    assert data_flag("copy:reverse").kwargs["task"] == "reverse"
    assert data_flag("echo:4").kwargs == {"delay": 4, "length": 20, "size": 4000, "seed": 0}
    assert data_flag("text:/tmp/x.txt").kwargs == {"path": "/tmp/x.txt", "seq": 64}
    with pytest.raises(NetdslError, match="echo's delay must be an integer"):
        data_flag("echo:soon")
    with pytest.raises(NetdslError, match="digit_rows takes no argument"):
        data_flag("digit_rows:3")


@pytest.mark.parametrize("bad, message", [
    ({"size": 0}, r"polarity\(size\) must be an integer from 1"),
    ({"length": 1.5}, r"polarity\(length\) must be an integer"),
])
def test_bad_task_arguments_are_named(bad, message):
    with pytest.raises(NetdslError, match=message):
        make_source("polarity", **bad)


def test_a_bad_task_argument_from_the_cli_exits_2(tmp_path):
    r = cli("run", "specs/rnn/seq2seq.net", "--data", "copy:backwards", "--out", tmp_path / "run")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "copy: unknown task 'backwards'; choose copy, reverse, sort" in r.stderr, r.stderr
