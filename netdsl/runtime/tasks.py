"""Sequence tasks with a checkable answer, one per kind of recurrent network in specs/rnn/.

Each is a data source (data.make_source) whose fields are named after the inputs of
the spec it is made for; a spec naming them otherwise gets them in declaration order
(`Dataset.by_order`, when the kinds, integer or float, match).

| source | kind | fields (per example) | spec |
|---|---|---|---|
| digit_rows | n -> 1 | rows f32[8, 8] (an 8x8 digit, one row per step), label | (float sequence input) |
| polarity(length) | n -> 1 | tokens i64[length], label: more positive than negative words | many_to_one |
| copy(task) | seq2seq | src i64[S], tgt i64[S + 2]: copy, reverse or sort the digits | seq2seq |
| echo(delay) | n -> n, aligned | tokens i64[T], gold i64[T]: the digit `delay` steps back | many_to_many |
| count_up(length) | 1 -> n | feat f32[64] (a digit image), words i64[length]: d, d+1, ... | one_to_many |
| translated_digits(canvas) | glimpses | image f32[3, canvas, canvas], label: a digit placed at random | glimpses |
| recall(delay) | n -> n, regression | x f32[T, 64] (digit images), target f32[T, 10]: one-hot class `delay` steps back | vanilla_rnn |

Token ids follow one convention: 0 padding, 1 start, 2 end, digit d is d + 3 (ids below
13; the specs' vocabularies are larger). Padded or unanswerable positions of a label
sequence hold the loss's ignore index: 0 (pad) in a target read by seq2seq's
cross-entropy(ignore_index = pad), -1 in many_to_many's tags. Digit images are
scikit-learn's 8x8 digits with load_digits' fixed split, so every test sequence is made
of images the training split never shows. Every source is reproducible from its seed.
"""
from __future__ import annotations

import numpy as np

from ..errors import NetdslError
from .data import Dataset, load_digits

PAD, START, END, DIGIT = 0, 1, 2, 3     # digit d has the id d + DIGIT
TEST_FRACTION = 4                       # a test split of size // 4 examples


def _check(name: str, **values):
    for k, (v, lo, hi) in values.items():
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise NetdslError(f"{name}({k}) must be an integer from {lo} to {hi}, got {v!r}")


def _task(name: str, fields: dict, n_train: int, source: str) -> Dataset:
    train = {k: a[:n_train] for k, a in fields.items()}
    test = {k: a[n_train:] for k, a in fields.items()}
    return Dataset(name, source, train, test, by_order=True)


def _digits_by_split():
    """load_digits' fixed split, images [n, 8, 8] and labels."""
    d = load_digits()
    return {"train": (d.x_train[:, 0], d.y_train), "test": (d.x_test[:, 0], d.y_test)}


# ---------------------------------------------------------------- n -> 1

def digit_rows() -> Dataset:
    """scikit-learn's digits read row by row: 8 steps of 8 pixel features."""
    d = load_digits()
    return Dataset("digit_rows", "sklearn digits, row by row", {"rows": d.x_train[:, 0], "label": d.y_train},
                   {"rows": d.x_test[:, 0], "label": d.y_test}, by_order=True)


POLARITY_WORDS = 10     # positive words, then as many negative ones, then 2x as many neutral


