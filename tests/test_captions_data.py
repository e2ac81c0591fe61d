"""Captioning data: `netdsl data shapes-captions` writes COCO captions (and instances) that
pycocotools loads, whose captions are true of the pixels; the same seed writes the same
bytes. coco_captions() reads any such set (a hand-written one too): tokens, vocabulary,
padding, <unk>. BLEU-4 of caption_scores against sacrebleu called directly and against
hand-computed values. (Training on it: test_captions_train.py.)"""
import colorsys
import json
import os

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from helpers import cli
from netdsl.datasets import captions as cap
from netdsl.datasets.shapes_captions import COLOURS, generate
from netdsl.errors import NetdslError

SIZE = 32


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("captions") / "set"
    generate(str(out), images=40, size=SIZE, seed=5, val_fraction=0.25)
    return out


def files(root):
    return {os.path.relpath(os.path.join(d, f), root): os.path.join(d, f)
            for d, _, fs in os.walk(root) for f in fs}


def hue_of(rgb) -> float:
    return colorsys.rgb_to_hsv(*(np.asarray(rgb) / 255))[0] * 360


# ---------------------------------------------------------------- the generated set

def test_files_load_with_pycocotools_and_captions_are_true_of_the_pixels(data):
    relations = {"left of": 0, "right of": 0, "above": 0, "below": 0}
    singles = 0
    for split, n in (("train", 30), ("val", 10)):
        caps = COCO(str(data / "annotations" / f"captions_{split}.json"))
        inst = COCO(str(data / "annotations" / f"instances_{split}.json"))
        assert sorted(caps.getImgIds()) == sorted(inst.getImgIds()) == list(range(1, n + 1))
        for image_id in caps.getImgIds():
            info = caps.loadImgs(image_id)[0]
            pixels = np.asarray(Image.open(data / "images" / split / info["file_name"]))
            assert pixels.shape == (SIZE, SIZE, 3)
            objects = {a["id"]: a for a in inst.loadAnns(inst.getAnnIds(imgIds=image_id))}
            texts = caps.loadAnns(caps.getAnnIds(imgIds=image_id))
            assert len(objects) in (1, 2) and len(texts) == len(objects)
            for a in objects.values():
                m = inst.annToMask(a).astype(bool)
                # the named colour is the one painted (hue within the generator's jitter and shading)
                d = abs(hue_of(pixels[m].mean(0)) - COLOURS[a["colour"]])
                assert min(d, 360 - d) < 20, (a, hue_of(pixels[m].mean(0)))
            for t in texts:
                words = cap.tokenize(t["caption"])
                assert " ".join(words) == t["caption"]
                for w, obj in t["grounding"]:
                    a = objects[obj]
                    assert words[w] in (a["colour"], inst.cats[a["category_id"]]["name"])
                if len(objects) == 1:
                    singles += 1
                    assert len(words) == 3
                    continue
                first, second = (objects[obj] for _, obj in t["grounding"][::2])
                rel = " ".join(words[3:-3])
                relations[rel] += 1
                x, y, w, h = first["bbox"]
                x2, y2, w2, h2 = second["bbox"]
                # the relation holds of the boxes, with a gap, not just of the centres
                ok = {"left of": x + w <= x2, "right of": x2 + w2 <= x, "above": y + h <= y2, "below": y2 + h2 <= y}
                assert ok[rel], (t, first["bbox"], second["bbox"])
            if len(texts) == 2:     # the second reference is the converse of the first
                a, b = (cap.tokenize(t["caption"]) for t in texts)
                assert a[:3] == b[-3:] and a[-3:] == b[:3]
    assert singles and all(relations.values()), relations


