"""Named feeds and task metrics: any spec's inputs filled from data, metrics chosen by task."""
import json
import zipfile

import numpy as np
import pytest
from sklearn import metrics as skm

from helpers import SPECS, cli, compile_spec, compile_text
from netdsl.errors import NetdslError
from netdsl.runtime.data import Dataset
from netdsl.runtime.feeds import bind, synthetic
from netdsl.runtime.loader import Loader
from netdsl.runtime.metrics import Accuracy, LossPerToken, MeanIoU, PixelAccuracy, Top5, choose

FCN = SPECS / "det" / "fcn.net"
SMALL_FCN = ["--set", "size=16", "--set", "classes=4"]


def _ok(r):
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def _user_error(r, *needles):
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in r.stderr, r.stderr
    return r


def _records(out):
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- metrics against scikit-learn

def test_metrics_agree_with_scikit_learn():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, 7)).astype(np.float32)
    labels = rng.integers(0, 7, 200)
    labels[:10] = -1                                    # ignored
    acc, top5 = Accuracy(None, "y", "ce", -1, 7), Top5(None, "y", "ce", -1, 7)
    for part in (slice(0, 64), slice(64, 200)):         # accumulated over batches
        acc.update(logits[part], labels[part], 0.0)
        top5.update(logits[part], labels[part], 0.0)
    keep = labels != -1
    assert acc.result()["acc"] == pytest.approx(skm.accuracy_score(labels[keep], logits[keep].argmax(1)))
    assert top5.result()["top5"] == pytest.approx(skm.top_k_accuracy_score(labels[keep], logits[keep], k=5,
                                                                            labels=range(7)))
    # dense: [N, C, H, W] logits, [N, H, W] labels
    dl = rng.normal(size=(3, 5, 6, 6)).astype(np.float32)
    dy = rng.integers(0, 4, (3, 6, 6))              # class 4 never true, maybe predicted
    dy[0, 0, :3] = 255
    pix, iou = PixelAccuracy(None, "y", "ce", 255, 5), MeanIoU(None, "y", "ce", 255, 5)
    for i in range(3):
        pix.update(dl[i:i + 1], dy[i:i + 1], 0.0)
        iou.update(dl[i:i + 1], dy[i:i + 1], 0.0)
    t, p = dy[dy != 255], dl.argmax(1)[dy != 255]
    present = sorted(set(t) | set(p))
    assert pix.result()["pixel_acc"] == pytest.approx(skm.accuracy_score(t, p))
    assert iou.result()["miou"] == pytest.approx(skm.jaccard_score(t, p, labels=present, average="macro"))
    tok = LossPerToken(None, "y", "ce", -1, 3)
    tok.update(None, np.array([[0, 1, -1]]), 2.0)      # 2 tokens at mean loss 2
    tok.update(None, np.array([[1, 1, 1, 1]]), 0.5)    # 4 at 0.5
    r = tok.result()
    assert r["loss_per_token"] == pytest.approx(1.0) and r["perplexity"] == pytest.approx(np.e)


def test_metrics_follow_the_task_or_the_declaration(tmp_path):
    assert [m.keys for m in choose(compile_spec("digits_cnn.net"))] == [("acc",), ("top5",)]
    assert [m.keys for m in choose(compile_spec(FCN, size=16))] == [("pixel_acc",), ("miou",)]
    assert [m.keys for m in choose(compile_spec("digits_cnn.net"), ["accuracy"])] == [("acc",)]
    spec = tmp_path / "cls.net"
    spec.write_text((SPECS / "digits_cnn.net").read_text().replace("data = digits()", "data = digits() metrics = [miou]"))
    _user_error(cli("run", spec, "--out", tmp_path / "run"), "metric 'miou' is for dense losses",
                "cls.net:")


# ---------------------------------------------------------------- synthetic data fills every input

def test_synthetic_fills_every_input_from_its_type(tmp_path):
    g = compile_spec(FCN, size=16, classes=4)
    ds = synthetic(g, 10, 0)
    assert ds.train["image"].shape == (10, 3, 16, 16) and ds.train["image"].dtype == np.float32
    lab = ds.train["label"]
    assert lab.shape == (10, 16, 16) and lab.dtype == np.int64 and set(np.unique(lab)) == {0, 1, 2, 3}
    assert ds.test["label"].shape == (2, 16, 16)
    g = compile_text(tmp_path, """
network emb() {
  input ids: i64[N, 5]
  input y: i64[N]
  logits = ids -> embedding(vocab=30, dim=4) -> flatten -> linear(3)
  output logits
  loss ce = cross_entropy(logits, y)
}""")
    ds = synthetic(g, 50, 1)
    assert ds.train["ids"].max() < 30 and ds.train["ids"].max() > 20 and ds.train["y"].max() == 2
    g = compile_text(tmp_path, """
network seq() {
  input x: f32[N, T, 4]
  y = x -> linear(2)
  output y
}""", name="seq.net")
    with pytest.raises(NetdslError, match="symbolic dimension T") as e:
        synthetic(g, 4, 0)
    assert "--set T=" in e.value.hint


