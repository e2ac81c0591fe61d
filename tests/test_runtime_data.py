"""Data sources, file-format validation and the augmenting loader."""
import gzip
import os
import pickle

import numpy as np
import pytest

from netdsl.errors import NetdslError
from netdsl.runtime.data import FASHION_MNIST_DIR, make_source, read_idx
from netdsl.runtime.loader import Loader, channel_stats, random_crop


# ---------------------------------------------------------------- digits

def test_digits_split_is_fixed_and_scaled():
    a, b = make_source("digits"), make_source("digits")
    assert a.x_train.shape == (1437, 1, 8, 8) and a.x_test.shape == (360, 1, 8, 8)
    assert a.x_train.dtype == np.float32 and a.y_train.dtype == np.int64
    assert a.num_classes == 10 and 0.0 == a.x_train.min() and a.x_train.max() == 1.0
    np.testing.assert_array_equal(a.y_test, b.y_test)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    # Train and test are disjoint rows of the original data.
    seen = {r.tobytes() for r in a.x_train}
    assert sum(r.tobytes() in seen for r in a.x_test) < 5  # the dataset has a few duplicate images
    other = make_source("digits", seed=1)
    assert not np.array_equal(other.y_test, a.y_test)


# ---------------------------------------------------------------- IDX

def _idx_bytes(arr: np.ndarray) -> bytes:
    code = {np.uint8: 0x08}[arr.dtype.type]
    return bytes([0, 0, code, arr.ndim]) + np.array(arr.shape, ">u4").tobytes() + arr.tobytes()


def _write_idx_dir(d, n_train=20, n_test=7, gz=True):
    rng = np.random.default_rng(0)
    files = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        files[f"{prefix}-images-idx3-ubyte"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        files[f"{prefix}-labels-idx1-ubyte"] = rng.integers(0, 10, n, dtype=np.uint8)
    for name, arr in files.items():
        data = _idx_bytes(arr)
        (d / (name + ".gz" if gz else name)).write_bytes(gzip.compress(data) if gz else data)
    return files


@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
    """The real Debian files when installed, else generated ones (so the reader is
    always exercised, never skipped)."""
    if os.path.isdir(FASHION_MNIST_DIR):
        return make_source("fashion_mnist"), None
    d = tmp_path_factory.mktemp("fmnist")
    files = _write_idx_dir(d)
    return make_source("fashion_mnist", path=str(d)), files


def test_fashion_mnist(fashion):
    ds, generated = fashion
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert ds.x_train.shape[1:] == (1, 28, 28) and ds.x_test.shape[1:] == (1, 28, 28)
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    if generated is None:
        assert (len(ds.x_train), len(ds.x_test), ds.num_classes) == (60000, 10000, 10)
        np.testing.assert_array_equal(ds.y_train[:10], [9, 0, 0, 3, 0, 2, 7, 2, 5, 5])
        np.testing.assert_array_equal(np.bincount(ds.y_test), [1000] * 10)
    else:
        np.testing.assert_array_equal(ds.y_train, generated["train-labels-idx1-ubyte"])
        np.testing.assert_allclose(ds.x_test[:, 0] * 255, generated["t10k-images-idx3-ubyte"], atol=1e-4)


def test_idx_uncompressed_and_values(tmp_path):
    files = _write_idx_dir(tmp_path, gz=False)
    ds = make_source("mnist", path=str(tmp_path))
    np.testing.assert_array_equal(ds.y_test, files["t10k-labels-idx1-ubyte"])
    np.testing.assert_array_equal(np.rint(ds.x_train[:, 0] * 255).astype(np.uint8), files["train-images-idx3-ubyte"])


@pytest.mark.parametrize("corrupt,expect", [
    (lambda b: b"\x08\x03" + b[2:], "magic"),          # wrong magic
    (lambda b: b[:-10], "truncated"),                   # data cut short
    (lambda b: b + b"\0", "trailing"),                  # extra bytes
    (lambda b: b[:6], "header"),                        # header cut short
    (lambda b: b"", "magic"),                           # empty file
])
def test_malformed_idx_names_path(tmp_path, corrupt, expect):
    _write_idx_dir(tmp_path, gz=False)
    bad = tmp_path / "train-images-idx3-ubyte"
    bad.write_bytes(corrupt(bad.read_bytes()))
    with pytest.raises(NetdslError) as e:
        make_source("mnist", path=str(tmp_path))
    assert str(bad) in e.value.message and expect in e.value.message


def test_idx_wrong_rank_and_bad_gzip(tmp_path):
    _write_idx_dir(tmp_path)
    labels = tmp_path / "train-labels-idx1-ubyte.gz"
    images = tmp_path / "train-images-idx3-ubyte.gz"
    labels.write_bytes(images.read_bytes())  # images where labels belong
    with pytest.raises(NetdslError, match="3 dimensions, expected 1"):
        make_source("mnist", path=str(tmp_path))
    images.write_bytes(images.read_bytes()[:100])  # gzip stream cut short
    with pytest.raises(NetdslError, match="corrupt gzip") as e:
        read_idx(str(images))
    assert str(images) in e.value.message


def test_idx_count_mismatch_and_missing(tmp_path):
    _write_idx_dir(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(np.zeros(3, np.uint8))))
    with pytest.raises(NetdslError, match="7 images but .* 3 labels"):
        make_source("mnist", path=str(tmp_path))
    with pytest.raises(NetdslError, match="no train-images-idx3-ubyte") as e:
        make_source("mnist", path=str(tmp_path / "nowhere"))
    assert "does not exist" in e.value.hint