def test_same_seed_same_bytes_and_the_set_is_replaced_whole(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, seed in ((a, 1), (b, 1), (c, 2)):
        generate(str(out), images=6, size=SIZE, seed=seed)
    fa, fb = files(a), files(b)
    assert fa.keys() == fb.keys() and len(fa) > 10
    for k in fa:
        with open(fa[k], "rb") as x, open(fb[k], "rb") as y:
            assert x.read() == y.read(), k
    assert (a / "annotations/captions_train.json").read_bytes() != (c / "annotations/captions_train.json").read_bytes()
    generate(str(a), images=4, size=SIZE, seed=1)      # ours: replaced, not merged
    assert len(os.listdir(a / "images" / "train")) == 3
    assert not [p for p in os.listdir(tmp_path) if p.endswith((".tmp", ".old"))]
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "x.txt").write_text("mine")
    with pytest.raises(NetdslError, match="not written by `netdsl data shapes-captions`"):
        generate(str(tmp_path / "foreign"), images=4, size=SIZE)
    from netdsl.datasets.shapes import generate as shapes
    shapes(str(tmp_path / "s"), images=2, size=SIZE)
    with pytest.raises(NetdslError, match="not written by"):
        generate(str(tmp_path / "s"), images=4, size=SIZE)    # a `data shapes` set is not ours to replace


def test_cli_progress_preview_and_bad_options(tmp_path):
    out = tmp_path / "cap"
    r = cli("data", "shapes-captions", out, "--images", "5", "--size", SIZE, "--seed", "2")
    assert r.returncode == 0, r.stderr
    assert "5/5" in r.stderr and "captions_train.json" in r.stdout
    with Image.open(out / "preview" / "captions.png") as f:
        assert f.size[0] > 4 * SIZE
    m = json.loads((out / "dataset.json").read_text())
    assert m["generator"] == "netdsl data shapes-captions" and m["seed"] == 2
    for args, message in ((("--images", "1"), "--images must be an integer from 2"),
                          (("--size", "8"), "--size must be an integer from 32"),
                          (("--seed", "-1"), "--seed must be 0 or more")):
        r = cli("data", "shapes-captions", tmp_path / "bad", *args, "--no-progress")
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
        assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------- tokens and vocabulary

def test_tokenize():
    assert cap.tokenize("A man's dog, riding... the WAVE!") == ["a", "man's", "dog", "riding", "the", "wave"]
    assert cap.tokenize("Café crème\tat 10am; don't") == ["café", "crème", "at", "10am", "don't"]
    assert cap.tokenize("snake_case 'quoted'") == ["snake", "case", "quoted"]
    assert cap.tokenize(" ,.; ") == []


def test_vocabulary_encode_decode_round_trip():
    sents = [cap.tokenize(s) for s in ("a red circle", "a blue square left of a red circle", "a red star")]
    vocab = cap.vocabulary(sents)
    assert vocab[:8] == ["<pad>", "<start>", "<end>", "<unk>", "a", "red", "circle", "blue"]   # by count, then a-z
    assert (cap.PAD, cap.START, cap.END, cap.UNK) == (0, 1, 2, 3)
    assert cap.vocabulary(sents, min_count=2) == ["<pad>", "<start>", "<end>", "<unk>", "a", "red", "circle"]
    index = {w: i for i, w in enumerate(vocab)}
    ids = cap.encode(sents[1], index, 12)
    assert ids.dtype == np.int64 and ids.tolist() == [1, 4, 7, 10, 8, 9, 4, 5, 6, 2, 0, 0]
    assert cap.decode(ids, vocab) == "a blue square left of a red circle"
    assert cap.decode([5, 6, 2, 7], vocab) == "red circle"          # greedy output: no <start>, stops at <end>
    assert cap.encode(["a", "green", "circle"], index, 5).tolist() == [1, 4, 3, 6, 2]      # unknown -> <unk>
    assert cap.encode(sents[1], index, 5).tolist() == [1, 4, 7, 10, 2]                     # cut, <end> kept
    with pytest.raises(NetdslError, match="id 19 is outside the vocabulary of 12 words"):
        cap.decode([4, 19], vocab)


# ---------------------------------------------------------------- coco_captions

