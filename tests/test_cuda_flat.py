"""One optimiser launch for all parameters on CUDA (runtime/cuda_flat.py), under Numba's
CUDA simulator (NUMBA_ENABLE_CUDASIM=1 set before numba is imported: this file runs
itself as a script in a subprocess, as test_cuda_sim.py does).

A CUDA model's trainable parameters are views of one device buffer, the gradient kernels
write every parameter's gradient into its view of a second one, and the optimiser keeps
its state in buffers laid out the same way; one update kernel over the buffers then
replaces one per parameter. Checked here: every gradient of a small CNN (conv with
bias, batch norm, linear) lands in its view and equals the CPU's; three clipped steps of
SGD (momentum, Nesterov, weight decay), plain SGD, Adam and AdamW give, bit for bit, the
parameters and state of the per-parameter kernels fed the same gradients, and match the
CPU optimiser (runtime.optim) to 1e-5; state_dict / load_state_dict round trip through
the flat buffers; gradients that are not the model's views fall back to one launch per
parameter; kernel launches per ResNet-18 training step (32x32, batch 64) counted
with every kernel a no-op (the simulator's launch replaced by a counter); and (`resume`,
a second subprocess) a CUDA run stopped and resumed equals an uninterrupted one.

On a GPU: `python tests/test_cuda_flat.py device` runs the same checks on the device.
"""
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import script_results

HERE = Path(__file__).resolve()


@pytest.fixture(scope="module")
def both():
    return script_results(HERE, {"sim": True, "resume": True}, timeout=600)


@pytest.fixture(scope="module")
def results(both):
    return both["sim"]


def test_every_gradient_is_written_into_the_flat_buffer(results):
    r = results["train"]
    assert r["in_place"] and all(r["in_place"].values()), r["in_place"]
    assert r["loss"] <= 1e-4 and max(r["grads"].values()) <= 1e-4, r


def test_one_launch_equals_per_parameter_kernels_bit_for_bit(results):
    for name, r in results["optim"].items():
        assert r["flat_path"], name
        assert r["params_equal"] and r["state_equal"], (name, r)
        assert r["state_keys_equal"], name


def test_flat_optimiser_matches_the_cpu_optimiser(results):
    for name, r in results["optim"].items():
        assert r["cpu_params"] <= 1e-5 and r["cpu_state"] <= 1e-5 and r["norm"] <= 1e-5, (name, r)


def test_launches_per_optimiser_step(results):
    for name, r in results["optim"].items():
        assert r["launches_flat"] == 1, (name, r)       # after the first step (state made)
        assert r["launches_per_param"] == r["params"], (name, r)
        assert r["clip_flat"] == 2, (name, r)           # the norm's reduction, the scaling


def test_state_dict_round_trip(results):
    for name, r in results["optim"].items():
        assert r["round_trip_state"] and r["round_trip_step"], (name, r)


def test_gradients_elsewhere_fall_back_to_one_launch_per_parameter(results):
    r = results["fallback"]
    assert not r["flat_path"] and r["params_equal"] and r["launches"] == r["params"], r


def test_resnet18_launches_per_training_step(results):
    r = results["resnet18"]
    assert r["in_place"] and r["grads"] == 62
    assert r["flat"]["opt"] == 1 and r["flat"]["clip"] == 2 and r["flat"]["finite"] == 1
    assert r["per_param"]["opt"] == 62 and r["per_param"]["clip"] == 124 and r["per_param"]["finite"] == 62


def test_resume_on_cuda_continues_bit_identically(both):
    """Trainer.resume on CUDA writes the checkpoint's weights into the arrays the optimiser
    updates (before, it replaced the model's arrays and the optimiser kept stepping the old
    ones: the resumed run drifted from an uninterrupted one)."""
    r = both["resume"]
    assert r["optimiser_holds_model_arrays"] and r["steps"] == r["expect_steps"]
    assert r["max_diff"] == 0.0, r


