"""Batch norm fused with the elementwise kernel after it (ReLU, residual add + ReLU) on CUDA,
as the CPU plan fuses it (runtime/fused.py; the planner's `norms="heads"` on CUDA).

`sim`: under Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1 set before numba is imported:
a subprocess running this file, as test_cuda_sim.py does), a small residual network
(conv-bn-relu-conv-bn, + shortcut, relu) on device="cuda" against the CPU, both fused:
the CUDA plan has norm-headed steps (bn+relu, bn+add+relu); one training step's loss,
logits, every gradient and the running statistics, then inference on the running
statistics, to 1e-4; the statistics-and-factor kernel and the factor kernel (a replay,
inference) against the CPU's batch statistics and gamma * invstd.
`device` (scripts/gpu-check): the `sim` checks on a real GPU.
`ptx`: the generated norm-headed kernels (bn+relu, bn+add+relu) compile with NVVM with
no float64 instruction (the hand-written _bn_stats / _bn_scale are in
netdsl.kernels.cuda.REGISTRY, so tests/test_cuda_ptx.py compiles them).
"""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import script_results

HERE = Path(__file__).resolve()
TOL = 1e-4


@pytest.fixture(scope="module")
def results():
    return script_results(HERE, {"sim": True, "ptx": False}, timeout=600)


def test_cuda_plan_fuses_norm_heads_not_tails(results):
    r = results["sim"]["plan"]
    assert {"bn+relu", "bn+add+relu"} <= set(r["heads"]), r
    assert r["tails"] == 0, r       # a norm gradient stays the hand-written kernels on CUDA
    assert r["replayed_heads"] >= 1, r      # the backward's replay of a norm (remat.py) is fused too


def test_fused_training_step_matches_cpu(results):
    r = results["sim"]["train"]
    assert r["grads"] and set(r["grads"]) == set(r["expect_grads"])
    assert r["loss"] <= TOL and r["logits"] <= TOL and r["running"] <= TOL, r
    worst = max(r["grads"], key=r["grads"].get)
    assert r["grads"][worst] <= TOL, (worst, r["grads"][worst])
    assert r["in_place"], "every gradient in the model's gradient buffer"


def test_fused_inference_matches_cpu(results):
    assert results["sim"]["infer"] <= TOL


def test_statistics_and_factor_kernels_match_cpu(results):
    errs = results["sim"]["kernels"]
    bad = {k: v for k, v in errs.items() if not v <= 1e-6}
    assert not bad and len(errs) == 8, errs


def test_norm_headed_kernels_compile_to_ptx_without_float64(results):
    r = results["ptx"]
    assert set(r) == {"bn_relu", "bn_add_relu"}
    assert all(v == [] for v in r.values()), r


# ---------------------------------------------------------------- the subprocess side

RESNET = """
network tiny_res(classes = 3) {
  input image: f32[N, 4, 6, 6]
  input label: i64[N]
  h = image -> conv(4, k=3, p=1, bias=false) -> bn -> relu -> conv(4, k=3, p=1, bias=false) -> bn
  y = relu(h + image)
  logits = y -> global_avgpool -> flatten -> linear(classes)
  output logits
  loss ce = cross_entropy(logits, label)
}
"""


def rel(got, want):
    got = got.copy_to_host() if hasattr(got, "copy_to_host") else np.asarray(got)
    want = np.asarray(want)
    assert got.shape == want.shape, (got.shape, want.shape)
    d = np.abs(got.astype(np.float64) - want)
    return float(d.max() / max(np.abs(want).max(), 1e-6)) if d.size else 0.0


def _graph():
    import tempfile
    from netdsl.lang.elaborate import elaborate
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "tiny_res.net"
        p.write_text(RESNET)
        return elaborate(str(p), None, {})[0]


def _plan(m):
    """The fused steps of the CUDA training program: their op chains, norm-headed or tailed."""
    prog = next(iter(m._programs.values()))
    chains = ["+".join(n.op for n in s.nodes) for s in prog.plan.steps if len(s.nodes) > 1]
    return {"heads": sorted({c for c in chains if c.startswith("bn+")}),
            "tails": sum(c.endswith("+bn_grad") for c in chains),
            "replayed_heads": sum(s.nodes[0].op == "bn" and s.nodes[0].fwd is not None and len(s.nodes) > 1
                                  for s in prog.plan.steps)}