def test_fcn_trains_from_the_command_line_on_synthetic_data(tmp_path):
    out = tmp_path / "run"
    r = _ok(cli("run", FCN, *SMALL_FCN, "--data", "synthetic:12", "--epochs", "2", "--batch", "4", "--out", out))
    assert "training fcn on synthetic: 12 train / 3 test" in r.stdout
    assert "epoch 2/2  [" in r.stderr and " pixel_acc 0." in r.stderr and " miou 0." in r.stderr   # the bar
    recs = _records(out)
    assert {"train_loss", "train_pixel_acc", "train_miou", "test_loss", "test_pixel_acc", "test_miou"} <= set(recs[-1])
    assert 0 <= recs[-1]["test_miou"] <= recs[-1]["test_pixel_acc"] <= 1
    assert (out / "metrics.png").read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------- npz named after the inputs

def _seg_npz(path, n=12, bad=None):
    """Images whose label is which quadrant-coloured channel is brightest: learnable."""
    rng = np.random.default_rng(0)
    img = rng.random((n + 4, 3, 16, 16), dtype=np.float32)
    lab = img.argmax(1)
    if bad:
        split, value = bad
        (lab[:n] if split == "train" else lab[n:])[1, 2, 3] = value
    np.savez(path, image_train=(img[:n] * 255).astype(np.uint8), label_train=lab[:n].astype(np.uint8),
             image_test=(img[n:] * 255).astype(np.uint8), label_test=lab[n:].astype(np.int32))
    return img, lab


def test_fcn_trains_and_predicts_from_an_npz_named_after_its_inputs(tmp_path):
    data, out = tmp_path / "seg.npz", tmp_path / "run"
    img, _ = _seg_npz(data)
    _ok(cli("run", FCN, *SMALL_FCN, "--data", f"npz:{data}", "--epochs", "1", "--batch", "4", "--out", out,
            "--no-progress"))
    assert "test_miou" in _records(out)[-1]
    np.savez(tmp_path / "in.npz", image=img[:3])
    r = _ok(cli("run", FCN, *SMALL_FCN, "--data", f"npz:{data}", "--out", out, "--predict", tmp_path / "in.npz"))
    assert "3 predictions" in r.stdout
    with np.load(out / "predictions.npz") as z:
        assert z["logits"].shape == (3, 4, 16, 16) and z["logits_classes"].shape == (3, 16, 16)
        assert z["logits_classes"].max() < 4


@pytest.mark.parametrize("split", ["train", "test"])
def test_a_label_outside_the_classes_names_file_split_index_and_value(tmp_path, split):
    data = tmp_path / "seg.npz"
    _seg_npz(data, bad=(split, 99))
    _user_error(cli("run", FCN, *SMALL_FCN, "--data", f"npz:{data}", "--epochs", "1", "--out", tmp_path / "run"),
                str(data), f"{split} 'label' at index (1, 2, 3) is 99, outside [0, 4)", "fcn.net:")


def test_classic_npz_labels_are_checked_against_the_classes(tmp_path):
    data = tmp_path / "d.npz"
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 20)
    y[7] = 10
    np.savez(data, x_train=rng.random((20, 1, 8, 8)), y_train=y, x_test=rng.random((4, 1, 8, 8)),
             y_test=np.arange(4))
    _user_error(cli("run", SPECS / "digits_cnn.net", "--data", f"npz:{data}", "--out", tmp_path / "run"),
                "train 'label' at index 7 is 10, outside [0, 10)")


def test_data_that_does_not_fill_the_inputs_lists_both(tmp_path):
    r = _user_error(cli("run", FCN, *SMALL_FCN, "--data", "digits", "--out", tmp_path / "run"))
    assert "image f32[N, 3, 16, 16], label i64[N, 16, 16]" in r.stderr and "image f32 (1, 8, 8)" in r.stderr
    data = tmp_path / "other.npz"
    np.savez(data, pixels_train=np.zeros((2, 3, 16, 16)), pixels_test=np.zeros((2, 3, 16, 16)))
    _user_error(cli("run", FCN, *SMALL_FCN, "--data", f"npz:{data}", "--out", tmp_path / "run"),
                "nothing for inputs 'image', 'label'", "pixels f64 (3, 16, 16)")