# ---------------------------------------------------------------- CIFAR-10

def _cifar_dir(d, n=6, protocol=2):
    """Batches in the official layout: a dict with bytes keys, 'data' N x 3072 uint8
    (R, G, B planes), 'labels' a list of ints."""
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, n)]
        batches[name] = (x, y)
        with open(d / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": y, b"data": x,
                         b"filenames": [b"img%d.png" % i for i in range(n)]}, f, protocol=protocol)
    return batches


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar_round_trip(tmp_path, protocol):
    batches = _cifar_dir(tmp_path, protocol=protocol)
    ds = make_source("cifar10", path=str(tmp_path))
    assert ds.x_train.shape == (30, 3, 32, 32) and ds.x_test.shape == (6, 3, 32, 32)
    x1, y1 = batches["data_batch_2"]
    np.testing.assert_array_equal(ds.y_train[6:12], y1)
    # Row layout: 1024 red values, then green, then blue, each row-major 32x32.
    np.testing.assert_allclose(ds.x_train[6, 1, 0, 5] * 255, x1[0, 1024 + 5], atol=1e-4)
    np.testing.assert_allclose(ds.x_train[6:12] * 255, x1.reshape(6, 3, 32, 32), atol=1e-4)


def test_cifar_refuses_code_and_bad_layout(tmp_path):
    _cifar_dir(tmp_path)
    evil = tmp_path / "data_batch_3"

    class Boom:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    evil.write_bytes(pickle.dumps({b"data": Boom()}))
    with pytest.raises(NetdslError, match="refusing to load") as e:
        make_source("cifar10", path=str(tmp_path))
    assert str(evil) in e.value.message and not (tmp_path / "pwned").exists()
    evil.write_bytes(pickle.dumps({b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(NetdslError, match=r"shape \(N, 3072\)"):
        make_source("cifar10", path=str(tmp_path))
    evil.write_bytes(b"not a pickle at all")
    with pytest.raises(NetdslError, match="not a CIFAR-10 python batch"):
        make_source("cifar10", path=str(tmp_path))


# ---------------------------------------------------------------- npz and the factory

def test_npz(tmp_path):
    p = tmp_path / "d.npz"
    rng = np.random.default_rng(0)
    np.savez(p, x_train=rng.integers(0, 256, (5, 4, 4), dtype=np.uint8), y_train=np.arange(5),
             x_test=rng.random((2, 1, 4, 4)), y_test=np.array([1, 2]))
    ds = make_source("npz", path=str(p))
    assert ds.x_train.shape == (5, 1, 4, 4) and ds.x_test.dtype == np.float32 and ds.num_classes == 5
    np.savez(p, x=np.zeros(3), y_train=np.zeros(3))
    with pytest.raises(NetdslError) as e:
        make_source("npz", path=str(p))
    assert str(p) in e.value.message and "found x, y_train" in e.value.message
    np.savez(p, x_train=np.zeros((4, 1, 2, 2)), y_train=np.zeros(3, int),
             x_test=np.zeros((1, 1, 2, 2)), y_test=np.zeros(1, int))
    with pytest.raises(NetdslError, match="4 train images but labels of shape"):
        make_source("npz", path=str(p))
    with pytest.raises(NetdslError, match="not found"):
        make_source("npz", path=str(tmp_path / "missing.npz"))
    np.savez(p, x_train=np.array([None]), y_train=np.zeros(1), x_test=np.zeros(1), y_test=np.zeros(1))
    with pytest.raises(NetdslError, match="Python objects"):
        make_source("npz", path=str(p))


def test_factory_errors():
    with pytest.raises(NetdslError) as e:
        make_source("fashion-mnist")
    assert "fashion_mnist" in e.value.hint
    with pytest.raises(NetdslError) as e:
        make_source("digits", test_sise=100)
    assert "test_size" in e.value.hint
    with pytest.raises(NetdslError, match="needs option"):
        make_source("npz")


# ---------------------------------------------------------------- loader

def _toy(n=10):
    x = np.arange(n * 2 * 4 * 5, dtype=np.float32).reshape(n, 2, 4, 5)
    return x, np.arange(n, dtype=np.int64)


def test_batches_cover_epoch_and_drop_last():
    x, y = _toy(10)
    full = Loader({"image": x, "label": y}, 4, rng=np.random.default_rng(0), shuffle=True)
    batches = list(full)
    assert len(full) == 3 and [len(b["label"]) for b in batches] == [4, 4, 2]
    assert sorted(np.concatenate([b["label"] for b in batches])) == list(range(10))
    for b in batches:  # images travel with their labels
        np.testing.assert_array_equal(b["image"], x[b["label"]])
    dropped = Loader({"image": x, "label": y}, 4, drop_last=True)
    assert len(dropped) == 2 and [len(b["label"]) for b in dropped] == [4, 4]


def test_augmentation_is_deterministic_given_seed():
    x, y = _toy(16)

    def epochs(seed):
        loader = Loader({"image": x, "label": y}, 5, rng=np.random.default_rng(seed), shuffle=True, crop_padding=2,
                        flip=True, mean=[1.0, 2.0], std=[3.0, 4.0])
        return [(b["image"], b["label"]) for _ in range(2) for b in loader]

    a, b, c = epochs(7), epochs(7), epochs(8)
    for (xa, ya), (xb, yb) in zip(a, b):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    assert not all(np.array_equal(p[0], q[0]) for p, q in zip(a, c))
    # Two epochs of one loader differ: the generator advances.
    assert not np.array_equal(np.concatenate([t[1] for t in a[:4]]), np.concatenate([t[1] for t in a[4:]]))


def test_flip_and_normalise_values():
    x, y = _toy(64)
    out = np.concatenate([b["image"] for b in Loader({"image": x, "label": y}, 64, rng=np.random.default_rng(0),
                                                         flip=True, mean=[1.0, 2.0], std=[2.0, 4.0])])
    raw = out * np.array([2.0, 4.0], np.float32)[:, None, None] + np.array([1.0, 2.0], np.float32)[:, None, None]
    flipped = [not np.array_equal(raw[i], x[i]) for i in range(64)]
    for i in range(64):
        np.testing.assert_allclose(raw[i], x[i, :, :, ::-1] if flipped[i] else x[i], rtol=1e-6)
    assert 16 < sum(flipped) < 48  # about half


def test_random_crop_is_a_shifted_window():
    x, _ = _toy(200)
    out = random_crop(x.copy(), 2, np.random.default_rng(0))
    seen = set()
    for i in range(len(x)):
        padded = np.pad(x[i], ((0, 0), (2, 2), (2, 2)))
        hits = [(dy, dx) for dy in range(5) for dx in range(5)
                if np.array_equal(padded[:, dy:dy + 4, dx:dx + 5], out[i])]
        assert hits, f"image {i} is not a window of its padded original"
        seen.add(hits[0])
    assert len(seen) == 25  # every offset, including the extremes, occurs


def test_channel_stats_and_bad_normalisation():
    x, y = _toy(8)
    mean, std = channel_stats(x)
    out = np.concatenate([b["image"] for b in Loader({"image": x, "label": y}, 3, mean=mean, std=std)])
    np.testing.assert_allclose(out.mean(axis=(0, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(out.std(axis=(0, 2, 3)), 1, atol=1e-5)
    with pytest.raises(NetdslError, match="3 values, the images have 2 channels"):
        Loader({"image": x}, 3, mean=[0, 0, 0])
    with pytest.raises(NetdslError, match="positive"):
        Loader({"image": x}, 3, std=[1, 0])
