"""Segmentation, classification + localization and pose train from the command line on
COCO-format data (`netdsl data shapes`), per-epoch task metrics reach metrics.jsonl,
`netdsl eval RUN_DIR` scores the checkpoint with datasets/evaluate.py (the same figures
as calling it on the results file it writes), `--predict` draws overlays, and bad input
is a clear error. Tiny sizes: the long trainings are benchmarks/bench_dense_tasks.py."""
import json
import math

import numpy as np
import pytest

from helpers import SPECS, cli

DET = SPECS / "det"
SIZE = 32
# each spec at a size that trains one epoch of a few 32x32 images in seconds
CASES = {
    "fcn": ("", {"size": SIZE, "classes": 5, "width": 8}, ("miou", "pixel_acc")),
    "sliding_window": ("", {"size": SIZE, "classes": 5, "patch": 9}, ("miou", "pixel_acc")),
    "cls_loc": ("single", {"size": SIZE, "classes": 4, "width": 8}, ("cls_acc", "box_iou")),
    "pose": ("pose", {"size": SIZE, "width": 8}, ("pck",)),
}


def sets(overrides):
    return [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "shapes"
    r = cli("data", "shapes", out, "--images", 10, "--size", SIZE, "--no-progress")
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def runs(shapes, tmp_path_factory):
    """One epoch of each spec on the tiny set, from the CLI."""
    base = tmp_path_factory.mktemp("runs")
    out = {}
    for name, (sub, overrides, _) in CASES.items():
        run = base / name
        r = cli("run", DET / f"{name}.net", *sets(overrides), "--data", f"coco:{shapes / sub}", "--epochs", 1,
                "--batch", 4, "--out", run, "--no-progress")
        out[name] = (run, r)
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_trains_from_the_cli_with_task_metrics(runs, name):
    run, r = runs[name]
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    rec = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    for key in CASES[name][2]:
        for split in ("train", "test"):
            v = rec[f"{split}_{key}"]
            assert 0 <= v <= 1 and math.isfinite(v), (key, v)
    assert json.loads((run / "run.json").read_text())["data"].startswith("coco:/")


KINDS = {"fcn": "semantic", "sliding_window": "semantic", "cls_loc": "bbox", "pose": "keypoints"}


@pytest.mark.parametrize("name", list(CASES))
def test_eval_gives_what_evaluate_gives_on_its_results_file(runs, shapes, name):
    from netdsl.datasets.evaluate import evaluate
    run, _ = runs[name]
    r = cli("eval", run)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    figures = json.loads((run / "eval.json").read_text())
    sub = CASES[name][0]
    ann = "person_keypoints" if name == "pose" else "instances"
    direct, table = evaluate(str(shapes / sub / "annotations" / f"{ann}_val.json"), str(run / "results.json"),
                             KINDS[name])
    assert {k: figures[k] for k in direct} == direct
    assert table.strip().splitlines()[1] in r.stdout      # the evaluator's own table is printed
    results = json.loads((run / "results.json").read_text())
    assert results and all("image_id" in x and "category_id" in x for x in results)
    if name == "cls_loc":
        assert 0 <= figures["accuracy"] <= 1 and 0 <= figures["box_iou"] <= 1
    if name == "pose":
        assert "PCK@0.2" in figures and "AP" in figures


def test_eval_metrics_match_the_training_metrics(runs):
    """The per-epoch test figures and `netdsl eval` score the same checkpoint on the same
    images: the segmentation figures agree (the images are not resized)."""
    run, _ = runs["fcn"]
    rec = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    figures = json.loads((run / "eval.json").read_text())
    assert figures["pixel_accuracy"] == pytest.approx(rec["test_pixel_acc"], abs=1e-9)
    assert figures["miou"] == pytest.approx(rec["test_miou"], abs=1e-9)


@pytest.mark.parametrize("name", ["fcn", "cls_loc", "pose"])
def test_predict_draws_an_overlay_of_the_image(runs, shapes, name, tmp_path):
    from PIL import Image
    run, _ = runs[name]
    sub, overrides, _ = CASES[name]
    images = shapes / sub / "images" / "val"
    one = sorted(images.iterdir())[0]
    out = tmp_path / "p"
    r = cli("run", DET / f"{name}.net", *sets(overrides), "--data", f"coco:{shapes / sub}", "--weights",
            run / "checkpoint.npz", "--out", out, "--predict", one)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    pic = Image.open(out / "predict" / (one.stem + ".png"))
    k = math.ceil(320 / SIZE)                 # enlarged to at least 320 pixels wide
    legend = 0 if name == "pose" else 18      # the class legend (segmentation) or the class's name under it
    assert pic.size == (SIZE * k, SIZE * k + legend)
    rec = json.loads((out / "predict" / "predictions.json").read_text())
    assert rec[0]["file"] == str(one)
    if name == "cls_loc":
        assert rec[0]["label"] in ("circle", "square", "triangle", "star") and len(rec[0]["box"]) == 4
    if name == "pose":
        assert len(rec[0]["joints"]) == 14
    # a directory: one overlay per image
    r = cli("run", DET / f"{name}.net", *sets(overrides), "--data", f"coco:{shapes / sub}", "--weights",
            run / "checkpoint.npz", "--out", out, "--predict", images)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.stem for p in (out / "predict").glob("*.png")) == sorted(p.stem for p in images.iterdir())