def _kernels():
    from netdsl.kernels import cpu as C, cuda as G
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((3, 5, 4, 4)) * 2 + 3).astype(np.float32)
    gamma = rng.standard_normal(5).astype(np.float32)
    rm, rv = rng.standard_normal(5).astype(np.float32), (rng.random(5) + 0.5).astype(np.float32)
    crm, crv, grm, grv = rm.copy(), rv.copy(), G.to_device(rm), G.to_device(rv)
    cm, ci = C.batchnorm_stats(x, crm, crv, 0.1, 1e-5)
    gm, gi, ga = G.batchnorm_stats_scale(G.to_device(x), G.to_device(gamma), grm, grv, 0.1, 1e-5)
    _, _, ga1 = G.batchnorm_stats_scale(G.to_device(x))              # no gamma, no running stats
    gi2, ga2 = G.batchnorm_scale(G.to_device(gamma), invstd=gi)      # a replay: from the saved invstd
    ri = (1.0 / np.sqrt(rv.astype(np.float64) + 1e-5)).astype(np.float32)
    gi3, ga3 = G.batchnorm_scale(G.to_device(gamma), running_var=G.to_device(rv), eps=1e-5)
    return {"mean": rel(gm, cm), "invstd": rel(gi, ci), "scale": rel(ga, gamma * ci), "scale_no_gamma": rel(ga1, ci),
            "running": max(rel(grm, crm), rel(grv, crv)), "replay": rel(ga2, gamma * gi.copy_to_host()),
            "infer_invstd": rel(gi3, ri), "infer_scale": rel(ga3, gamma * ri)}


def main_sim():
    from netdsl.runtime.model import Model
    g = _graph()
    cpu_m = Model(g, seed=5)
    gpu_m = Model(g, params={k: v.copy() for k, v in cpu_m.params.items()}, device="cuda")
    rng = np.random.default_rng(6)
    feeds = {"image": rng.standard_normal((2, 4, 6, 6)).astype(np.float32), "label": np.array([2, 0])}
    tc, _, oc, gc = cpu_m.train_step(feeds)
    tg, _, og, gg = gpu_m.train_step(feeds)
    host = gpu_m.host_params()
    train = {"loss": abs(tg - tc) / abs(tc), "logits": rel(og["logits"], oc["logits"]),
             "grads": {k: rel(gg[k], gc[k]) for k in gc}, "expect_grads": sorted(cpu_m.trainable()),
             "running": max(rel(host[k], cpu_m.params[k]) for k in host if "running" in k),
             "in_place": gpu_m.flat.holds_grads(gg)}
    plan = _plan(gpu_m)
    infer = rel(gpu_m.infer({"image": feeds["image"]})["logits"], cpu_m.infer({"image": feeds["image"]})["logits"])
    return {"plan": plan, "train": train, "infer": infer, "kernels": _kernels()}


def main_ptx():
    """The norm-headed chains as runtime/fused.py builds them: (x - mean) * a + b, then
    ReLU (and a residual added first), for CUDA and float32."""
    from netdsl.kernels.codegen import Fused, compile_kernel
    head = [("sub", "x", "bn_m"), ("mul", 0, "bn_a"), ("add", 1, "bn_b")]
    chans = dict.fromkeys(("bn_m", "bn_a", "bn_b"), "channel")
    chains = {"bn_relu": ({"x": "full", **chans}, head + [("relu", 2)], [3]),
              "bn_add_relu": ({"x": "full", "r": "full", **chans}, head + [("add", 2, "r"), ("relu", 3)], [4])}
    out = {}
    for name, (inputs, nodes, outs) in chains.items():
        ptx = compile_kernel(Fused.build(inputs, [(*n, {}) for n in nodes], outs), np.float32, "cuda").ptx()
        out[name] = sorted({line.split()[0] for line in ptx.splitlines()
                            if ".f64" in line and not line.strip().startswith(".reg")})
    return out


if __name__ == "__main__":
    import warnings
    warnings.simplefilter("ignore")
    sys.path.insert(0, str(HERE.parent))
    print(json.dumps({"sim": main_sim, "device": main_sim, "ptx": main_ptx}[sys.argv[1]]()))
