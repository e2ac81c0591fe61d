"""text(path, seq): characters, vocabulary, the contiguous split and the stream layout
of PyTorch's word_language_model example; the errors a user can cause."""
import numpy as np
import pytest
import torch

from helpers import cli, compile_spec, compile_text
from netdsl.errors import NetdslError
from netdsl.runtime.data import make_source
from netdsl.runtime.feeds import bind
from netdsl.runtime.loader import StreamLoader
from netdsl.runtime.text import decode, encode, load_text


# ---------------------------------------------------------------- PyTorch's example, written out

def batchify(data: torch.Tensor, bsz: int) -> torch.Tensor:
    """examples/word_language_model/main.py: [L, bsz], column s = stream s."""
    nbatch = data.size(0) // bsz
    data = data.narrow(0, 0, nbatch * bsz)
    return data.view(bsz, -1).t().contiguous()


def get_batch(source: torch.Tensor, i: int, bptt: int):
    seq_len = min(bptt, len(source) - 1 - i)
    return source[i:i + seq_len], source[i + 1:i + 1 + seq_len].reshape(-1)


@pytest.mark.parametrize("length, streams, seq", [(1000, 4, 7), (1000, 3, 10), (97, 2, 8), (401, 4, 99),
                                                  (61, 1, 5), (64, 4, 15)])
def test_streams_are_pytorch_batchify_and_get_batch(length, streams, seq):
    ids = np.random.default_rng(length).integers(0, 50, length).astype(np.int64)
    ref = batchify(torch.from_numpy(ids), streams)
    want = [get_batch(ref, i, seq) for i in range(0, ref.size(0) - 1, seq)]
    want = [(d, t) for d, t in want if len(d) == seq]   # netdsl drops the shortened last chunk
    got = list(StreamLoader(ids, streams, seq, {"chars": 0, "next": 1}))
    assert len(got) == len(want) == len(StreamLoader(ids, streams, seq, {"chars": 0, "next": 1})) > 0
    for b, (d, t) in zip(got, want):
        assert b["chars"].shape == b["next"].shape == (streams, seq)
        np.testing.assert_array_equal(b["chars"], d.t().numpy())
        np.testing.assert_array_equal(b["next"], t.view(seq, streams).t().numpy())
    # each stream reads on from one batch to the next
    for a, b in zip(got, got[1:]):
        np.testing.assert_array_equal(a["next"][:, -1], b["chars"][:, 0])


def test_batches_are_private_copies_in_the_bound_dtype():
    ids = np.arange(100, dtype=np.int64)
    loader = StreamLoader(ids, 2, 5, {"chars": 0, "next": 1}, {"chars": np.int32})
    b = next(iter(loader))
    assert b["chars"].dtype == np.int32 and b["next"].dtype == np.int64
    b["next"][:] = -1
    assert ids.min() == 0


# ---------------------------------------------------------------- the source

@pytest.fixture
def small_text(tmp_path):
    s = "hello, wörld — 你好\n" * 40 + "the end\n"
    p = tmp_path / "t.txt"
    p.write_text(s, encoding="utf-8")
    return p, s


def test_vocabulary_split_and_fields(small_text):
    p, s = small_text
    ds = make_source("text", path=str(p), seq=16)
    assert ds.vocab == "".join(sorted(set(s)))
    ids = np.concatenate([ds.streams["train"], ds.streams["test"]])
    np.testing.assert_array_equal(ids, encode(s, ds.vocab))
    assert decode(ids, ds.vocab) == s
    assert len(ds.streams["test"]) == len(s) // 10              # the last tenth
    for split in ("train", "test"):
        seq, f = ds.streams[split], ds.split(split)
        k = (len(seq) - 1) // 16
        assert f["chars"].shape == f["next"].shape == (k, 16)
        np.testing.assert_array_equal(f["chars"].reshape(-1), seq[:k * 16])
        np.testing.assert_array_equal(f["next"].reshape(-1), seq[1:k * 16 + 1])


def test_a_byte_order_mark_is_not_a_character(tmp_path):
    p = tmp_path / "bom.txt"
    p.write_bytes(b"\xef\xbb\xbf" + b"abcabcabc" * 10)
    assert make_source("text", path=str(p), seq=4).vocab == "abc"


def test_default_corpus_is_pythons_pydoc_topics():
    from pydoc_data.topics import topics
    s = "".join(topics.values())
    ds = load_text()
    assert "topics.py" in ds.source and ds.vocab == "".join(sorted(set(s))) and ds.seq == 64
    assert len(ds.streams["train"]) + len(ds.streams["test"]) == len(s) > 100_000
    assert decode(ds.streams["test"][-200:], ds.vocab) == s[-200:]