def test_bad_input_is_a_clear_error(runs, shapes, tmp_path):
    fcn = [DET / "fcn.net", *sets(CASES["fcn"][1])]
    r = cli("run", *fcn, "--data", f"coco:{tmp_path / 'nowhere'}", "--epochs", 1, "--out", tmp_path / "r")
    assert r.returncode == 2 and "coco: directory" in r.stderr and "not found" in r.stderr, r.stderr
    r = cli("run", *fcn, "--data", f"coco:{shapes / 'single'}", "--epochs", 1, "--out", tmp_path / "r")
    assert r.returncode == 2 and "task 'localize'" in r.stderr and "'label'" in r.stderr, r.stderr
    r = cli("eval", tmp_path)
    assert r.returncode == 2 and "holds no run.json" in r.stderr, r.stderr
    r = cli("eval", tmp_path / "missing")
    assert r.returncode == 2 and "not found" in r.stderr, r.stderr
    r = cli("eval", runs["cls_loc"][0], "--data", f"coco:{shapes}")
    assert r.returncode == 2 and "task 'segment'" in r.stderr, r.stderr
    run, _ = runs["fcn"]
    r = cli("run", *fcn, "--data", f"coco:{shapes}", "--weights", run / "checkpoint.npz", "--out", tmp_path / "r",
            "--predict", tmp_path / "none.png")
    assert r.returncode == 2 and "no such file" in r.stderr, r.stderr
    (tmp_path / "empty").mkdir()
    r = cli("run", *fcn, "--data", f"coco:{shapes}", "--weights", run / "checkpoint.npz", "--out", tmp_path / "r",
            "--predict", tmp_path / "empty")
    assert r.returncode == 2 and "holds no images" in r.stderr and "Traceback" not in r.stderr, r.stderr


# ---------------------------------------------------------------- in-process pieces

def test_flip_augmentation_moves_boxes_and_joints_with_the_image(shapes):
    """The loader's flip of COCO data is the data set's own flip (coco.flip_horizontal)
    of the examples its random draw picked."""
    from netdsl.datasets.coco import coco
    from netdsl.runtime.loader import Loader
    ds = coco(str(shapes / "pose"), ann="person_keypoints")
    fields = {k: ds.train[k] for k in ("image", "joints", "visible", "box")}
    loader = Loader(fields, 4, rng=np.random.default_rng(3), flip=True, mirror=ds.flip)
    twin = np.random.default_rng(3)
    for i, batch in enumerate(loader):
        idx = np.arange(i * 4, min(i * 4 + 4, len(fields["image"])))
        which = twin.random(len(idx)) < 0.5
        want = ds.flip({k: a[idx] for k, a in fields.items()}, which)
        for k in fields:
            np.testing.assert_array_equal(batch[k], want[k])
        assert 0 < which.sum() or i > 0


