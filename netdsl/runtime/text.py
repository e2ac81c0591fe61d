"""Text as data: a UTF-8 file read as characters, for character-level language models.

`text(path, seq)` reads the whole file (strict UTF-8; a leading byte-order mark is
dropped), numbers its characters by the sorted set of characters in the file (ids
0..V-1; `Dataset.vocab` holds them in id order, for the checkpoint and for sampling),
and splits the id sequence contiguously: the last 10% of the characters are the
validation ("test") split, the rest the training split.

Each split is one long sequence (`Dataset.streams[split]`), read in order as N parallel
streams by `loader.StreamLoader`, as PyTorch's word_language_model example does
(`batchify`, `get_batch`), so that truncated BPTT carries meaningful state from one
batch to the next. Its fields `chars` and `next` are the same sequence cut into
consecutive windows of `seq` characters (`next` shifted by one), the layout of a
single stream: what `feeds.bind` checks against the spec's inputs.

The default corpus, path "pydoc_topics", is the running Python's own
`pydoc_data/topics.py`: the text of its `topics` dict (the help pages of the language
reference), joined in the file's order; about 465k characters in CPython 3.11, and it
ships with every CPython, so a demo runs offline. Its vocabulary depends on the Python
version, which is why a run stores the vocabulary it trained with.
"""
from __future__ import annotations

import os
import stat

import numpy as np

from ..errors import NetdslError

DEFAULT = "pydoc_topics"      # text(path=...) meaning the built-in corpus
VALIDATION = 0.1              # the last tenth of the characters
FIELDS = {"chars": 0, "next": 1}   # field -> shift into the sequence
SPLIT_NAMES = {"train": "the training split", "test": f"the validation split (the last {VALIDATION:.0%})"}


def pydoc_topics() -> tuple[str, str]:
    """(text, where it came from): the values of pydoc_data.topics.topics, joined."""
    try:
        import pydoc_data.topics as t
    except ImportError:     # some distributions split pydoc_data out of the interpreter
        raise NetdslError("this Python has no pydoc_data module, text()'s default corpus",
                          hint="give a text file: --data text:PATH") from None
    return "".join(t.topics.values()), f"{t.__file__} (its topics' text)"


def read_text(path: str) -> str:
    """The file decoded as strict UTF-8; a bad byte is an error naming its offset."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):    # a device or pipe could be endless
                raise NetdslError(f"text file {path} is not a regular file")
            _check_memory(path, st.st_size)
            data = f.read()
    except FileNotFoundError:
        raise NetdslError(f"text file {path} not found") from None
    except IsADirectoryError:
        raise NetdslError(f"text file {path} is a directory", hint="give the path of a UTF-8 text file") from None
    except OSError as e:
        raise NetdslError(f"cannot read text file {path}: {e.strerror or e}") from None
    try:
        s = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise NetdslError(f"{path} is not UTF-8 text: byte offset {e.start} (line {line}) holds "
                          f"{data[e.start:e.end].hex(' ')}: {e.reason}",
                          hint="convert it first, e.g. iconv -f latin1 -t utf-8 IN > OUT") from None
    return s[1:] if s.startswith("\ufeff") else s


def _check_memory(path: str, size: int):
    """Refuse a file whose ids could not fit: up to 4 bytes per character as text,
    4 more as code points and 8 as int64 ids, per byte of UTF-8."""
    from .train import machine_memory
    need, have = 16 * size, machine_memory() // 2
    if need > have:
        raise NetdslError(f"text file {path} has {size / 2**30:.1f} GiB; reading it as character ids would "
                          f"take about {need / 2**30:.1f} GiB, more than half of this machine's memory",
                          hint="train on a part of it")


def vocabulary(s: str) -> tuple[str, np.ndarray]:
    """(the sorted distinct characters, the id of each character of s as int64)."""
    codes = np.frombuffer(s.encode("utf-32-le", "surrogatepass"), np.uint32)
    chars, ids = np.unique(codes, return_inverse=True)
    return "".join(map(chr, chars.tolist())), ids.astype(np.int64).reshape(-1)


def encode(s: str, vocab: str, what: str = "the text") -> np.ndarray:
    """Characters -> int64 ids of `vocab` (characters in id order); a character
    the vocabulary lacks is an error naming it and its position."""
    index = {c: i for i, c in enumerate(vocab)}
    out = np.empty(len(s), np.int64)
    for i, c in enumerate(s):
        j = index.get(c)
        if j is None:
            raise NetdslError(f"{what}: the character {c!r} (U+{ord(c):04X}) at position {i} is not in the "
                              f"vocabulary of the training text ({len(vocab)} characters)",
                              hint="use only characters the model was trained on")
        out[i] = j
    return out


def decode(ids, vocab: str) -> str:
    """int ids -> the text they stand for; an id outside the vocabulary is an error."""
    a = np.asarray(ids).reshape(-1)
    if a.size and (a.dtype.kind not in "iu" or a.min() < 0 or a.max() >= len(vocab)):
        bad = a[(a < 0) | (a >= len(vocab))].tolist() if a.dtype.kind in "iu" else a.tolist()
        raise NetdslError(f"id {bad[0]!r} is outside the vocabulary of {len(vocab)} characters",
                          hint="the spec's vocab is larger than the text's; mask ids >= "
                               f"{len(vocab)} before sampling")
    return "".join(vocab[i] for i in a.tolist())


def windows(ids: np.ndarray, seq: int, where: str, extra: int = 1) -> dict[int, np.ndarray]:
    """shift -> consecutive windows of `seq` ids starting at that shift (views of
    `ids`), for shifts 0..extra; the final partial window is dropped."""
    k = (len(ids) - extra) // seq
    if k < 1:
        raise NetdslError(f"{where} has {len(ids)} ids, fewer than the sequence length + {extra} = {seq + extra}",
                          hint="give a longer text or a shorter sequence length")
    return {s: ids[s:s + k * seq].reshape(k, seq) for s in range(extra + 1)}


def load_text(path: str = DEFAULT, seq: int = 64):
    """text(path, seq): the Dataset of a UTF-8 text file, or of the built-in corpus."""
    from .data import Dataset
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
        raise NetdslError(f"text(seq): the sequence length must be a positive integer, got {seq!r}")
    if path == DEFAULT:
        s, source = pydoc_topics()
    else:
        s, source = read_text(path), path
    if not s:
        raise NetdslError(f"text file {source} is empty")
    vocab, ids = vocabulary(s)
    cut = len(ids) - int(len(ids) * VALIDATION)
    streams = {"train": ids[:cut], "test": ids[cut:]}
    fields = {}
    for split, a in streams.items():
        by_shift = windows(a, seq, f"{source}: {SPLIT_NAMES[split]}")
        fields[split] = {f: by_shift[shift] for f, shift in FIELDS.items()}
    return Dataset("text", source, fields["train"], fields["test"], vocab=vocab, streams=streams,
                   shifts=dict(FIELDS), seq=seq, by_order=True)