def polarity(length: int = 20, size: int = 4000, seed: int = 0) -> Dataset:
    """Sentiment-style: tokens are positive words (ids 3..12), negative words (13..22)
    and neutral ones (23..42); the label is 1 when the positive words outnumber the
    negative ones, else 0. Ties never occur (the counts differ by at least one), so
    every label is decided by the whole sentence."""
    _check("polarity", length=(length, 1, 10_000), size=(size, 1, 10_000_000))
    rng = np.random.default_rng(seed)
    n = size + max(size // TEST_FRACTION, 1)
    w = POLARITY_WORDS
    kind = rng.choice(3, size=(n, length), p=[0.25, 0.25, 0.5])     # 0 positive, 1 negative, 2 neutral
    pos, neg = (kind == 0).sum(1), (kind == 1).sum(1)
    tie = np.flatnonzero(pos == neg)
    # break each tie by turning one neutral word (or, failing that, any word) positive or negative
    for i in tie:
        j = np.flatnonzero(kind[i] == 2)
        j = rng.choice(j) if len(j) else rng.integers(length)
        kind[i, j] = rng.integers(2) if kind[i, j] == 2 else 1 - kind[i, j]
    base = np.array([DIGIT, DIGIT + w, DIGIT + 2 * w])
    tokens = base[kind] + rng.integers(0, np.array([w, w, 2 * w])[kind])
    label = ((kind == 0).sum(1) > (kind == 1).sum(1)).astype(np.int64)
    return _task("polarity", {"tokens": tokens.astype(np.int64), "label": label}, size,
                 f"polarity data (length {length}, seed {seed})")


# ---------------------------------------------------------------- seq2seq and aligned n -> n

COPY_TASKS = {"copy": lambda d: d, "reverse": lambda d: d[::-1], "sort": sorted}


def copy(task: str = "copy", length: int = 10, size: int = 8000, seed: int = 0) -> Dataset:
    """seq2seq: `src` holds 2..length random digits, left-padded with 0 so that the
    encoder's last step reads the last digit; `tgt` is <start>, the answer (the digits
    copied, reversed or sorted), <end>, then padding: [length + 2]. Read with seq2seq's
    cross_entropy(ignore_index = pad), the padding is not scored."""
    if task not in COPY_TASKS:
        raise NetdslError(f"copy: unknown task '{task}'; choose {', '.join(COPY_TASKS)}")
    _check("copy", length=(length, 2, 10_000), size=(size, 1, 10_000_000))
    rng = np.random.default_rng(seed)
    n = size + max(size // TEST_FRACTION, 1)
    src = np.full((n, length), PAD, np.int64)
    tgt = np.full((n, length + 2), PAD, np.int64)
    lengths = rng.integers(2, length + 1, n)
    digits = rng.integers(0, 10, (n, length))
    answer = COPY_TASKS[task]
    for i, k in enumerate(lengths):
        d = digits[i, :k]
        src[i, length - k:] = d + DIGIT
        tgt[i, 0] = START
        tgt[i, 1:k + 1] = np.asarray(answer(list(d))) + DIGIT
        tgt[i, k + 1] = END
    return _task(f"copy_{task}", {"src": src, "tgt": tgt}, size, f"copy:{task} data (length {length}, seed {seed})")


def echo(delay: int = 2, length: int = 20, size: int = 4000, seed: int = 0) -> Dataset:
    """Aligned tagging that needs memory: `tokens` are 1..length digits, right-padded
    with 0; the tag `gold` at step t is the digit read `delay` steps before (0..9), and
    -1 (not scored) where there is none: the first `delay` steps and the padding."""
    _check("echo", delay=(delay, 0, 10_000), length=(length, 1, 10_000), size=(size, 1, 10_000_000))
    if delay >= length:
        raise NetdslError(f"echo: the delay ({delay}) must be shorter than the length ({length})")
    rng = np.random.default_rng(seed)
    n = size + max(size // TEST_FRACTION, 1)
    digits = rng.integers(0, 10, (n, length))
    lengths = rng.integers(delay + 1, length + 1, n)
    real = np.arange(length)[None] < lengths[:, None]
    tokens = np.where(real, digits + DIGIT, PAD)
    gold = np.full((n, length), -1, np.int64)
    gold[:, delay:] = digits[:, :length - delay]
    gold[~real] = -1
    return _task(f"echo_{delay}", {"tokens": tokens.astype(np.int64), "gold": gold}, size,
                 f"echo:{delay} data (length {length}, seed {seed})")


# ---------------------------------------------------------------- 1 -> n

def count_up(length: int = 8, size: int = 4000, seed: int = 0) -> Dataset:
    """One image, a sequence of words: `feat` is an 8x8 digit image d flattened to 64
    features in [0, 1]; `words` counts up from it, d, d + 1, ... (mod 10), as digit ids."""
    _check("count_up", length=(length, 1, 10_000), size=(size, 1, 10_000_000))
    rng = np.random.default_rng(seed)
    out = {}
    for split, (x, y) in _digits_by_split().items():
        m = size if split == "train" else max(size // TEST_FRACTION, 1)
        pick = rng.integers(0, len(y), m)
        words = (y[pick, None] + np.arange(length)[None]) % 10 + DIGIT
        out[split] = {"feat": x[pick].reshape(m, 64), "words": words.astype(np.int64)}
    return Dataset("count_up", f"count_up:{length} data (sklearn digits, seed {seed})", out["train"], out["test"],
                   by_order=True)


# ---------------------------------------------------------------- glimpses

def translated_digits(canvas: int = 64, scale: int = 4, seed: int = 0) -> Dataset:
    """Classify an image by glimpses (the notes' sequential processing of non-sequence
    data; translated MNIST in Mnih et al. 2014): each 8x8 digit, enlarged `scale` times
    (each pixel a scale x scale block), is placed at a random position on a black
    canvas x canvas image, the same grey in 3 channels."""
    _check("translated_digits", scale=(scale, 1, 64))
    _check("translated_digits", canvas=(canvas, 8 * scale, 4096))
    rng = np.random.default_rng(seed)
    out, side = {}, 8 * scale
    for split, (x, y) in _digits_by_split().items():
        big = np.kron(x, np.ones((1, scale, scale), np.float32))
        img = np.zeros((len(y), 3, canvas, canvas), np.float32)
        at = rng.integers(0, canvas - side + 1, (len(y), 2))
        for i, (r, c) in enumerate(at):
            img[i, :, r:r + side, c:c + side] = big[i]
        out[split] = {"image": img, "label": y}
    return Dataset("translated_digits", f"translated digits ({canvas}x{canvas}, sklearn digits x{scale}, seed {seed})",
                   out["train"], out["test"], by_order=True)


# ---------------------------------------------------------------- n -> n regression (vanilla RNN)

def recall(delay: int = 1, length: int = 8, size: int = 2000, seed: int = 0) -> Dataset:
    """A sequence of digit images (each 64 features), and at each step the one-hot
    class (10) of the image `delay` steps before; zeros where there is none (the first
    `delay` steps). Read by an L2 loss (vanilla_rnn.net); the answer at a step is the
    largest output, and steps with an all-zero target are not scored."""
    _check("recall", delay=(delay, 0, 10_000), length=(length, 1, 10_000), size=(size, 1, 10_000_000))
    if delay >= length:
        raise NetdslError(f"recall: the delay ({delay}) must be shorter than the length ({length})")
    rng = np.random.default_rng(seed)
    out = {}
    for split, (x, y) in _digits_by_split().items():
        m = size if split == "train" else max(size // TEST_FRACTION, 1)
        pick = rng.integers(0, len(y), (m, length))
        target = np.zeros((m, length, 10), np.float32)
        rows, steps = np.indices((m, length - delay))
        target[rows, steps + delay, y[pick[:, :length - delay]]] = 1
        out[split] = {"x": x[pick].reshape(m, length, 64), "target": target}
    return Dataset(f"recall_{delay}", f"recall:{delay} data (sklearn digits, length {length}, seed {seed})",
                   out["train"], out["test"], by_order=True)


SOURCES = {"digit_rows": digit_rows, "polarity": polarity, "copy": copy, "echo": echo, "count_up": count_up,
           "translated_digits": translated_digits, "recall": recall}
