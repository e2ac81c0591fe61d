"""Selective search (netdsl/datasets/proposals.py) and its cache (proposal_cache.py):
valid boxes, a seed's determinism, the hierarchy's merges on hand-made regions, recall
against the generated shapes' ground truth, the cache's round trip and refusals, and
`netdsl data proposals` end to end."""
import io
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from helpers import cli
from netdsl.datasets import proposal_cache as pc
from netdsl.datasets.proposals import adjacent_pairs, group, selective_search, strategies_of
from netdsl.datasets.shapes import generate, shapes_scene
from netdsl.errors import NetdslError


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("ss") / "shapes"
    generate(str(out), images=24, size=64, seed=5, val_fraction=0.25)
    return out


def scene(seed=0, size=64):
    return shapes_scene(np.random.default_rng(seed), size)[0]


def check_boxes(b, w, h):
    assert b.dtype == np.float32 and b.ndim == 2 and b.shape[1] == 4 and len(b) >= 1
    assert (b == np.round(b)).all()                       # region boxes lie on pixel edges
    assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
    assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
    assert len(np.unique(b, axis=0)) == len(b)            # duplicates dropped


def test_boxes_are_valid_and_within_the_image():
    rng = np.random.default_rng(1)
    for img in (scene(0), scene(1, 80)[:, 7:], rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)):
        h, w = img.shape[:2]
        b = selective_search(img)
        check_boxes(b, w, h)
        assert [0, 0, w, h] in b.tolist()                 # the last merge covers the image
        assert len(b) <= 2000
        short = selective_search(img, max_boxes=7)
        assert short.tolist() == b[:7].tolist()           # max_boxes keeps the best of the same ranking
        same = selective_search(img / 255.0)
        np.testing.assert_array_equal(same, b)            # uint8 and float in [0, 1] are one image
    quality = selective_search(scene(2), strategies="quality")
    check_boxes(quality, 64, 64)
    assert len(quality) > len(selective_search(scene(2)))


def test_deterministic_for_a_seed():
    img = scene(3)
    a, b = selective_search(img, seed=4), selective_search(img, seed=4)
    np.testing.assert_array_equal(a, b)
    c = selective_search(img, seed=5)
    assert a.tolist() != c.tolist()                                   # another ranking...
    assert sorted(map(tuple, a.tolist())) == sorted(map(tuple, c.tolist()))   # ...of the same boxes


def test_two_regions_merge_into_their_union():
    img = np.zeros((30, 50, 3), np.uint8)
    img[:, 20:] = (220, 30, 30)
    for strategies in ("fast", "single", "lab:f", "i:s"):
        b = selective_search(img, strategies=strategies)
        assert sorted(b.tolist()) == [[0, 0, 20, 30], [0, 0, 50, 30], [20, 0, 50, 30]], strategies


def regions(labels):
    """(pairs, size, box) of a hand-made label map, as Regions makes them."""
    labels = np.asarray(labels)
    r = labels.max() + 1
    ys, xs = np.mgrid[:labels.shape[0], :labels.shape[1]]
    box = np.array([[xs[labels == i].min(), ys[labels == i].min(), xs[labels == i].max() + 1,
                     ys[labels == i].max() + 1] for i in range(r)], np.int64)
    return adjacent_pairs(labels), np.bincount(labels.ravel()).astype(float), box


def test_grouping_merges_the_most_similar_neighbours_only():
    # regions 0 | 1 | 2 in a row: 0 and 2 are the most alike but do not touch, so the
    # first merge takes 1 with whichever neighbour is more like it; then the rest
    pairs, size, box = regions([[0, 0, 1, 1, 2, 2]] * 2)
    assert pairs.tolist() == [[0, 1], [1, 2]]
    colour = np.array([[1, 0, 0], [0, 0.2, 0.8], [0.9, 0.1, 0]])
    made = group(pairs, size, box, colour, None, "c", 12.0)
    assert made.tolist() == box.tolist() + [[2, 0, 6, 2], [0, 0, 6, 2]]
    colour[1] = [0.95, 0, 0.05]
    made = group(pairs, size, box, colour, None, "c", 12.0)
    assert made.tolist() == box.tolist() + [[0, 0, 4, 2], [0, 0, 6, 2]]
    # texture the same way
    assert group(pairs, size, box, None, colour, "t", 12.0).tolist()[3] == [0, 0, 4, 2]


def test_size_and_fill_terms():
    # size: the two small regions merge before either joins the large one
    labels = np.array([[0] * 6 + [1, 2]] * 2)
    pairs, size, box = regions(labels)
    assert group(pairs, size, box, None, None, "s", 16.0).tolist()[3] == [6, 0, 8, 2]
    # fill: an L of regions; 0 (top row) and 1 (left column below it) fill their box less
    # well than 1 and 2 (the rest of the square), so 1 and 2 merge first
    labels = np.array([[0, 0, 0], [1, 2, 2], [1, 2, 2]])
    pairs, size, box = regions(labels)
    assert group(pairs, size, box, None, None, "f", 9.0).tolist()[3] == [0, 1, 3, 3]


