"""`netdsl data shapes`: the files pass pycocotools' own loader, masks decode to the label
PNGs pixel for pixel (after occlusion), keypoints lie on the figures, same seed same bytes."""
import json
import os

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as cmask
from pycocotools.coco import COCO

from helpers import cli
from netdsl.datasets import draw
from netdsl.datasets.shapes import generate
from netdsl.errors import NetdslError

SIZE = 48


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes") / "set"
    generate(str(out), images=40, size=SIZE, seed=3, val_fraction=0.25)
    return out


def load(path):
    """pycocotools' own loader, as any COCO user would call it (it prints progress)."""
    return COCO(str(path))


def files(root):
    return {os.path.relpath(os.path.join(d, f), root): os.path.join(d, f)
            for d, _, fs in os.walk(root) for f in fs}


def test_layout_and_pycocotools_loader(data):
    for split, n in (("train", 30), ("val", 10)):
        for root, stem in (("", "instances"), ("single", "instances"), ("pose", "person_keypoints")):
            c = load(data / root / "annotations" / f"{stem}_{split}.json")
            assert len(c.getImgIds()) == n
            for im in c.loadImgs(c.getImgIds()):
                with Image.open(data / root / "images" / split / im["file_name"]) as f:
                    assert f.size == (im["width"], im["height"]) == (SIZE, SIZE) and f.mode == "RGB"
        assert len(os.listdir(data / "labels" / split)) == n
    shapes = load(data / "annotations" / "instances_train.json")
    assert [c["name"] for c in shapes.loadCats(shapes.getCatIds())] == ["circle", "square", "triangle", "star"]
    person = load(data / "pose" / "annotations" / "person_keypoints_train.json").loadCats(1)[0]
    assert person["keypoints"] == list(draw.JOINTS) and len(person["keypoints"]) == 14
    assert {"head", "neck", "left_elbow", "right_ankle"} <= set(person["keypoints"])
    assert all(1 <= j <= 14 for pair in person["skeleton"] for j in pair)
    for name in ("shapes", "single", "pose"):
        with Image.open(data / "preview" / f"{name}.png") as f:
            assert f.size[0] >= 4 * SIZE
    manifest = json.loads((data / "dataset.json").read_text())
    assert manifest["seed"] == 3 and set(manifest["sets"]) == {"shapes", "single", "pose"}
    assert not [p for p in os.listdir(data.parent) if p.endswith((".tmp", ".old"))]