def test_encode_and_decode_refuse_what_the_vocabulary_lacks():
    with pytest.raises(NetdslError, match=r"--prime: the character 'é' \(U\+00E9\) at position 2 is not in "
                                          r"the vocabulary of the training text \(3 characters\)"):
        encode("abé", "abc", "--prime")
    with pytest.raises(NetdslError, match="id 3 is outside the vocabulary of 3 characters"):
        decode([0, 3], "abc")


def test_missing_unreadable_and_non_utf8_files_are_named(tmp_path):
    with pytest.raises(NetdslError, match=f"text file {tmp_path}/nope.txt not found"):
        make_source("text", path=str(tmp_path / "nope.txt"))
    with pytest.raises(NetdslError, match="is a directory"):
        make_source("text", path=str(tmp_path))
    with pytest.raises(NetdslError, match="text file /dev/zero is not a regular file"):
        make_source("text", path="/dev/zero")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("ab\ncaf".encode() + "é".encode("latin1") + b" au lait\n")
    with pytest.raises(NetdslError, match=rf"{bad} is not UTF-8 text: byte offset 6 \(line 2\) holds e9"):
        make_source("text", path=str(bad))
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(NetdslError, match="empty"):
        make_source("text", path=str(tmp_path / "empty.txt"))
    (tmp_path / "short.txt").write_text("abcdefghij" * 3)
    with pytest.raises(NetdslError, match=r"the validation split \(the last 10%\) has 3 ids, fewer than the "
                                          r"sequence length \+ 1 = 9"):
        make_source("text", path=str(tmp_path / "short.txt"), seq=8)
    with pytest.raises(NetdslError, match="positive integer"):
        make_source("text", path=str(tmp_path / "short.txt"), seq=0)


def test_too_few_characters_for_the_streams(small_text):
    ds = make_source("text", path=str(small_text[0]), seq=16)
    with pytest.raises(NetdslError, match=r"validation split .* has 72 ids: 8 streams of 9 are too short for one "
                                          r"chunk of 16 \(\+1 for the shifted targets\)"):
        StreamLoader.of(ds, "test", 8)


# ---------------------------------------------------------------- binding to a spec

CHAR_MODEL = """
network charbag(vocab = 128) {
  input x: i64[N, T]
  input y: i64[N, T]
  logits = x -> embedding(vocab, 8) -> linear(vocab)
  output logits
  loss ce = cross_entropy(logits, y)
}
"""


def test_inputs_named_otherwise_bind_in_declaration_order(tmp_path, small_text):
    g = compile_text(tmp_path, CHAR_MODEL)
    ds = make_source("text", path=str(small_text[0]), seq=16)
    assert bind(g, ds) == {"x": "chars", "y": "next"}


def test_a_vocabulary_larger_than_the_specs_says_how_to_fix_it(tmp_path, small_text):
    g = compile_text(tmp_path, CHAR_MODEL, vocab=5)
    ds = make_source("text", path=str(small_text[0]), seq=16)
    with pytest.raises(NetdslError) as e:
        bind(g, ds)
    v = len(ds.vocab)
    assert e.value.message == (f"the text {small_text[0]} has {v} distinct characters, but input 'x' feeds "
                               f"embedding (embedding1), which takes 5")
    assert e.value.hint == f"run with --set vocab={v}"


def test_the_charlm_specs_bind_and_a_fixed_length_wins(small_text):
    g = compile_spec("rnn/charlm_lstm.net")
    ds = make_source("text", path=str(small_text[0]), seq=16)
    assert bind(g, ds) == {"chars": "chars", "next": "next"}
    g = compile_spec("rnn/charlm_gru.net", T=10)
    ds = make_source("text", path=str(small_text[0]), seq=16)
    bind(g, ds)
    assert ds.seq == 10 and ds.train["chars"].shape[1:] == (10,)
    b = next(iter(StreamLoader.of(ds, "train", 4)))
    assert b["chars"].shape == (4, 10)


def test_cli_missing_or_non_utf8_text_exits_2_without_a_traceback(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\nfine\n\xc3(")
    for data, message in ((f"text:{tmp_path}/nonexistent", f"error: text file {tmp_path}/nonexistent not found"),
                          (f"text:{bad}", f"error: {bad} is not UTF-8 text: byte offset 10 (line 3) holds c3")):
        r = cli("run", "specs/rnn/charlm_lstm.net", "--data", data, "--out", tmp_path / "run")
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert message in r.stderr, r.stderr
