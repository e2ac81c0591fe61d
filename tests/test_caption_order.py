"""`netdsl data shapes-captions --order reading`: one caption per image, the left shape (or,
stacked, the upper one) named first. Checked against the instances' boxes and against the
default both-orders set of the same seed: the same images and instances, and each reading-order
caption is one of that set's references with the same grounding (the grammar unchanged)."""
import json

from pycocotools.coco import COCO

from helpers import cli
from netdsl.datasets import captions as cap
from netdsl.datasets.shapes_captions import generate

SIZE = 32


def test_reading_order_names_the_left_or_upper_shape_first(tmp_path):
    both, reading = tmp_path / "both", tmp_path / "reading"
    generate(str(both), images=24, size=SIZE, seed=3)
    m = generate(str(reading), images=24, size=SIZE, seed=3, order="reading")
    assert m["order"] == "reading" and m["relations"] == ["left of", "above"]
    assert json.loads((both / "dataset.json").read_text())["order"] == "both"
    pairs = 0
    for split in ("train", "val"):
        assert (both / f"annotations/instances_{split}.json").read_bytes() == \
            (reading / f"annotations/instances_{split}.json").read_bytes()
        for f in (both / "images" / split).iterdir():
            assert f.read_bytes() == (reading / "images" / split / f.name).read_bytes()
        caps = COCO(str(reading / "annotations" / f"captions_{split}.json"))
        refs = COCO(str(both / "annotations" / f"captions_{split}.json"))
        inst = COCO(str(reading / "annotations" / f"instances_{split}.json"))
        assert sorted(caps.getImgIds()) == sorted(refs.getImgIds())
        for image_id in caps.getImgIds():
            (a,) = caps.loadAnns(caps.getAnnIds(imgIds=image_id))      # one caption per image
            assert set(a) == {"id", "image_id", "caption", "grounding"}
            assert [a["caption"], a["grounding"]] in [[r["caption"], r["grounding"]]
                                                      for r in refs.loadAnns(refs.getAnnIds(imgIds=image_id))]
            words = cap.tokenize(a["caption"])
            if len(words) == 3:
                continue
            pairs += 1
            first, second = (inst.anns[obj]["bbox"] for _, obj in a["grounding"][::2])
            rel = " ".join(words[3:-3])
            if rel == "left of":        # side by side: the left one first, clear of the other
                assert first[0] + first[2] <= second[0], (a, first, second)
            else:                       # stacked: the upper one first
                assert rel == "above" and first[1] + first[3] <= second[1], (a, first, second)
    assert pairs >= 10


def test_cli_order_flag(tmp_path):
    r = cli("data", "shapes-captions", tmp_path / "r", "--images", "4", "--size", SIZE, "--order", "reading",
            "--no-progress")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "r" / "dataset.json").read_text())["order"] == "reading"
    r = cli("data", "shapes-captions", tmp_path / "bad", "--order", "sideways", "--no-progress")
    assert r.returncode == 2 and "--order must be one of both, reading" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "bad").exists()