def test_masks_decode_to_the_label_pngs(data):
    kinds = {"polygon": 0, "rle": 0}
    for split in ("train", "val"):
        c = load(data / "annotations" / f"instances_{split}.json")
        for image_id in c.getImgIds():
            im = c.loadImgs(image_id)[0]
            png = np.asarray(Image.open(data / "labels" / split / im["file_name"]))
            painted = np.zeros_like(png)
            covered = np.zeros(png.shape, int)
            anns = c.loadAnns(c.getAnnIds(imgIds=image_id))
            assert 1 <= len(anns) <= 4
            for a in anns:
                m = c.annToMask(a).astype(bool)     # polygon or RLE, decoded by pycocotools
                kinds["polygon" if isinstance(a["segmentation"], list) else "rle"] += 1
                assert a["area"] == m.sum() > 0 and a["iscrowd"] == 0
                ys, xs = np.nonzero(m)
                assert a["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
                painted[m] = a["category_id"]
                covered += m
            # visible masks are disjoint and together are exactly the labelled pixels
            assert covered.max() == 1
            np.testing.assert_array_equal(painted, png)
    assert kinds["polygon"] and kinds["rle"]        # some shapes were partly hidden


def test_a_hidden_part_has_a_later_shape_over_it(data):
    c = load(data / "annotations" / "instances_train.json")
    for image_id in c.getImgIds():
        anns = c.loadAnns(c.getAnnIds(imgIds=image_id))
        for i, a in enumerate(anns):
            if isinstance(a["segmentation"], dict):
                assert a["segmentation"]["size"] == [SIZE, SIZE] and isinstance(a["segmentation"]["counts"], list)
                x, y, w, h = a["bbox"]
                assert any(b["bbox"][0] < x + w + 1 and x < b["bbox"][0] + b["bbox"][2] + 1 and
                           b["bbox"][1] < y + h + 1 and y < b["bbox"][1] + b["bbox"][3] + 1 for b in anns[i + 1:])


def test_single_object_sets_hold_one_polygon_each(data):
    for split in ("train", "val"):
        c = load(data / "single" / "annotations" / f"instances_{split}.json")
        for image_id in c.getImgIds():
            (a,) = c.loadAnns(c.getAnnIds(imgIds=image_id))
            assert isinstance(a["segmentation"], list)
            assert c.annToMask(a).sum() == a["area"]


def test_keypoints_land_on_the_drawn_figures(data):
    for split in ("train", "val"):
        c = load(data / "pose" / "annotations" / f"person_keypoints_{split}.json")
        for image_id in c.getImgIds():
            (a,) = c.loadAnns(c.getAnnIds(imgIds=image_id))
            kp = np.reshape(a["keypoints"], (14, 3))
            assert a["num_keypoints"] == 14 and (kp[:, 2] == 2).all()
            fig = c.annToMask(a).astype(bool)
            cols, rows = np.floor(kp[:, 0]).astype(int), np.floor(kp[:, 1]).astype(int)
            assert fig[rows, cols].all()
            img = np.asarray(Image.open(data / "pose" / "images" / split / c.loadImgs(image_id)[0]["file_name"]),
                             np.float64)
            figure_colour = np.median(img[fig], 0)
            assert (np.abs(img[rows, cols] - figure_colour).max(1) < 48).all()


def test_same_seed_same_bytes(tmp_path):
    generate(str(tmp_path / "a"), images=6, size=32, seed=11)
    generate(str(tmp_path / "b"), images=6, size=32, seed=11)
    generate(str(tmp_path / "c"), images=6, size=32, seed=12)
    a, b, c = (files(tmp_path / n) for n in "abc")
    assert a.keys() == b.keys() == c.keys()
    for k in a:
        with open(a[k], "rb") as f, open(b[k], "rb") as g:
            assert f.read() == g.read(), k
    with open(a["images/train/000001.png"], "rb") as f, open(c["images/train/000001.png"], "rb") as g:
        assert f.read() != g.read()


def test_regenerating_replaces_only_its_own_sets(tmp_path):
    out = tmp_path / "set"
    generate(str(out), images=4, size=32, seed=0)
    generate(str(out), images=6, size=32, seed=0)      # a set this command wrote: replaced
    assert len(os.listdir(out / "images" / "train")) + len(os.listdir(out / "images" / "val")) == 6
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(NetdslError, match="not empty"):
        generate(str(foreign), images=4, size=32)
    assert os.listdir(foreign) == ["notes.txt"]
    assert sorted(os.listdir(tmp_path)) == ["mine", "set"]


@pytest.mark.parametrize("kwargs, message", [
    ({"images": 1}, "--images must be an integer from 2"),
    ({"size": 8}, "--size must be an integer from 32"),
    ({"val_fraction": 1.0}, "--val-fraction must be between 0 and 1"),
    ({"seed": -1}, "--seed must be 0 or more"),
])
def test_bad_options(tmp_path, kwargs, message):
    with pytest.raises(NetdslError, match=message):
        generate(str(tmp_path / "x"), **kwargs)
    assert not os.path.exists(tmp_path / "x")


def test_cli(tmp_path):
    r = cli("data", "shapes", tmp_path / "d", "--images", 8, "--size", 32, "--seed", 1, "--val-fraction", 0.5)
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and "8/8" not in r.stdout
    assert "shapes" in r.stderr and "24/24" in r.stderr          # the progress bar, on stderr
    assert len(os.listdir(tmp_path / "d" / "images" / "val")) == 4
    for args, message in (
            (("--size", "8"), "--size must be an integer from 32 to 1,024, got 8"),
            (("--images", "many"), "argument --images: invalid int value: 'many'"),
            (("--val-fraction", "2"), "--val-fraction must be between 0 and 1"),
            (("--colour", "red"), "unrecognized arguments: --colour red")):
        r = cli("data", "shapes", tmp_path / "e", *args)
        assert r.returncode == 2 and message in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    r = cli("data", "shapes", tmp_path / "d" / "images", "--no-progress")
    assert r.returncode == 2 and "not empty" in r.stderr and r.stderr.count("\n") <= 3


def test_rle_counts_match_pycocotools():
    rng = np.random.default_rng(0)
    for h, w in ((1, 1), (3, 5), (17, 9)):
        for p in (0.0, 0.3, 1.0):
            m = rng.random((h, w)) < p
            rle = cmask.frPyObjects(draw.rle_counts(m), h, w)
            np.testing.assert_array_equal(cmask.decode(rle).astype(bool), m)
