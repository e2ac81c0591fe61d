"""Checkpoints: exact round trip, name/shape checks, spec hash, crash safety."""
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from netdsl.errors import NetdslError
from netdsl.runtime import checkpoint as ck
from netdsl.runtime.checkpoint import load_checkpoint, load_weights, save_checkpoint
from netdsl.runtime.optim import make_optimizer

SPEC = "net tiny { conv 3 -> 4 }\n"


def _params(seed=0):
    rng = np.random.default_rng(seed)
    p = {"layer1.0.conv1.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
         "layer1.0.bn1.running_var": rng.random(4).astype(np.float32),
         "fc.bias": rng.standard_normal(10).astype(np.float32)}
    # Values whose bits a careless round trip would change.
    p["fc.bias"][:4] = [np.nan, -0.0, np.inf, np.float32(1e-45)]
    return p


def test_round_trip_is_bit_identical(tmp_path):
    params = _params()
    opt = make_optimizer("adam", params, lr=1e-3)
    opt.step({k: np.ones_like(v) for k, v in params.items()})
    rng = np.random.default_rng(42)
    rng.random(3)  # advance it, so restoring the seed alone would not suffice
    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, params, opt.state_dict(), step=17, epoch=2, rng=rng, spec_text=SPEC,
                    extra={"best_acc": 0.5})
    c = load_checkpoint(path, spec_text=SPEC)
    assert (c.step, c.epoch, c.extra) == (17, 2, {"best_acc": 0.5})
    assert c.params.keys() == params.keys()
    for k, v in params.items():
        assert c.params[k].dtype == v.dtype and c.params[k].tobytes() == v.tobytes()
    for k, v in opt.state_dict().items():
        assert c.opt_state[k].tobytes() == v.tobytes() and c.opt_state[k].dtype == v.dtype
    np.testing.assert_array_equal(c.make_rng().random(5), rng.random(5))

    fresh = _params(seed=1)
    ids = {k: id(v) for k, v in fresh.items()}
    load_weights(fresh, c, allow_nonfinite=True)  # the NaN/inf are there to test bits, not a diverged run
    assert all(id(v) == ids[k] for k, v in fresh.items())  # in place: optimisers keep their references
    assert all(fresh[k].tobytes() == params[k].tobytes() for k in params)
    # The file is a plain npz that needs no pickle.
    with np.load(path, allow_pickle=False) as z:
        assert "param/fc.bias" in z.files and "opt/step" in z.files


def test_mt19937_state_round_trips(tmp_path):
    rng = np.random.Generator(np.random.MT19937(5))
    save_checkpoint(tmp_path / "c.npz", {}, rng=rng)
    np.testing.assert_array_equal(load_checkpoint(tmp_path / "c.npz").make_rng().integers(0, 1 << 30, 8),
                                  rng.integers(0, 1 << 30, 8))


def test_wrong_names_and_shapes_listed_together(tmp_path):
    saved = _params()
    saved["head.weight"] = saved.pop("fc.bias")
    saved["layer1.0.conv1.weight"] = saved["layer1.0.conv1.weight"][:2]
    save_checkpoint(tmp_path / "c.npz", saved)
    target = _params(seed=3)
    before = {k: v.copy() for k, v in target.items()}
    with pytest.raises(NetdslError) as e:
        load_weights(target, load_checkpoint(tmp_path / "c.npz"))
    err = e.value
    assert str(tmp_path / "c.npz") in err.message
    assert "1 missing, 1 unexpected, 1 wrong-shaped" in err.message
    notes = "\n".join(n.message for n in err.notes)
    assert "missing: fc.bias" in notes and "unexpected: head.weight" in notes
    assert "wrong shape: layer1.0.conv1.weight is (2, 3, 3, 3), expected (4, 3, 3, 3)" in notes
    assert all(np.array_equal(target[k], before[k], equal_nan=True) for k in target)  # nothing half-loaded


def test_spec_hash_mismatch(tmp_path):
    save_checkpoint(tmp_path / "c.npz", _params(), spec_text=SPEC)
    with pytest.raises(NetdslError, match="different spec"):
        load_checkpoint(tmp_path / "c.npz", spec_text=SPEC + "# edited\n")
    assert load_checkpoint(tmp_path / "c.npz", spec_text="other", allow_spec_mismatch=True).step == 0