# ---------------------------------------------------------------- the subprocess side

CNN = """
network small(classes = 5) {
  input image: f32[N, 2, 6, 6]
  input label: i64[N]
  logits = image -> conv(4, k=3, p=1) -> relu -> bn -> maxpool(k=2, s=2) -> flatten -> linear(classes)
  output logits
  loss ce = cross_entropy(logits, label)
}
"""

OPTIMISERS = (("sgd_nesterov", "sgd", {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-2, "nesterov": True}),
              ("sgd", "sgd", {"lr": 0.1}),
              ("adam", "adam", {"lr": 0.01, "weight_decay": 1e-2}),
              ("adamw", "adamw", {"lr": 0.01, "weight_decay": 1e-2}))


class Launches:
    """Counts kernel launches (under the simulator: its kernel's [grid, block])."""

    def __init__(self, noop=False):
        self.n = 0
        if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
            return      # on a device nothing is counted (the launch checks are the simulator's)
        from numba.cuda.simulator.kernel import FakeCUDAKernel
        orig = FakeCUDAKernel.__getitem__

        def getitem(k, cfg):
            self.n += 1
            return (lambda *a: None) if noop else orig(k, cfg)
        FakeCUDAKernel.__getitem__ = getitem

    def since(self, mark):
        return self.n - mark


def rel(got, want):
    got = got.copy_to_host() if hasattr(got, "copy_to_host") else np.asarray(got)
    d = np.abs(got.astype(np.float64) - want)
    return float(d.max() / max(np.abs(want).max(), 1e-6)) if d.size else 0.0


def host(a):
    return a.copy_to_host() if hasattr(a, "copy_to_host") else np.asarray(a)


def _graph(text):
    import tempfile
    from netdsl.lang.elaborate import elaborate
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "net.net"
        p.write_text(text)
        return elaborate(str(p), None, {})[0]


def _model():
    from netdsl.runtime.model import Model
    g = _graph(CNN)
    cpu_m = Model(g, seed=3)
    gpu_m = Model(g, params={k: v.copy() for k, v in cpu_m.params.items()}, device="cuda")
    rng = np.random.default_rng(4)
    feeds = {"image": rng.standard_normal((3, 2, 6, 6)).astype(np.float32), "label": np.array([1, 4, 0])}
    return cpu_m, gpu_m, feeds


def main_train(cpu_m, gpu_m, feeds):
    tc, _, _, gc = cpu_m.train_step(feeds)
    tg, _, _, gg = gpu_m.train_step(feeds)
    return gc, {"loss": abs(tg - tc) / abs(tc), "grads": {k: rel(gg[k], gc[k]) for k in gc},
                "in_place": {k: gg[k] is gpu_m.flat.grads.get(k) for k in gc}}