def ground_truth(root, split):
    d = json.loads((root / "annotations" / f"instances_{split}.json").read_text())
    gt = {}
    for a in d["annotations"]:
        x, y, w, h = a["bbox"]
        gt.setdefault(a["image_id"], []).append([x, y, x + w, y + h])
    return d["images"], gt


def test_recall_on_generated_shapes(data):
    hits, total, hits100 = 0, 0, 0
    for split in ("train", "val"):
        images, gt = ground_truth(data, split)
        for im in images:
            img = np.asarray(Image.open(data / "images" / split / im["file_name"]).convert("RGB"))
            b = selective_search(img).astype(np.float64)
            check_boxes(b.astype(np.float32), 64, 64)
            g = np.array(gt[im["id"]], np.float64)
            total += len(g)
            hits += int((pc.box_iou(g, b).max(1) >= 0.5).sum())
            hits100 += int((pc.box_iou(g, b[:100]).max(1) >= 0.5).sum())
    assert total >= 40
    assert hits / total >= 0.9 and hits100 / total >= 0.9, (hits, hits100, total)


def test_box_iou_is_torchvisions():
    """The IoU that recall is measured with: torchvision.ops.box_iou (via tests/tvref.py)."""
    import tvref
    tv = tvref.load()
    if tv is None:
        pytest.skip(tvref.SKIP_REASON)
    import torch
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 50, (2, 40, 2))
    a, b = (np.concatenate([p, p + rng.uniform(1, 30, (40, 2))], 1) for p in xy)
    want = tv.boxes.box_iou(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    np.testing.assert_allclose(pc.box_iou(a, b), want, rtol=1e-12, atol=1e-15)
    # an empty box overlaps nothing (torchvision's 0 / 0 would be NaN)
    assert (pc.box_iou(np.zeros((1, 4)), np.zeros((1, 4))) == 0).all()


def test_bad_inputs_are_clear_errors():
    img = scene(0)
    for bad, what in ((img[..., 0], "[H, W, 3]"), (img.astype(np.int32), "uint8"), (img * 1.0, "[0, 1]"),
                      (np.full((1, 5, 3), 9, np.uint8), "2 x 2")):
        with pytest.raises(NetdslError, match=re.escape(what)):
            selective_search(bad)
    for kw, what in ((dict(max_boxes=0), "max_boxes"), (dict(seed=-1), "seed"), (dict(k=0), "k must"),
                     (dict(strategies="hsv"), "unknown strategies"), (dict(strategies="hsv:cx"), "letters"),
                     (dict(strategies="xyz:c"), "colour space"), (dict(strategies="hsv:c:-1"), "positive")):
        with pytest.raises(NetdslError, match=what):
            selective_search(img, **kw)
    assert [str(s) for s in strategies_of("hsv:ct,lab:f:25", k=(10, 20.5))] == \
        ["hsv:ct:10", "hsv:ct:20.5", "lab:f:25"]
    assert len(strategies_of("quality")) == 80 and len(strategies_of("fast")) == 8


def test_cli_writes_a_cache_that_round_trips(data):
    r = cli("data", "proposals", data, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "selective_search_train.npz: 18 images" in r.stdout and "selective_search_val.npz: 6 images" in r.stdout
    assert "recall" in r.stdout
    assert not [f for f in os.listdir(data / "proposals") if f.endswith(".tmp")]
    with np.load(data / "proposals" / "selective_search_val.npz", allow_pickle=False) as z:
        assert set(z.files) == {"format", "version", "params", "image_ids", "offsets", "boxes", "digest"}
        assert all(z[f].dtype != object for f in z.files)
    p = pc.load_proposals(data, "val", max_boxes=2000, seed=0, strategies="fast")
    images, _ = ground_truth(data, "val")
    assert p.image_ids.tolist() == [im["id"] for im in images]
    assert p.params["strategies"] == [str(s) for s in strategies_of("fast")]
    assert p.params["max_boxes"] == 2000 and p.params["split"] == "val"
    for im in images:
        img = np.asarray(Image.open(data / "images" / "val" / im["file_name"]).convert("RGB"))
        np.testing.assert_array_equal(p.boxes_of(im["id"]), selective_search(img))
    boxes, counts = p.padded(max_boxes=50)
    assert boxes.shape == (6, 50, 4) and boxes.dtype == np.float32
    for n, im in enumerate(images):
        own = p.boxes_of(im["id"])
        assert counts[n] == min(50, len(own))
        np.testing.assert_array_equal(boxes[n, :counts[n]], own[:50])
        assert (boxes[n, counts[n]:] == 0).all()          # padding: empty boxes
    assert pc.load_proposals(data, "train").image_ids.size == 18
    # fewer boxes than the cache holds are served from it; other parameters are refused
    pc.load_proposals(data, "val", max_boxes=100)
    for kw, what in ((dict(seed=1), "made with seed 0, not 1"), (dict(max_boxes=5000), "at most 2000"),
                     (dict(k=(25,)), "made with strategies")):
        with pytest.raises(NetdslError, match=what) as e:
            pc.load_proposals(data, "val", **kw)
        assert "netdsl data proposals" in e.value.hint
    # a cut at 100 boxes with another seed: the command's options reach the file
    r = cli("data", "proposals", data, "--split", "val", "--max-boxes", "100", "--seed", "3", "--k", "25,50",
            "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "selective_search_train" not in r.stdout
    p = pc.load_proposals(data, "val", max_boxes=100, seed=3, k=(25, 50))
    assert max(np.diff(p.offsets)) <= 100 and p.params["strategies"][0] == "hsv:ctsf:25"


@pytest.fixture()
def cached(data, tmp_path):
    """A copy of the val split with its proposals, to damage."""
    import shutil
    root = tmp_path / "set"
    for d in ("annotations", "images"):
        shutil.copytree(data / d, root / d)
    p = pc.make_proposals(pc.open_split(root, "val"), pc.request(max_boxes=300))
    return root, p.path


def test_cache_refuses_damaged_files(cached):
    root, path = cached
    raw = open(path, "rb").read()
    pc.load_proposals(root, "val")

    def refused(content, what):
        with open(path, "wb") as f:
            f.write(content)
        with pytest.raises(NetdslError, match=what):
            pc.load_proposals(root, "val")

    refused(raw[: len(raw) // 2], "damaged")                       # cut short
    refused(b"hello" * 40, "not an .npz")
    at = raw.index(b"boxes.npy")
    flipped = bytearray(raw)
    flipped[at + 400] ^= 0xFF                                      # inside the boxes' bytes: a bad CRC
    refused(bytes(flipped), "damaged")
    a = dict(np.load(io.BytesIO(raw), allow_pickle=False))

    def rewritten(what, **change):
        b = dict(a, **change)
        with open(path, "wb") as f:
            np.savez(f, **{k: v for k, v in b.items() if v is not None})
        with pytest.raises(NetdslError, match=what):
            pc.load_proposals(root, "val")

    rewritten("'boxes' must be float32", boxes=a["boxes"].astype(np.float64))
    rewritten("'offsets' do not split", offsets=a["offsets"] + 1)
    rewritten("'digest' is missing", digest=None)
    rewritten("its format is", format=np.array("something else"))
    rewritten("version", version=np.array(2))
    rewritten("empty", boxes=np.where(np.arange(len(a["boxes"]))[:, None] == 3, 0, a["boxes"]).astype(np.float32))
    rewritten("holds the proposals of instances_train", params=np.array(json.dumps(
        dict(json.loads(str(a["params"])), split="train"))))
    with open(path, "wb") as f:                                     # a pickled object array is never loaded
        np.savez(f, **dict(a, params=np.array([{"method": "selective_search"}], dtype=object)))
    with pytest.raises(NetdslError):
        pc.load_proposals(root, "val")
    with open(path, "wb") as f:
        f.write(raw)
    pc.load_proposals(root, "val")


def test_cache_refuses_other_images(cached):
    root, path = cached
    ann = root / "annotations" / "instances_val.json"
    d = json.loads(ann.read_text())
    first = root / "images" / "val" / d["images"][0]["file_name"]
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(first)
    with pytest.raises(NetdslError, match="images of .* changed"):
        pc.load_proposals(root, "val")
    pc.load_proposals(root, "val", check_images=False)        # ids and names still agree
    d["images"] = d["images"][1:]
    d["annotations"] = [a for a in d["annotations"] if a["image_id"] in {i["id"] for i in d["images"]}]
    ann.write_text(json.dumps(d))
    with pytest.raises(NetdslError, match="stale"):
        pc.load_proposals(root, "val", check_images=False)
    os.remove(path)
    with pytest.raises(NetdslError, match="not found") as e:
        pc.load_proposals(root, "val")
    assert e.value.hint.startswith("run `netdsl data proposals")


def test_cli_errors_exit_2(data, tmp_path):
    for args, what in (((tmp_path / "none",), "not found"), ((data, "--max-boxes", "0"), "--max-boxes"),
                       ((data, "--k", "a"), "--k must be numbers"), ((data, "--strategies", "nope"), "strategies"),
                       ((data, "--split", "test"), "no annotation file"), ((data / "images",), "no annotation file")):
        r = cli("data", "proposals", *args, "--no-progress")
        assert r.returncode == 2 and what in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    bad = tmp_path / "bad"
    (bad / "annotations").mkdir(parents=True)
    (bad / "images" / "val").mkdir(parents=True)
    d = json.loads((data / "annotations" / "instances_val.json").read_text())
    (bad / "annotations" / "instances_val.json").write_text(json.dumps(d))
    (bad / "images" / "val" / d["images"][0]["file_name"]).write_bytes(b"not a png")
    r = cli("data", "proposals", bad, "--no-progress")
    assert r.returncode == 2 and "cannot be read as an image" in r.stderr, r.stderr
    assert not (bad / "proposals" / "selective_search_val.npz").exists()
