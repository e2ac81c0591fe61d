"""Decoding captions one word at a time (runtime/caption.py): greedy decoding equals what
the teacher-forced network predicts from the words it chose (the scan's state handed on
correctly), attention maps come one per word, and they draw over the image."""
import numpy as np

from helpers import compile_spec
from netdsl.runtime.caption import attention_peak_in_box, attention_png, decode, decode_batch
from netdsl.runtime.model import Model

VOCAB = ["<pad>", "<start>", "<end>", "<unk>", "a", "red", "blue", "circle", "square", "left", "of"]


def small(**kw):
    kw = {"patch": False, **kw}     # (decoding does not depend on the trunk; with this seed this one says words)
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


def test_a_batch_decodes_as_its_images_one_by_one():
    m = small()
    images = np.random.default_rng(2).random((3, 3, 16, 16)).astype(np.float32)
    got = decode_batch(m, VOCAB, images, max_len=5)
    for image, (words, maps) in zip(images, got):
        w1, m1 = decode(m, VOCAB, image, max_len=5)
        assert words == w1
        np.testing.assert_allclose(maps, m1, rtol=1e-5, atol=1e-7)


def test_a_caption_that_ends_at_once_is_empty_with_no_maps():
    m = small()
    head = [k for k, v in m.params.items() if k.endswith("bias") and v.shape == (len(VOCAB),)]
    assert len(head) == 1
    m.params[head[0]][:] = -50
    m.params[head[0]][VOCAB.index("<end>")] = 50          # <end> is every image's first word
    images = np.random.default_rng(4).random((2, 3, 16, 16)).astype(np.float32)
    for words, maps in decode_batch(m, VOCAB, images, max_len=5):
        assert words == [] and maps.shape == (0, 4)


def test_attention_peak_in_box_reads_the_grid_cell_centre():
    a = np.zeros(16)
    a[6] = 1        # row 1, column 2 of a 4 x 4 grid over 32 x 32: centre (20, 12)
    assert attention_peak_in_box(a, (32, 32), [18, 10, 4, 4])
    assert not attention_peak_in_box(a, (32, 32), [21, 10, 4, 4])
    assert not attention_peak_in_box(a, (32, 32), [18, 13, 4, 4])


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


def test_predict_captions_from_the_cli(tmp_path):
    """netdsl run CAPTIONING_SPEC --predict DIR [--sample]: a caption per image, captions.json,
    and an attention sheet per image."""
    import json
    from helpers import SPECS, cli
    data, run = tmp_path / "caps", tmp_path / "run"
    r = cli("data", "shapes-captions", data, "--images", "12", "--size", "32", "--no-progress")
    assert r.returncode == 0, r.stderr
    args = ["--data", f"coco_captions:{data}", "--set", "size=32", "--set", "width=4", "--set", "H=16",
            "--set", "A=8", "--set", "embed=8", "--out", run, "--no-progress"]
    spec = SPECS / "rnn/captioning_attention_small.net"
    r = cli("run", spec, *args, "--epochs", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    images = sorted((data / "images" / "val").glob("*.png"))
    for extra in ([], ["--sample"]):
        r = cli("run", spec, *args, "--predict", data / "images" / "val", *extra)
        assert r.returncode == 0, r.stderr[-2000:]
        assert len(r.stdout.strip().splitlines()) == len(images)
        recs = json.loads((run / "predict" / "captions.json").read_text())
        assert [rec["file"] for rec in recs] == [str(p) for p in images]
        assert all((run / "predict").joinpath(p.stem + "_attention.png").exists()
                   for p, rec in zip(images, recs) if rec["caption"])
    r = cli("run", spec, *args, "--predict", tmp_path / "nothing.png")
    assert r.returncode == 2 and "no such file" in r.stderr


def _first_step_scores(m, images):
    """log of the first word's attention weights, less their mean over the locations: the
    first step scores each location from its features alone (the state starts at zero)."""
    out = m.infer({"image": images, "captions": np.ones((len(images), 2), np.int64)}, want=["alphas"])
    s = np.log(out["alphas"][:, 0].astype(np.float64))
    return s - s.mean(1, keepdims=True)


def test_patch_locations_see_only_their_own_pixels():
    """patch = true: changing one 8 x 8 cell's pixels changes that location's score and no
    other's (relative to each other); the VGG-style trunk's neighbours see them too."""
    rng = np.random.default_rng(7)
    a = rng.random((3, 32, 32)).astype(np.float32)
    b = a.copy()
    b[:, 8:16, 8:16] = rng.random((3, 8, 8))        # the cell at row 1, column 1 of the 4 x 4 grid
    others = [k for k in range(16) if k != 5]
    for patch, local in ((True, True), (False, False)):
        g = compile_spec("rnn/captioning_attention_small.net", vocab=len(VOCAB), embed=8, H=16, A=8, size=32,
                         width=4, patch=patch)
        sa, sb = _first_step_scores(Model(g, seed=5), np.stack([a, b]))
        da, db = sa[others] - sa[others].mean(), sb[others] - sb[others].mean()
        assert abs(sa[5] - sb[5]) > 1e-4
        assert np.allclose(da, db, atol=1e-5) == local
