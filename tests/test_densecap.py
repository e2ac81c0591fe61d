"""Dense captioning (specs/det/densecap.net) on region descriptions in Visual Genome's format:
`netdsl data shapes-regions` writes them; vg() reads them (and a hand-written set, VG's
own key spellings); malformed files exit 2; the small variant trains a step from the CLI,
`netdsl eval` scores its captions (the metric against a hand-computed case and against its
own regions.json), `--predict` draws regions with captions; the full-size spec keeps its
reference counts."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from helpers import cli, compile_spec
from netdsl.datasets import captions as cap
from netdsl.datasets.shapes_regions import generate
from netdsl.datasets.vg import vg
from netdsl.errors import NetdslError
from netdsl.runtime.densecap import match, region_scores

SMALL = {"size": 32, "width": 8, "stride": 8, "anchor": 8.0, "hidden": 32, "vocab": 20, "embed": 8, "H": 16,
         "rois_per_image": 8, "pre_nms": 100, "post_nms": 16, "test_nms": 8, "coordconv": "true",
         "batch_norm": "true", "dropout": 0.0, "feed_code": "true"}
SETS = [a for k, v in SMALL.items() for a in ("--set", f"{k}={v}")]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("regions") / "set"
    generate(str(out), images=12, size=32, seed=3, val_fraction=0.25)
    return out


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "densecap"
    r = cli("run", "specs/det/densecap.net", *SETS, "--data", f"vg:{data}", "--epochs", "1", "--batch", "3",
            "--lr", "1e-3", "--out", out, "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    return out


# ---------------------------------------------------------------- the data

def test_generated_set_is_visual_genome_format(data):
    described = json.loads((data / "region_descriptions.json").read_text())
    images = json.loads((data / "image_data.json").read_text())
    splits = json.loads((data / "densecap_splits.json").read_text())
    assert [d["id"] for d in described] == [im["image_id"] for im in images] == list(range(1, 13))
    assert splits == {"train": list(range(1, 10)), "val": [10, 11, 12], "test": []}
    for d, im in zip(described, images):
        assert set(im) == {"image_id", "width", "height", "url", "coco_id", "flickr_id"}
        assert Image.open(data / im["url"]).size == (32, 32)
        assert 1 <= len(d["regions"]) <= 3
        for r in d["regions"]:
            assert set(r) == {"region_id", "image_id", "phrase", "x", "y", "width", "height"}
            assert r["image_id"] == d["id"] and all(isinstance(r[k], int) for k in ("x", "y", "width", "height"))
            words = r["phrase"].split()
            assert words[0] == "a" and words[1] in ("small", "large") and words[4:] in ([], ["near", "the", "top"],
                                                                                        ["near", "the", "bottom"])
    ids = [r["region_id"] for d in described for r in d["regions"]]
    assert ids == list(range(1, len(ids) + 1))
    again = data.parent / "again"
    generate(str(again), images=12, size=32, seed=3, val_fraction=0.25)
    assert (again / "region_descriptions.json").read_bytes() == (data / "region_descriptions.json").read_bytes()
    assert (again / "images" / "5.png").read_bytes() == (data / "images" / "5.png").read_bytes()


def test_loader_reads_the_generated_set(data):
    ds = vg(str(data))
    described = {d["id"]: d["regions"] for d in json.loads((data / "region_descriptions.json").read_text())}
    assert ds.size("train") == 9 and ds.size("test") == 3
    assert ds.vocab[:4] == list(cap.SPECIALS)
    G, L = ds.max_regions, ds.max_len + 2
    assert G == 8 and ds.train["boxes"].shape == (9, G, 4) and ds.train["captions"].shape == (9, G, L)
    for split in ("train", "test"):
        arrays, meta = ds.split(split), ds.meta[split]
        for k, i in enumerate(meta["image_ids"].tolist()):
            regs = described[i]
            n = len(regs)
            assert (arrays["labels"][k, :n] == 1).all() and (arrays["labels"][k, n:] == -1).all()
            want = [[r["x"], r["y"], r["x"] + r["width"], r["y"] + r["height"]] for r in regs]
            np.testing.assert_array_equal(arrays["boxes"][k, :n], want)
            assert [cap.decode(c, ds.vocab) for c in arrays["captions"][k, :n]] == [r["phrase"] for r in regs]
            assert (arrays["captions"][k, n:] == cap.PAD).all()
    img = np.asarray(Image.open(data / "images" / "1.png").convert("RGB"), np.float32) / 255
    np.testing.assert_allclose(ds.train["image"][0], img.transpose(2, 0, 1), atol=1e-6)


def _hand_set(root, splits=True):
    """Two images of different sizes, VG v1.0's spellings (image data 'id', an http url,
    regions under 'image_id'), one region with an empty box, punctuation and case."""
    os.makedirs(root / "VG_100K")
    for i, (w, h) in ((7, (40, 20)), (9, (20, 40)), (11, (20, 20))):
        Image.fromarray(np.full((h, w, 3), 40 * i % 255, np.uint8)).save(root / "VG_100K" / f"{i}.jpg")
    (root / "image_data.json").write_text(json.dumps([
        {"id": 7, "width": 40, "height": 20, "url": "https://cs.stanford.edu/people/rak248/VG_100K/7.jpg"},
        {"id": 9, "width": 20, "height": 40, "url": "https://cs.stanford.edu/people/rak248/VG_100K/9.jpg"},
        {"id": 11, "width": 20, "height": 20, "url": "https://cs.stanford.edu/people/rak248/VG_100K/11.jpg"}]))
    (root / "region_descriptions.json").write_text(json.dumps([
        {"image_id": 7, "regions": [
            {"region_id": 1, "image_id": 7, "phrase": "A Man, riding.", "x": 4, "y": 2, "width": 10, "height": 8},
            {"region_id": 2, "image_id": 7, "phrase": "empty box", "x": 4, "y": 2, "width": 0, "height": 8},
            {"region_id": 3, "image_id": 7, "phrase": "the sky", "x": 30, "y": 0, "width": 20, "height": 5}]},
        {"image_id": 9, "regions": [
            {"region_id": 4, "image_id": 9, "phrase": "a man's hat", "x": 0, "y": 0, "width": 20, "height": 10}]},
        {"image_id": 11, "regions": [
            {"region_id": 5, "image_id": 11, "phrase": "a dog", "x": 2, "y": 2, "width": 4, "height": 4}]}]))
    if splits:
        (root / "densecap_splits.json").write_text(json.dumps({"train": [7, 9], "val": [11], "test": []}))


def test_loader_reads_a_hand_written_file(tmp_path):
    _hand_set(tmp_path)
    ds = vg(str(tmp_path), size=[10, 20])
    assert ds.vocab == [*cap.SPECIALS, "a", "hat", "man", "man's", "riding", "sky", "the"]
    assert ds.meta["train"]["skipped"] == 1
    assert ds.meta["train"]["image_ids"].tolist() == [7, 9] and ds.meta["test"]["image_ids"].tolist() == [11]
    # image 7 is 40x20 read at 20x10: boxes halve; the sky's box is clipped to the image
    np.testing.assert_allclose(ds.train["boxes"][0, :2], [[2, 1, 7, 5], [15, 0, 20, 2.5]])
    np.testing.assert_allclose(ds.train["boxes"][1, 0], [0, 0, 20, 2.5])      # 20x40 read at 20x10
    assert ds.train["captions"][0, 0].tolist()[:5] == [cap.START, 4, 6, 8, cap.END]
    assert cap.decode(ds.test["captions"][0, 0], ds.vocab) == "a <unk>"     # 'dog' is no training word
    assert ds.meta["train"]["regions"][0][0] == ((4.0, 2.0, 14.0, 10.0), "A Man, riding.")
    # no split file: the last 20% of the described images by id are held out
    other = tmp_path / "nosplit"
    _hand_set(other, splits=False)
    ds = vg(str(other), size=20, max_len=2, max_regions=1)
    assert ds.meta["train"]["image_ids"].tolist() == [7, 9] and ds.meta["test"]["image_ids"].tolist() == [11]
    assert ds.train["captions"].shape == (2, 1, 4) and len(ds.meta["train"]["regions"][0]) == 2


@pytest.mark.parametrize("case", ["missing", "not_json", "object", "phrase", "box", "unknown_image", "no_file",
                                  "split"])
def test_malformed_files_exit_2(tmp_path, case):
    _hand_set(tmp_path)
    regions = tmp_path / "region_descriptions.json"
    d = json.loads(regions.read_text())
    want = "region_descriptions.json"
    if case == "missing":
        regions.unlink()
    elif case == "not_json":
        regions.write_text("[{")
    elif case == "object":
        regions.write_text(json.dumps({"regions": []}))
    elif case == "phrase":
        d[0]["regions"][0]["phrase"] = 3
    elif case == "box":
        d[1]["regions"][0]["x"] = "left"
    elif case == "unknown_image":
        d[1]["image_id"] = 99
    elif case == "no_file":
        (tmp_path / "VG_100K" / "9.jpg").unlink()
        want = "9.jpg"
    elif case == "split":
        (tmp_path / "densecap_splits.json").write_text(json.dumps({"train": "all"}))
        want = "densecap_splits.json"
    if case in ("phrase", "box", "unknown_image"):
        regions.write_text(json.dumps(d))
    with pytest.raises(NetdslError, match=want.replace(".", r"\.")):
        vg(str(tmp_path), size=20)
    r = cli("run", "specs/det/densecap.net", *SETS, "--data", f"vg:{tmp_path}", "--epochs", "1",
            "--out", tmp_path / "run", "--no-progress")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and want in r.stderr


def test_vocabulary_larger_than_the_spec_is_named(data, tmp_path):
    r = cli("run", "specs/det/densecap.net", *SETS, "--set", "vocab=5", "--data", f"vg:{data}", "--epochs", "1",
            "--out", tmp_path / "run", "--no-progress")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--set vocab=" in r.stderr


# ---------------------------------------------------------------- training, scoring, drawing

def test_one_epoch_from_the_cli_shows_each_loss(run):
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    for name in ("rpn_cls", "rpn_box", "cls", "box", "caption"):
        assert np.isfinite(rows[-1][f"train_{name}_loss"]) and np.isfinite(rows[-1][f"test_{name}_loss"])


def test_the_default_decoder_trains_a_step_too(data, tmp_path):
    """feed_code = false (the full-size default: the code only starts the LSTM) at the small size."""
    sets = [a for k, v in {**SMALL, "feed_code": "false", "batch_norm": "false", "dropout": 0.5}.items()
            for a in ("--set", f"{k}={v}")]
    r = cli("run", "specs/det/densecap.net", *sets, "--data", f"vg:{data}", "--epochs", "1", "--batch", "3",
            "--out", tmp_path / "run", "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert np.isfinite(row["train_caption_loss"])


def test_region_metric_against_a_hand_computed_case():
    import sacrebleu
    regions = [[((0, 0, 10, 10), "a red circle"), ((20, 20, 30, 30), "A blue square.")],
               [((0, 0, 4, 4), "a small star")]]
    dets = [[{"box": [1, 1, 10, 10], "score": 0.6, "caption": "a red square"},      # IoU 0.81, lower score
             {"box": [0, 0, 10, 11], "score": 0.9, "caption": "a red circle"},      # IoU 0.91: takes region 0
             {"box": [20, 20, 29, 31], "score": 0.7, "caption": "a blue square"},   # IoU 99/110 = 0.9
             {"box": [40, 40, 50, 50], "score": 0.95, "caption": "a blue square"}],  # overlaps nothing
            [{"box": [2, 2, 6, 6], "score": 0.8, "caption": "a small star"}]]       # IoU 4/28 = 0.14 < 0.5
    assert match(dets[0], regions[0]) == [(1, 0), (2, 1)]
    got = region_scores(dets, regions)
    assert got["caption_match"] == pytest.approx(2 / 3)     # both matched captions right, of 3 regions
    assert got["localized"] == pytest.approx(2 / 3)
    bleu = sacrebleu.corpus_bleu(["a red circle", "a blue square"], [["a red circle", "a blue square"]],
                                 tokenize="none").score / 100
    assert got["bleu4"] == pytest.approx(bleu)
    assert region_scores([[], []], regions) == {"caption_match": 0.0, "localized": 0.0, "bleu4": 0.0}


def test_eval_scores_the_regions_it_wrote(run, data):
    r = cli("eval", run)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "with the right caption" in r.stdout and "Average Precision" in r.stdout
    fig = json.loads((run / "eval.json").read_text())
    written = json.loads((run / "regions.json").read_text())
    ds = vg(str(data))
    meta = ds.meta["test"]
    assert [w["image_id"] for w in written] == meta["image_ids"].tolist()
    again = region_scores([w["regions"] for w in written], meta["regions"])
    for k in ("caption_match", "localized", "bleu4"):
        assert fig[k] == pytest.approx(again[k])
    assert 0 <= fig["AP50"] <= 1 or fig["AP50"] == -1
    for w in written:
        assert all(len(d["box"]) == 4 and 0 <= d["score"] <= 1 and isinstance(d["caption"], str)
                   for d in w["regions"])


def test_predict_draws_regions_with_captions(run, data, tmp_path):
    img = tmp_path / "shapes.png"
    Image.open(data / "images" / "2.png").resize((64, 48)).save(img)
    r = cli("run", "specs/det/densecap.net", *SETS, "--data", f"vg:{data}", "--out", run, "--predict", img,
            "--score-threshold", "0")
    assert r.returncode == 0, r.stderr[-3000:]
    png = run / "predict" / "shapes.png"
    pic = Image.open(png)
    assert pic.width >= 64 * 5 and pic.height > 48 * 5       # enlarged, captions listed under it
    rec = json.loads((run / "predict" / "regions.json").read_text())[0]
    assert rec["overlay"] == str(png) and rec["regions"]
    assert all(0 <= d["box"][0] <= d["box"][2] <= 64 and 0 <= d["box"][1] <= d["box"][3] <= 48
               for d in rec["regions"])


# ---------------------------------------------------------------- the full-size spec

def test_full_size_spec_keeps_its_reference_counts():
    g = compile_spec("det/densecap.net")
    assert g.param_count() == 151_145_122           # VGG-16 trunk + RPN + fc6/fc7 + LSTM 512, vocab 10000
    assert g.inputs["image"].shape[2:] == (720, 720)
    gi = compile_spec("det/densecap.net", training=False)
    assert gi.param_count() == g.param_count()
    assert set(gi.outputs) == {"boxes", "region_scores", "regions", "caption_logits"}
    assert gi.outputs["boxes"].shape[1:] == (300, 4)