def test_unreadable_files_are_user_errors(tmp_path):
    with pytest.raises(NetdslError, match="not found"):
        load_checkpoint(tmp_path / "none.npz")
    (tmp_path / "junk.npz").write_bytes(b"garbage")
    with pytest.raises(NetdslError, match="not an .npz file"):
        load_checkpoint(tmp_path / "junk.npz")
    np.savez(tmp_path / "plain.npz", a=np.zeros(3))
    with pytest.raises(NetdslError, match="not a netdsl checkpoint"):
        load_checkpoint(tmp_path / "plain.npz")
    with pytest.raises(NetdslError, match="cannot write"):
        save_checkpoint(tmp_path / "no" / "such" / "dir.npz", _params())


def _ls(d):
    return sorted(os.listdir(d))


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, _params(), step=1)

    def half_then_fail(f, **arrays):
        f.write(b"PK\x03\x04 partial zip data")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck.np, "savez", half_then_fail)
    with pytest.raises(NetdslError, match="No space left"):
        save_checkpoint(path, _params(seed=9), step=2)
    monkeypatch.undo()
    assert _ls(tmp_path) == ["ckpt.npz"]  # temp file removed
    assert load_checkpoint(path).step == 1


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    """Ctrl-C (or any non-OSError) mid-write: the temp file goes, the exception goes on."""
    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, _params(), step=1)

    def half_then_interrupt(f, **arrays):
        f.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(ck.np, "savez", half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, _params(seed=9), step=2)
    monkeypatch.undo()
    assert _ls(tmp_path) == ["ckpt.npz"] and load_checkpoint(path).step == 1