def test_reader_on_the_generated_set(data):
    ds = cap.coco_captions(str(data))
    c = COCO(str(data / "annotations" / "captions_train.json"))
    assert ds.size("train") == len(c.anns) and set(ds.train) == {"image", "captions"}
    img, ids = ds.train["image"], ds.train["captions"]
    assert img.dtype == np.float32 and img.shape[1:] == (3, SIZE, SIZE) and 0 <= img.min() and img.max() <= 1
    longest = max(len(cap.tokenize(a["caption"])) for f in ("train", "val")
                  for a in COCO(str(data / "annotations" / f"captions_{f}.json")).anns.values())
    assert ds.max_len == longest and ids.shape[1] == longest + 2 and ids.dtype == np.int64
    assert ds.vocab[:4] == list(cap.SPECIALS) and len(ds.vocab) == 4 + 1 + 5 + 4 + 5
    assert (ids[:, 0] == cap.START).all()
    for k, image_id in enumerate(ds.meta["train"]["image_ids"].tolist()):
        row = ids[k].tolist()
        end = row.index(cap.END)
        assert all(i == cap.PAD for i in row[end + 1:]) and cap.PAD not in row[:end]
        assert cap.decode(row, ds.vocab) in ds.meta["train"]["references"][image_id]
        png = np.asarray(Image.open(data / "images" / "train" / c.imgs[image_id]["file_name"]), np.float32)
        np.testing.assert_allclose(img[k], png.transpose(2, 0, 1) / 255, rtol=0, atol=1e-7)
    first, refs = ds.per_image("test")
    assert len(first) == len(refs) == 10
    assert all(cap.decode(ds.test["captions"][i], ds.vocab) in r for i, r in zip(first, refs))


def write_set(root, splits):
    """A user's own COCO captions set, COCO 2017's layout: root/{split}/ images, any sizes."""
    os.makedirs(root / "annotations", exist_ok=True)
    rng = np.random.default_rng(0)
    for split, items in splits.items():
        os.makedirs(root / split, exist_ok=True)
        d = {"images": [], "annotations": []}
        for k, (wh, texts) in enumerate(items):
            name = f"p{k}.jpg"
            Image.fromarray(rng.integers(0, 256, (wh[1], wh[0], 3), dtype=np.uint8)).save(root / split / name)
            d["images"].append({"id": 100 + k, "file_name": name, "width": wh[0], "height": wh[1]})
            for t in texts:
                d["annotations"].append({"id": 1000 + len(d["annotations"]), "image_id": 100 + k, "caption": t})
        (root / "annotations" / f"captions_{split}.json").write_text(json.dumps(d))


def test_reader_on_a_users_own_set(tmp_path):
    write_set(tmp_path, {"train2017": [((40, 30), ["A dog runs.", "The dog is running!"]),
                                       ((20, 20), ["A cat sleeps", "a cat", "a sleeping cat"]),
                                       ((20, 20), [])],
                         "val2017": [((50, 50), ["A zebra runs", "a dog"])]})
    ds = cap.coco_captions(str(tmp_path), size=[16, 24], train="train2017", test="val2017")
    assert ds.size("train") == 5 and ds.size("test") == 2      # the image without captions gives nothing
    assert ds.train["image"].shape == (5, 3, 16, 24)
    assert ds.vocab == ["<pad>", "<start>", "<end>", "<unk>", "a", "cat", "dog", "is", "running", "runs", "sleeping",
                        "sleeps", "the"]
    assert ds.meta["train"]["image_ids"].tolist() == [100, 100, 101, 101, 101]
    np.testing.assert_array_equal(ds.train["image"][0], ds.train["image"][1])
    assert cap.decode(ds.test["captions"][0], ds.vocab) == "a <unk> runs"
    assert ds.test["captions"].shape[1] == 6 == ds.max_len + 2       # "the dog is running" + 2
    short = cap.coco_captions(str(tmp_path), size=8, max_len=2, min_count=2, train="train2017", test="val2017")
    assert short.vocab == ["<pad>", "<start>", "<end>", "<unk>", "a", "cat", "dog"]
    assert short.train["captions"][1].tolist() == [1, 3, 6, 2] and short.train["image"].shape[2:] == (8, 8)