def test_bind_converts_to_the_declared_types(tmp_path):
    g = compile_spec(FCN, size=16, classes=4)
    ds = Dataset("t", "t.npz", {"image": np.full((2, 3, 16, 16), 255, np.uint8), "label": np.zeros((2, 16, 16), np.uint8)},
                 {"image": np.zeros((1, 3, 16, 16), np.float64), "label": np.zeros((1, 16, 16), np.int16)})
    assert bind(g, ds) == {"image": "image", "label": "label"}
    assert ds.train["image"].dtype == np.float32 and ds.train["image"].max() == 1.0
    assert ds.test["label"].dtype == np.int64
    ds.train["label"] = np.zeros((2, 16, 16), np.float32)
    with pytest.raises(NetdslError, match="takes integers"):
        bind(g, ds)


# ---------------------------------------------------------------- augmentation keeps dense labels aligned

def test_crop_and_flip_move_label_maps_with_their_images():
    rng = np.random.default_rng(0)
    x = rng.random((32, 1, 6, 7), dtype=np.float32) + 0.5
    y = np.rint(x[:, 0] * 10).astype(np.int64)          # each pixel's label is a function of the pixel
    loader = Loader({"image": x, "label": y}, 8, rng=rng, shuffle=True, crop_padding=2, flip=True,
                    dense={"label": -1})
    moved = 0
    for b in loader:
        xi, yi = b["image"][:, 0], b["label"]
        pad = yi == -1
        assert np.array_equal(pad, xi == 0)              # padding is where the image was zero-padded
        assert np.array_equal(yi[~pad], np.rint(xi[~pad] * 10).astype(np.int64))
        moved += int(pad.any())
    assert moved > 0


def test_augmenting_a_field_the_loader_cannot_transform_is_an_error(tmp_path):
    spec = tmp_path / "boxes.net"
    spec.write_text("""
network boxes() {
  input image: f32[N, 1, 8, 8]
  input box: f32[N, 4]
  y = image -> flatten -> linear(4)
  output y
  loss l = l2(y, box)
  train { augment = [flip] epochs = 1 }
}""")
    r = np.random.default_rng(0)
    data = tmp_path / "boxes.npz"       # a user's boxes (synthetic data's random ones need no moving)
    np.savez(data, image_train=r.random((8, 1, 8, 8), np.float32), box_train=r.random((8, 4), np.float32),
             image_test=r.random((2, 1, 8, 8), np.float32), box_test=r.random((2, 4), np.float32))
    _user_error(cli("run", spec, "--data", f"npz:{data}", "--out", tmp_path / "run"), "cannot transform input 'box'",
                "boxes.net:")


# ---------------------------------------------------------------- bad places and files

@pytest.mark.parametrize("where", ["file", "/dev/null", "/proc/netdsl-run", "under-a-file"])
def test_out_that_cannot_hold_a_run(tmp_path, where):
    f = tmp_path / "a-file"
    f.write_text("x")
    out = {"file": f, "under-a-file": f / "run"}.get(where, where)
    r = _user_error(cli("run", SPECS / "digits_cnn.net", "--out", out, "--epochs", "1"), "--out", str(out))
    assert f.read_text() == "x"


def test_predict_refuses_empty_and_non_numeric_files(digits_ckpt, tmp_path):
    empty = tmp_path / "empty.npz"
    with zipfile.ZipFile(empty, "w"):
        pass
    np.save(tmp_path / "strings.npy", np.array(["a", "b"]))
    np.save(tmp_path / "none.npy", np.zeros((0, 1, 8, 8), np.float32))
    for f, msg in ((empty, "empty.npz"), (tmp_path / "strings.npy", "strings.npy"),
                   (tmp_path / "none.npy", "holds no examples")):
        _user_error(cli("run", SPECS / "digits_cnn.net", "--out", digits_ckpt, "--predict", f), msg)


@pytest.fixture(scope="module")
def digits_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    _ok(cli("run", SPECS / "digits_cnn.net", "--epochs", "1", "--out", out, "--no-progress"))
    return out


def test_a_step_larger_than_the_machine_is_refused_before_allocating(tmp_path):
    spec = tmp_path / "huge.net"
    spec.write_text("""
network huge() {
  input image: f32[N, 1, 30000, 30000]
  input label: i64[N]
  logits = image -> conv(2, k=3, s=2) -> global_avgpool -> flatten -> linear(10)
  output logits
  loss ce = cross_entropy(logits, label)
}""")
    _user_error(cli("run", spec, "--data", "synthetic:1", "--batch", "64", "--out", tmp_path / "run"),
                "a training step of batch 64 needs", "this machine has", "huge.net:3:3")
    _user_error(cli("run", spec, "--data", "synthetic:100", "--out", tmp_path / "run", "--batch", "1"),
                "synthetic data of 125 examples would take")