def _optimiser(count, gpu_m, gc, name, kind, kw):
    """Three clipped steps: the flat path (the model's buffers), the per-parameter kernels
    fed the same clipped gradients, and the CPU optimiser."""
    from netdsl.runtime import clip_grad_norm, make_optimizer
    from netdsl.runtime.cuda import DeviceOptimizer, clip_grad_norm as clip_device, upload
    f = gpu_m.flat
    start = {k: host(v) for k, v in f.params.items()}
    for k, v in start.items():          # every optimiser starts from the same weights
        f.params[k].copy_to_device(v)
    hp = {k: v.copy() for k, v in start.items()}
    pp = {k: upload(v) for k, v in start.items()}
    cpu = make_optimizer(kind, hp, **kw)
    flat = DeviceOptimizer(make_optimizer(kind, dict(f.params), **kw), dict(f.params), f)
    per = DeviceOptimizer(make_optimizer(kind, dict(pp), **kw), pp)
    out = {"params": len(start), "flat_path": True, "norm": 0.0}
    for _ in range(3):
        for k, v in gc.items():
            f.grads[k].copy_to_device(v)
        hg = {k: v.copy() for k, v in gc.items()}
        out["flat_path"] &= flat._flat_ok(f.grads)
        mark = count.n
        n_dev = clip_device(dict(f.grads), 0.05, f)
        out["clip_flat"] = count.since(mark)
        n_cpu = clip_grad_norm(hg, 0.05)
        out["norm"] = max(out["norm"], abs(n_dev - n_cpu) / n_cpu)
        pg = {k: upload(host(v)) for k, v in f.grads.items()}     # the same clipped gradients
        mark = count.n
        flat.step(dict(f.grads))
        out["launches_flat"] = count.since(mark)
        mark = count.n
        per.step(pg)
        out["launches_per_param"] = count.since(mark)
        cpu.step(hg)
    sf, sp, sc = flat.state_dict(), per.state_dict(), cpu.state_dict()
    out["params_equal"] = all(np.array_equal(host(f.params[k]), host(pp[k])) for k in pp)
    out["state_keys_equal"] = set(sf) == set(sp) == set(sc)
    out["state_equal"] = out["state_keys_equal"] and all(np.array_equal(sf[k], sp[k]) for k in sp)
    out["cpu_params"] = max(rel(f.params[k], hp[k]) for k in hp)
    out["cpu_state"] = max([rel(sf[k], sc[k]) for k in sc if k != "step"], default=0.0)
    # round trip: a new optimiser loaded from the state continues exactly as the first does
    before = {k: host(v) for k, v in f.params.items()}
    for k, v in gc.items():
        f.grads[k].copy_to_device(v)
    flat.step(dict(f.grads))
    after = {k: host(v) for k, v in f.params.items()}
    for k, v in before.items():
        f.params[k].copy_to_device(v)
    again = DeviceOptimizer(make_optimizer(kind, dict(f.params), **kw), dict(f.params), f)
    again.load_state_dict(sf)
    s2 = again.state_dict()
    out["round_trip_state"] = set(s2) == set(sf) and all(np.array_equal(s2[k], sf[k]) for k in sf)
    again.step(dict(f.grads))
    out["round_trip_step"] = all(np.array_equal(host(f.params[k]), after[k]) for k in after)
    return out


def _fallback(count, gpu_m, gc):
    """Gradients that are not the model's views: one launch per parameter, same result."""
    from netdsl.runtime import make_optimizer
    from netdsl.runtime.cuda import DeviceOptimizer, upload
    f = gpu_m.flat
    start = {k: host(v) for k, v in f.params.items()}
    pp = {k: upload(v) for k, v in start.items()}
    kw = {"lr": 0.1, "momentum": 0.9}
    flat = DeviceOptimizer(make_optimizer("sgd", dict(f.params), **kw), dict(f.params), f)
    per = DeviceOptimizer(make_optimizer("sgd", dict(pp), **kw), pp)
    grads = {k: upload(v) for k, v in gc.items()}
    ok = flat._flat_ok(grads)
    for _ in range(2):      # the second step is counted (the first makes the momentum buffers)
        mark = count.n
        flat.step(grads)
        n = count.since(mark)
        per.step({k: upload(v) for k, v in gc.items()})
    return {"flat_path": ok, "launches": n, "params": len(gc),
            "params_equal": all(np.array_equal(host(f.params[k]), host(pp[k])) for k in pp)}


