"""Sliding-window segmentation, classification + localization and pose train from the
command line at their small sizes (the same architecture, narrower or on smaller images);
at their default sizes they keep the notes' reference shapes and parameter counts
(test_specs_det.py). The FCN's small run is in test_feeds.py."""
import json
import math

import pytest

from helpers import SPECS, cli, compile_spec

DET = SPECS / "det"
SMALL = {
    "pose": {"size": 64, "width": 8},
    "cls_loc": {"size": 64, "width": 8, "classes": 5},
    "sliding_window": {"size": 16, "patch": 9, "classes": 4},
}


def sets(overrides):
    return [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]


@pytest.mark.parametrize("name", list(SMALL))
def test_small_variant_trains_a_step_from_the_cli(tmp_path, name):
    out = tmp_path / "run"
    r = cli("run", DET / f"{name}.net", *sets(SMALL[name]), "--data", "synthetic:4", "--epochs", "1",
            "--batch", "2", "--out", out, "--no-progress")
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert math.isfinite(rec["train_loss"]) and rec["train_loss"] > 0
    assert math.isfinite(rec["test_loss"])
    assert (out / "checkpoint.npz").is_file()


def conv_widths(g):
    return [n.params["weight"].shape[0] for n in g.nodes if n.op == "conv"]


VGG16_WIDTHS = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]


@pytest.mark.parametrize("name", ["pose", "cls_loc"])
def test_width_and_size_scale_vgg16_without_changing_its_layers(name):
    full = compile_spec(f"det/{name}.net")
    small = compile_spec(f"det/{name}.net", **SMALL[name])
    assert conv_widths(full) == VGG16_WIDTHS
    assert conv_widths(small) == [c // 8 for c in VGG16_WIDTHS]
    assert [n.op for n in full.nodes] == [n.op for n in small.nodes]
    assert sorted(full.params) == sorted(small.params)          # names map to torchvision's either way
    fc6 = small.params["classifier.0.weight"]
    assert tuple(fc6.shape) == (512, 64 * 2 * 2)                  # 64 channels of 64 / 32 pixels square
    assert small.inputs["image"].shape[2:] == (64, 64)


def test_sliding_window_small_cuts_one_crop_per_pixel():
    g = compile_spec("det/sliding_window.net", **SMALL["sliding_window"])
    (p,) = [n for n in g.nodes if n.op == "extract_patches"]
    N = g.inputs["image"].shape[0]
    assert p.outputs[0].shape == (N * 16 * 16, 3, 9, 9)
    assert g.outputs["logits"].shape == (N, 4, 16, 16)