def test_unwritable_places_name_the_path(tmp_path):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_dir").mkdir()
    for where, why in ((tmp_path / "a_file" / "c.npz", "Not a directory"),     # parent is a file
                       (tmp_path / "a_dir", "Is a directory"),                  # target is a directory
                       (tmp_path / "none" / "c.npz", "No such file or directory"),
                       ("/proc/self/c.npz", "")):                               # cannot be created, even as root
        with pytest.raises(NetdslError) as e:
            save_checkpoint(where, _params())
        assert e.value.message.startswith(f"cannot write {where}: ") and why in e.value.message
    assert _ls(tmp_path) == ["a_dir", "a_file"] and _ls(tmp_path / "a_dir") == []   # no temp left behind
    long = tmp_path / ("c" * 251 + ".npz")   # the longest name a file system takes: its temp name must fit too
    save_checkpoint(long, _params())
    assert load_checkpoint(long).step == 0 and _ls(tmp_path) == ["a_dir", "a_file", long.name]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_directory_names_the_path(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(NetdslError, match=f"cannot write {ro / 'c.npz'}: Permission denied"):
            save_checkpoint(ro / "c.npz", _params())
    finally:
        ro.chmod(0o755)


def test_metadata_that_would_not_read_back_is_not_written(tmp_path):
    for kw in ({"step": -1}, {"epoch": 2 ** 63}):
        with pytest.raises(ValueError, match="would not read back"):
            save_checkpoint(tmp_path / "c.npz", _params(), **kw)
    with pytest.raises(TypeError, match="spec_text must be str"):
        save_checkpoint(tmp_path / "c.npz", _params(), spec_text=b"net t {}")
    assert _ls(tmp_path) == []


def test_restore_rng_in_place(tmp_path):
    rng = np.random.default_rng(3)
    rng.random(4)
    save_checkpoint(tmp_path / "c.npz", {}, rng=rng)
    c = load_checkpoint(tmp_path / "c.npz")
    target = np.random.default_rng(99)
    held = target.bit_generator   # a Loader holds the Generator: it must be the same object after
    c.restore_rng(target)
    assert target.bit_generator is held
    np.testing.assert_array_equal(target.random(3), rng.random(3))
    save_checkpoint(tmp_path / "m.npz", {}, rng=np.random.Generator(np.random.MT19937(1)))
    with pytest.raises(NetdslError, match="holds a MT19937 random-generator state; this run draws from PCG64"):
        load_checkpoint(tmp_path / "m.npz").restore_rng(target)
    save_checkpoint(tmp_path / "n.npz", {})
    with pytest.raises(NetdslError, match="holds no random-generator state"):
        load_checkpoint(tmp_path / "n.npz").restore_rng(target)


def test_nonfinite_weights_refused_unless_allowed(tmp_path):
    save_checkpoint(tmp_path / "c.npz", _params())   # fc.bias holds NaN and inf
    target = _params(seed=1)
    before = {k: v.copy() for k, v in target.items()}
    with pytest.raises(NetdslError, match=r"non-finite weights: fc.bias \(2 NaN/inf\)"):
        load_weights(target, load_checkpoint(tmp_path / "c.npz"))
    assert all(np.array_equal(target[k], before[k], equal_nan=True) for k in target)   # nothing copied
    load_weights(target, load_checkpoint(tmp_path / "c.npz"), allow_nonfinite=True)
    assert np.isnan(target["fc.bias"][0])


def test_optimiser_state_checked_before_anything_changes():
    params = {"w": np.ones((2, 3), np.float32), "b": np.ones(3, np.float32)}
    opt = make_optimizer("adam", params, lr=0.1)
    opt.step({"w": np.ones((2, 3), np.float32)})
    good = opt.state_dict()
    cases = [({**good, "exp_avg/w": np.zeros(3, np.float32)}, "'exp_avg/w' has shape (3,), its parameter (2, 3)"),
             ({k: v for k, v in good.items() if k != "exp_avg_sq/w"}, "'w' has exp_avg but not exp_avg_sq"),
             ({**good, "step": np.array([1, 2])}, "'step' is int64 [2]"),
             ({**good, "step": np.array(2 ** 64 - 1, np.uint64)}, "= 18446744073709551615"),
             ({**good, "momentum/w": np.zeros((2, 3), np.float32)}, "Adam keeps exp_avg, exp_avg_sq"),
             ({**good, "exp_avg/b": np.zeros(3, np.int32), "exp_avg_sq/b": np.zeros(3, np.float32)},
              "'exp_avg/b' is int32, expected floating point")]
    fresh = make_optimizer("adam", {k: v.copy() for k, v in params.items()}, lr=0.1)
    for state, phrase in cases:
        with pytest.raises(NetdslError) as e:
            fresh.load_state_dict(state, "checkpoint X.npz")
        assert e.value.message.startswith("checkpoint X.npz (optimiser state) is damaged: ") and phrase in e.value.message
        assert fresh.steps == 0 and fresh.state == {"exp_avg": {}, "exp_avg_sq": {}}
    with pytest.raises(NetdslError) as e:
        fresh.load_state_dict({})
    assert e.value.message.startswith("optimiser state is damaged: no 'step' entry")
    fresh.load_state_dict(good)
    assert fresh.steps == 1 and fresh.state["exp_avg"]["w"].tobytes() == good["exp_avg/w"].tobytes()


def test_killed_save_keeps_previous_checkpoint(tmp_path):
    """SIGKILL a process while its temp file holds part of the data, before the rename."""
    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, _params(), step=1)
    child = textwrap.dedent(f"""
        import os, sys, time, numpy as np
        from netdsl.runtime import checkpoint as ck
        real_fsync = os.fsync
        def stall(fd):  # data written, not yet renamed: the worst moment to die
            print("written", flush=True)
            time.sleep(60)
        ck.os.fsync = stall
        ck.save_checkpoint({str(path)!r}, {{"w": np.ones((512, 1024), np.float32)}}, step=2)
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "written"
        temps = [n for n in _ls(tmp_path) if n != "ckpt.npz"]
        assert len(temps) == 1 and os.path.getsize(tmp_path / temps[0]) > 1 << 20
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    c = load_checkpoint(path)
    assert c.step == 1 and c.params.keys() == _params().keys()
    leftovers = [n for n in _ls(tmp_path) if n != "ckpt.npz"]
    # The orphan cannot be mistaken for a checkpoint: hidden, and not *.npz.
    assert leftovers and all(n.startswith(".") and n.endswith(".tmp") for n in leftovers)


# ---------------------------------------------------------------- run outputs (progress.py)
# These share the atomic writer above; they live here because they are the other
# files a run leaves behind.

def _bar_output(is_tty, steps, total=100):
    import io
    from netdsl.runtime.progress import ProgressBar
    t = [0.0]
    out = io.StringIO()
    with ProgressBar(total, "train", stream=out, is_tty=is_tty, log_every_s=10, clock=lambda: t[0]) as bar:
        for i in range(steps):
            t[0] += 0.5
            bar.update(loss=2.0 / (i + 1), images=64)
    return out.getvalue()


def test_progress_log_lines_and_terminal_redraws():
    log = _bar_output(False, 100)
    lines = log.splitlines()
    assert "\r" not in log and len(lines) == 5  # one line per 10 s of a 50 s run
    assert lines[0].startswith("train  [####") and "20/100" in lines[0] and "128 img/s" in lines[0]
    assert "ETA 0:00:40" in lines[0] and "took 0:00:50" in lines[-1] and "loss 0.0200" in lines[-1]
    tty = _bar_output(True, 30)  # stopped early: the last state is still shown
    assert tty.count("\r") == 30 and tty.endswith("\n") and "30/100" in tty.rsplit("\r", 1)[1]


def test_metrics_log_and_plot(tmp_path):
    from netdsl.runtime.progress import MetricsLog, plot_metrics, read_metrics
    path = tmp_path / "metrics.jsonl"
    with MetricsLog(path) as m:
        for step in range(3):
            m.log(step=np.int64(step), train_loss=np.float32(1.0 / (step + 1)), test_acc=0.5, lr=float("nan"))
    with open(path, "a") as f:
        f.write('{"step": 3, "train_lo')  # killed mid-write
    recs = read_metrics(path)
    assert [r["step"] for r in recs] == [0, 1, 2] and recs[0]["lr"] is None
    png = tmp_path / "curves.png"
    plot_metrics(path, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and _ls(tmp_path) == ["curves.png", "metrics.jsonl"]
    (tmp_path / "empty.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(NetdslError, match="no loss or accuracy"):
        plot_metrics(tmp_path / "empty.jsonl", png)
    with pytest.raises(NetdslError, match="not found"):
        plot_metrics(tmp_path / "none.jsonl", png)


# ---------------------------------------------------------------- resume end to end

def _train(epochs, params, opt, rng, x, y):
    from netdsl.runtime.loader import Loader
    from netdsl.runtime.optim import clip_grad_norm
    loader = Loader({"x": x, "y": y}, 8, rng=rng, shuffle=True, crop_padding=1, flip=True, mean=[0.5], std=[0.25])
    for _ in range(epochs):
        for b in loader:  # softmax regression, gradients by hand
            xb, yb = b["x"], b["y"]
            logits = xb.reshape(len(xb), -1) @ params["fc.weight"].T + params["fc.bias"]
            p = np.exp(logits - logits.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            p[np.arange(len(yb)), yb] -= 1
            grads = {"fc.weight": (p.T @ xb.reshape(len(xb), -1)) / len(xb), "fc.bias": p.mean(0)}
            clip_grad_norm(grads, 1.0)
            opt.step(grads)


def test_resume_from_checkpoint_is_bit_identical(tmp_path):
    from netdsl.runtime.optim import make_schedule
    data_rng = np.random.default_rng(0)
    x, y = data_rng.random((30, 1, 4, 4), dtype=np.float32), data_rng.integers(0, 3, 30)

    def fresh():
        params = {"fc.weight": np.zeros((3, 16), np.float32), "fc.bias": np.zeros(3, np.float32)}
        opt = make_optimizer("sgd", params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3,
                             schedule=make_schedule("cosine", t_max=12, warmup_steps=3))
        return params, opt

    straight, opt = fresh()
    _train(3, straight, opt, np.random.default_rng(7), x, y)

    params, opt = fresh()
    rng = np.random.default_rng(7)
    _train(1, params, opt, rng, x, y)
    save_checkpoint(tmp_path / "c.npz", params, opt.state_dict(), step=opt.steps, epoch=1, rng=rng, spec_text=SPEC)
    del params, opt, rng
    c = load_checkpoint(tmp_path / "c.npz", spec_text=SPEC)
    params, opt = fresh()
    load_weights(params, c)
    opt.load_state_dict(c.opt_state)
    _train(2, params, opt, c.make_rng(), x, y)
    assert opt.steps == 12
    for k in straight:
        assert params[k].tobytes() == straight[k].tobytes(), k
    assert not np.array_equal(straight["fc.weight"], 0)