def test_reader_errors(tmp_path, data):
    def fails(message, path=tmp_path, **kw):
        with pytest.raises(NetdslError, match=message):
            cap.coco_captions(str(path), **kw)
    fails("directory .* not found", tmp_path / "nope")
    fails("max_len must be an integer of at least 0", data, max_len=-1)
    fails("coco_captions: size must be", data, size=-3)
    fails(r"captions_train.json not found", tmp_path)
    write_set(tmp_path, {"train": [((20, 20), ["a dog"]), ((30, 20), ["a cat"])], "val": [((20, 20), ["a dog"])]})
    fails("coco_captions: the images differ in size")
    ann = tmp_path / "annotations" / "captions_val.json"
    for text, message in (("[1, 2]", "the top level is list"),
                          ('{"images": []}', "no 'annotations' list"),
                          ('{"images": [], "annotations": {}}', "'annotations' is dict"),
                          ('{"images": [{"id": 1, "file_name": "p0.jpg", "width": 20, "height": 20}], '
                           '"annotations": [{"id": 1, "image_id": 2, "caption": "x"}]}', "image_id 2 is not an image"),
                          ('{"images": [{"id": 1, "file_name": "p0.jpg", "width": 20, "height": 20}], '
                           '"annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1]}]}',
                           "'caption' must be a string"),
                          ('{"images": [{"id": 1, "file_name": "p0.jpg", "width": 20, "height": 20}], '
                           '"annotations": [{"id": 1, "image_id": 1, "caption": " ... "}]}', "has no words"),
                          ('{"images": [{"id": 1, "file_name": "/etc/p", "width": 20, "height": 20}], '
                           '"annotations": []}', "'file_name' must be a path relative"),
                          ('{"images": [], "annotations": []}', "holds no captions"),
                          ("{", "is not JSON")):
        ann.write_text(text)
        fails(message, size=8)
    ann.write_text('{"images": [{"id": 1, "file_name": "gone.jpg", "width": 20, "height": 20}], '
                   '"annotations": [{"id": 1, "image_id": 1, "caption": "a dog"}]}')
    fails("gone.jpg does not exist", size=8)


# ---------------------------------------------------------------- scores

def test_caption_scores_hand_computed():
    ref = "a red circle left of a blue square"
    # 1- to 4-gram precisions 7/8, 5/7, 4/6, 3/5, same length: BLEU = (1/4) ** (1/4)
    s = cap.caption_scores(["a red circle left of a blue square".replace("blue", "green")], [[ref]])
    assert s["bleu4"] == pytest.approx(0.25 ** 0.25, abs=1e-6) and s["exact_match"] == 0
    # every n-gram matches, 6 words against 8: the brevity penalty exp(1 - 8/6)
    s = cap.caption_scores(["a red circle left of a"], [[ref]])
    assert s["bleu4"] == pytest.approx(np.exp(1 - 8 / 6), abs=1e-6)
    # case and punctuation do not count; any reference may match
    s = cap.caption_scores(["A blue square, right of a red circle.", "a red star"],
                           [[ref, "a blue square right of a red circle"], ["a red star"]])
    assert s == {"bleu4": pytest.approx(1.0), "exact_match": 1.0}
    assert cap.caption_scores(["a red star", "a red"], [["a red star"], ["a blue star"]])["exact_match"] == 0.5


def test_caption_scores_equal_sacrebleu_called_directly():
    import sacrebleu
    rng = np.random.default_rng(0)
    words = ["a", "red", "blue", "circle", "square", "left", "of", "above", "star"]
    hyps, refs = [], []
    for _ in range(40):
        hyps.append(" ".join(rng.choice(words, rng.integers(1, 9))))
        refs.append([" ".join(rng.choice(words, rng.integers(2, 9))) for _ in range(rng.integers(1, 4))])
    streams = [[r[j] if j < len(r) else None for r in refs] for j in range(3)]
    want = sacrebleu.corpus_bleu(hyps, streams).score / 100        # its default 13a tokenizer and smoothing
    got = cap.caption_scores(hyps, refs)
    assert 0 < want < 1 and got["bleu4"] == pytest.approx(want, abs=1e-12)
    assert got["exact_match"] == sum(h in r for h, r in zip(hyps, refs)) / 40


def test_caption_scores_errors():
    for hyps, refs, message in (([], [], "no hypotheses"), (["a"], [], "1 hypotheses but 0 reference lists"),
                                (["a"], ["a"], "must be a non-empty list of strings"),
                                (["a"], [[]], "must be a non-empty list"), ([3], [["a"]], "hypothesis 0 is int")):
        with pytest.raises(NetdslError, match=message):
            cap.caption_scores(hyps, refs)