def main_resnet18():
    """Launches per ResNet-18 training step (bench_gpu's: 32x32, batch 64, SGD with momentum,
    clipping), kernels made no-ops: one-launch paths against per-parameter ones."""
    sys.path.insert(0, str(HERE.parent.parent / "benchmarks"))
    import bench_gpu
    from netdsl.runtime import make_optimizer
    from netdsl.runtime import cuda as rc
    from netdsl.runtime.cuda_flat import DeviceParams
    from netdsl.runtime.model import Model
    count = Launches(noop=True)
    Model._blame = lambda *a: None      # no-op kernels leave garbage behind: no blame
    m = Model(_graph(bench_gpu.spec("resnet18")), seed=0, device="cuda")
    rng = np.random.default_rng(0)
    feeds = {"image": rng.standard_normal((64, 3, 32, 32)).astype(np.float32), "label": rng.integers(0, 10, 64)}
    kw = {"lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4}
    m.params    # drawn and uploaded: m.flat exists
    out = {}
    holds, holds_grads = DeviceParams.holds, DeviceParams.holds_grads
    for tag, flat in (("per_param", None), ("flat", m.flat)):
        if flat is None:    # what the code did before: every array on its own
            DeviceParams.holds = DeviceParams.holds_grads = lambda *a: False
        opt = rc.DeviceOptimizer(make_optimizer("sgd", m.trainable(), **kw), m.trainable(), flat)
        finite = rc.all_finite
        for _ in range(2):      # the second step: momentum buffers exist
            mark = count.n
            rc.all_finite = lambda arrays: (setattr(count, "finite", count.n), finite(arrays))[1]
            _, _, _, grads = m.train_step(feeds)
            rc.all_finite = finite
            step, fin = count.since(mark), count.n - count.finite
            mark = count.n
            rc.clip_grad_norm(grads, 1e-30, flat)
            clip = count.since(mark)
            mark = count.n
            opt.step(grads)
            o = count.since(mark)
        out[tag] = {"forward_backward": step - fin, "finite": fin, "clip": clip, "opt": o, "total": step + clip + o}
        out["in_place"] = holds_grads(m.flat, grads)
        out["grads"] = len(grads)
        DeviceParams.holds, DeviceParams.holds_grads = holds, holds_grads
    return out


RESUME = """
network tiny(classes = 3) {
  input image: f32[N, 1, 4, 4]
  input label: i64[N]
  logits = image -> conv(2, k=3, p=1) -> bn -> relu -> flatten -> linear(classes)
  output logits
  loss ce = cross_entropy(logits, label)
  train { optimizer = sgd(lr = 0.1, momentum = 0.9) epochs = 2 batch = 4 data = synthetic(size = 8) }
}
"""


def main_resume():
    """An uninterrupted 2-epoch CUDA run against one stopped after epoch 1 and resumed."""
    import tempfile
    from netdsl.runtime.train import Trainer
    with tempfile.TemporaryDirectory() as d:
        g = _graph(RESUME)

        def trainer(out):
            return Trainer(g, dict(g.train), f"{d}/{out}", RESUME, log=lambda s: None, device="cuda")
        whole = trainer("whole")
        whole.fit(progress=False)
        trainer("split").fit(progress=False, until=1)
        rest = trainer("split")
        rest.resume()
        holds = all(rest.opt.params[k] is v for k, v in rest.model.trainable().items())
        rest.fit(progress=False)
        wp, rp = whole.model.host_params(), rest.model.host_params()
        return {"optimiser_holds_model_arrays": holds, "steps": rest.model.step, "expect_steps": whole.model.step,
                "max_diff": max(float(np.abs(wp[k] - rp[k]).max()) for k in wp)}


def main():
    count = Launches()
    cpu_m, gpu_m, feeds = _model()
    gc, train = main_train(cpu_m, gpu_m, feeds)
    optim = {name: _optimiser(count, gpu_m, gc, name, kind, kw) for name, kind, kw in OPTIMISERS}
    return {"train": train, "optim": optim, "fallback": _fallback(count, gpu_m, gc)}


if __name__ == "__main__":
    import warnings
    warnings.simplefilter("ignore")
    sys.path.insert(0, str(HERE.parent))
    if sys.argv[1] == "resume":
        print(json.dumps(main_resume()))
        sys.exit()
    res = main()
    if sys.argv[1] == "sim":    # counted with no-op kernels: the simulator only
        res["resnet18"] = main_resnet18()
    print(json.dumps(res))