def test_box_iou_and_pck_metrics_accumulate_over_batches():
    from netdsl.datasets.evaluate import box_iou, pck
    from netdsl.runtime.metrics import PCK, BoxIoU
    rng = np.random.default_rng(0)
    truth = rng.uniform(0, 30, (10, 4)).astype(np.float32)
    truth[:, 2:] += truth[:, :2] + 5
    pred = truth + rng.normal(0, 3, truth.shape).astype(np.float32)
    m = BoxIoU(None, "box", "box", None, 4)
    m.update(pred[:3], truth[:3], 0.0)
    m.update(pred[3:], truth[3:], 0.0)
    assert m.result()["box_iou"] == pytest.approx(box_iou(pred, truth).mean())
    joints = rng.uniform(0, 60, (10, 14, 2))
    guess = joints + rng.normal(0, 6, joints.shape)
    vis = (rng.random((10, 14)) < 0.8).astype(np.float32)
    p = PCK(None, "joints", "joints", None, 14)
    p.update(guess[:4], joints[:4], 0.0, box=truth[:4], weight=vis[:4])
    p.update(guess[4:], joints[4:], 0.0, box=truth[4:], weight=vis[4:])
    assert p.result()["pck"] == pytest.approx(pck(guess, joints, vis, truth, 0.2))


def test_declared_pck_needs_the_box_field():
    from helpers import compile_spec
    from netdsl.errors import NetdslError
    from netdsl.runtime.metrics import choose
    g = compile_spec("det/pose.net", size=64, width=8)
    (m,) = choose(g, ["pck"], fields=["image", "joints", "visible", "box"])
    assert m.weight == "visible" and m.keys == ("pck",)
    assert choose(g, None, fields=["image", "joints", "visible"]) == []     # left out by default
    with pytest.raises(NetdslError, match="needs the data field 'box'"):
        choose(g, ["pck"], fields=["image", "joints", "visible"])
    g = compile_spec("det/cls_loc.net", size=64, width=8, classes=4)
    assert [k for m in choose(g) for k in m.keys] == ["cls_acc", "box_iou"]


def test_eval_of_a_run_on_other_data_gives_its_training_time_figures(tmp_path):
    run = tmp_path / "run"
    r = cli("run", SPECS / "digits_cnn.net", "--epochs", 1, "--out", run, "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    r = cli("eval", run)
    assert r.returncode == 0, r.stderr[-2000:]
    rec = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    figures = json.loads((run / "eval.json").read_text())
    assert figures == {k: pytest.approx(v, abs=1e-12) for k, v in rec.items() if k.startswith("test_")}
    assert not (run / "results.json").exists()


def test_data_shapes_makes_the_directories_above_its_target(tmp_path):
    """The documented `netdsl data shapes data/shapes` works in a checkout without data/."""
    r = cli("data", "shapes", tmp_path / "data" / "shapes", "--images", 2, "--size", 32, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "data" / "shapes" / "dataset.json").is_file()
    (tmp_path / "file").write_text("")
    r = cli("data", "shapes", tmp_path / "file" / "shapes", "--images", 2, "--size", 32, "--no-progress")
    assert r.returncode == 2 and "is not a directory" in r.stderr, r.stderr


def test_eval_of_a_model_that_sees_only_background(runs, tmp_path):
    """No pixel predicted as an object: no results file (COCO results cannot say "nothing"),
    the figures from the label maps: every object pixel missed."""
    import shutil

    from netdsl.cli import data_flag
    from netdsl.lang.elaborate import elaborate
    from netdsl.runtime.sample import read_run_file
    from netdsl.runtime.train import Trainer
    from netdsl.runtime.vision import evaluate_run
    run = tmp_path / "run"
    shutil.copytree(runs["fcn"][0], run)
    info = read_run_file(str(run))
    g, loader = elaborate(info["spec"], None, info["set"])
    cfg = dict(g.train)
    cfg["data"] = data_flag(info["data"], cfg["data"])
    t = Trainer(g, cfg, str(run), "".join(loader.sources.values()), log=lambda s: None, training=False)
    t.resume(str(run / "checkpoint.npz"))
    t.model.params["classifier.bias"][...] = [1e4, 0, 0, 0, 0]
    figures, report = evaluate_run(t, str(run))
    truth = t.data.test["label"]
    assert figures["pixel_accuracy"] == pytest.approx((truth == 0).mean())
    present = len(set(np.unique(truth).tolist()) | {0})      # classes in truth or prediction
    assert figures["miou"] == pytest.approx((truth == 0).mean() / present)    # background's IoU, others 0
    assert not (run / "results.json").exists() and "no pixel was predicted" in report
