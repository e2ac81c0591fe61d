"""Decoding captions one word at a time (runtime/caption.py): greedy decoding equals what
the teacher-forced network predicts from the words it chose (the scan's state handed on
correctly), attention maps come one per word, and they draw over the image."""
import numpy as np

from helpers import compile_spec
from netdsl.runtime.caption import attention_png, decode
from netdsl.runtime.model import Model

VOCAB = ["<pad>", "<start>", "<end>", "<unk>", "a", "red", "blue", "circle", "square", "left", "of"]


def small(**kw):
    g = compile_spec("rnn/captioning_attention_small.net", vocab=len(VOCAB), embed=8, H=16, A=8, size=16, width=4,
                     **kw)
    return Model(g, seed=5)


def test_greedy_words_are_the_argmax_of_the_teacher_forced_run():
    m = small()
    image = np.random.default_rng(0).random((3, 16, 16)).astype(np.float32)
    words, maps = decode(m, VOCAB, image, max_len=6)
    assert 0 < len(words) <= 7 and maps.shape == (len(words), 4)     # 16 / 8 = 2: 2 x 2 locations
    np.testing.assert_allclose(maps.sum(1), 1, rtol=1e-5)
    ids = [1] + [VOCAB.index(w) for w in words]
    out = m.infer({"image": image[None], "captions": np.array([ids + [0]])}, want=["logits", "alphas"])
    chosen = out["logits"][0].argmax(-1)[:len(words)]
    assert [VOCAB[i] for i in chosen] == words
    np.testing.assert_allclose(out["alphas"][0, :len(words)], maps, rtol=1e-5, atol=1e-7)


def test_sampling_is_seeded_and_the_attention_sheet_is_drawn(tmp_path):
    m = small()
    image = np.random.default_rng(1).random((3, 16, 16)).astype(np.float32)
    a = decode(m, VOCAB, image, max_len=5, sample=True, seed=3)
    b = decode(m, VOCAB, image, max_len=5, sample=True, seed=3)
    assert a[0] == b[0]
    words, maps = decode(m, VOCAB, image, max_len=4)
    if not words:       # random weights may end at once; draw a made-up word's map then
        words, maps = ["a"], np.full((1, 4), 0.25, np.float32)
    attention_png(tmp_path / "att.png", image, words, maps)
    from PIL import Image
    im = Image.open(tmp_path / "att.png")
    assert im.height > 16 and im.width >= len(words) * 16
