"""Launch records over a device arena (runtime/cuda_arena.py) without a GPU.

- which plans can be recorded (the CUDA graph's host-work marks, constant index uploads
  allowed): ResNet-18 and an LSTM scan yes, a detector (host sampling) no, with the reason;
- the switch (NETDSL_CUDA_ARENA=0, config) and the reasons a step stays eager;
- under Numba's CUDA simulator (this file run as a script in a subprocess, as
  tests/test_cuda_sim.py does): the records of a small ResNet (the library's residual
  blocks), of a 2-layer LSTM scan and of a per-pixel classifier (transpose, concat, 4-d
  cross entropy), recorded without running the kernels: a launch for
  every plan step that computes anything, and the arena checked by the CPU workspace's
  liveness test (tests/test_arena.py: no two values alive at the same launch share a
  byte); then a small network trained on the records: the recorded step, a replayed step
  with a new batch after an SGD update, against an eager run of that step bit for bit and
  against the CPU to 1e-4, with no allocation and one kernel call per record in the replay.

On a GPU, scripts/gpu-check's arena section runs `python tests/test_cuda_arena.py device`
(ResNet-18 and an LSTM: records vs eager vs CPU, allocations per step; the LSTM's records
captured as a CUDA graph, NETDSL_CUDA_GRAPH_RECORDS=1, against its records).
"""
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE.parent))


def _plan_reason(spec, dims, text=None, graph=False):
    """Why records (graph=True: a CUDA graph) refuse the CUDA training plan of a spec or text."""
    import tempfile
    from netdsl import autodiff
    from netdsl.lang.elaborate import elaborate
    from netdsl.plan import plan
    from netdsl.runtime import cuda_arena, cuda_graph
    plan_reason = cuda_graph.plan_reason if graph else cuda_arena.plan_reason
    if text is not None:
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / "net.net"
            p.write_text(text)
            g, _ = elaborate(str(p), None, {})
    else:
        g, _ = elaborate(str(ROOT / "specs" / spec), None, {})
    tg = autodiff.build(g)
    return plan_reason(plan(tg.nodes, tg.keep(), dims, True, norms="heads"))


def test_plans_that_can_be_recorded():
    assert _plan_reason("resnet18.net", {"N": 8}) is None
    # a scan slices time steps with index tables uploaded from the host: constants, recorded
    assert _plan_reason(None, {"N": 2, "T": 3}, LSTM.format(lib=ROOT / "specs" / "lib" / "rnn.net")) is None


def test_what_a_graph_refuses_and_records_take():
    for text, dims in ((SEG, {"N": 2}), (LSTM.format(lib=ROOT / "specs" / "lib" / "rnn.net"), {"N": 2, "T": 3})):
        assert _plan_reason(None, dims, text, graph=True) is not None
        assert _plan_reason(None, dims, text) is None


def test_a_detector_is_not_recorded_and_says_why():
    why = _plan_reason("det/faster_rcnn.net", {"N": 2, "G": 3})
    assert why is not None and why.split(" ")[1].startswith("(") and "sample_anchors" in why and "proposals" in why


def test_a_sampling_language_model_is_not_recorded():
    why = _plan_reason("rnn/charlm_lstm.net", {"N": 2, "T": 8})
    assert why is not None and why.startswith("sample_categorical (") and "seed" in why


@pytest.mark.parametrize("value, want", [(None, "kernel"), ("1", "kernel"), ("config", "config"),
                                         ("packed", "packed"), ("0", None)])
def test_the_switch(monkeypatch, value, want):
    from netdsl.runtime import cuda_arena
    if value is None:
        monkeypatch.delenv(cuda_arena.ENV, raising=False)
    else:
        monkeypatch.setenv(cuda_arena.ENV, value)
    assert cuda_arena.mode() == want


class FakeProgram:
    def __init__(self):
        self.profile, self.runs = None, 0
        self.plan = type("P", (), {"steps": []})()

    def run(self, st, fv):
        self.runs += 1
        return {"eager": fv}


class St:
    def __init__(self, hooks=None):
        self.saved, self.grad_ready, self.params = {}, hooks, {}


@pytest.mark.parametrize("case", ["off", "blas", "profile", "hooks", "runtime", "no launches"])
def test_reasons_to_stay_eager(monkeypatch, case):
    from netdsl.runtime import cuda_arena, cuda_blas, cuda_graph
    monkeypatch.delenv("NUMBA_ENABLE_CUDASIM", raising=False)
    monkeypatch.setattr(cuda_graph, "_told", set())
    monkeypatch.setenv(cuda_arena.ENV, "0" if case == "off" else "1")
    if case == "blas":
        monkeypatch.setattr(cuda_blas, "_orig", object())
    prog, arena = FakeProgram(), cuda_arena.ArenaSteps()
    if case == "profile":
        prog.profile = {}
    for _ in range(3):
        env = arena.run(prog, St(hooks=print if case == "hooks" else None), {1: "b"}, lambda fv: fv, (),
                        "carry" if case == "runtime" else None)
        assert env == {"eager": {1: "b"}}
    assert prog.runs == 3 and not arena.records
    expect = {"off": "NETDSL_CUDA_ARENA=0", "blas": "cuBLAS", "no launches": "launched no kernels"}
    if case in expect:
        assert expect[case] in arena.status[prog]
    else:       # transient: says nothing, and the next step may be recorded
        assert arena.status == {}


def test_a_first_replay_that_fails_runs_the_step_eagerly(monkeypatch):
    from netdsl.runtime import cuda_arena, cuda_graph
    monkeypatch.setattr(cuda_graph, "_told", set())
    monkeypatch.setenv(cuda_arena.ENV, "1")

    class Broken:
        params, replays = (), 0

        def replay(self, feeds):
            raise TypeError("an argument numba cannot pack")
    prog, arena = FakeProgram(), cuda_arena.ArenaSteps()
    arena.records[prog] = Broken()
    assert arena.run(prog, St(), {1: "b"}, lambda fv: fv, ()) == {"eager": {1: "b"}}
    assert prog.runs == 1 and prog not in arena.records
    assert arena.status[prog].startswith("the first replay failed (TypeError")
    arena.run(prog, St(), {1: "b"}, lambda fv: fv, ())
    assert prog.runs == 2 and prog not in arena.records


class FakeRecords:
    params, replays, graph, graph_why, host_copies, inputs = (), 1, None, None, False, {}

    def __init__(self):
        self.launched, self.calls, self.env = 0, [self.launch], {"out": 1}

    def launch(self):
        self.launched += 1

    def replay(self, feeds):
        self.launch()
        return dict(self.env)

    def describe(self):
        return "launch records (1 launches, arena 0.0 MiB)"


@pytest.mark.parametrize("asked", [True, False])
def test_records_captured_as_one_graph_when_asked(monkeypatch, asked):
    """NETDSL_CUDA_GRAPH_RECORDS=1: after the first replay, the records' launches are captured
    (device parts faked) and the graph launched from then on; not asked: replayed."""
    from netdsl.runtime import cuda_arena, cuda_graph, cuda_pool
    monkeypatch.setattr(cuda_graph, "_told", set())
    monkeypatch.delenv("NUMBA_ENABLE_CUDASIM", raising=False)
    monkeypatch.delenv("NETDSL_CUDA_GRAPHS", raising=False)
    monkeypatch.setenv(cuda_arena.ENV, "1")
    if asked:
        monkeypatch.setenv(cuda_arena.GRAPH_ENV, "1")
    else:
        monkeypatch.delenv(cuda_arena.GRAPH_ENV, raising=False)
    monkeypatch.setattr(cuda_pool, "pool", lambda: object())
    monkeypatch.setattr(cuda_graph, "ptds_ok", lambda: None)
    made = []

    class Graph:
        nodes, launches = 1, 0

        def launch(self, feeds):
            self.launches += 1
            return {"graph": feeds}

    def capture(replay, st, inputs, params):
        assert replay.run(st, inputs) == {"out": 1}     # the records' launches, run inside the capture
        made.append(Graph())
        return made[-1]
    monkeypatch.setattr(cuda_graph, "capture", capture)
    prog, arena, r = FakeProgram(), cuda_arena.ArenaSteps(), FakeRecords()
    arena.records[prog] = r
    outs = [arena.run(prog, St(), {1: "b"}, lambda fv: fv, ()) for _ in range(3)]
    assert prog.runs == 0
    if asked:
        assert len(made) == 1 and made[0].launches == 3 and r.launched == 1 and outs[-1] == {"graph": {1: "b"}}
        assert "captured as one CUDA graph (1 nodes)" in arena.status[prog]
    else:
        assert not made and r.launched == 3 and outs[-1] == {"out": 1}


# ---------------------------------------------------------------- under the simulator

@pytest.fixture(scope="module")
def sim():
    from helpers import script_results
    return script_results(HERE, {"sim": True}, timeout=600)["sim"]


@pytest.mark.parametrize("net", ["resnet", "lstm", "seg"])
def test_every_plan_step_has_its_launches(sim, net):
    r = sim["dry"][net]
    assert r["refused"] is None
    # steps with no launch: views (reshape, flatten) and constant uploads only
    assert r["uncovered"] == [], r["uncovered"]
    assert r["launches"] >= {"resnet": 80, "lstm": 200, "seg": 20}[net] and r["steps"] > 10
    assert r["replay_calls"] == r["launches"] + r["copies"]


@pytest.mark.parametrize("net", ["resnet", "lstm", "seg"])
def test_values_alive_at_the_same_launch_never_share_bytes(sim, net):
    """tests/test_arena.py's check, on the arena laid out over the recorded launches."""
    r = sim["dry"][net]
    slots = sorted((tuple(span), lo, hi) for span, lo, hi in r["slots"])
    assert len(slots) > {"resnet": 50, "lstm": 50, "seg": 10}[net]
    for i, ((a0, a1), lo, hi) in enumerate(slots):
        for (b0, b1), lo2, hi2 in slots[i + 1:]:
            if b0 > a1:
                break
            assert hi <= lo2 or hi2 <= lo, "two live values overlap in the arena"
    assert max(hi for _, _, hi in slots) <= r["size"] <= r["naive"]
    assert r["size"] <= 1.15 * r["peak_live"]      # close to the most its values need at once
    assert all(lo % 256 == 0 for _, lo, _ in slots)


def test_replayed_step_is_the_eager_step_and_the_cpus(sim):
    r = sim["train"]
    assert r["status"].startswith("launch records (") and r["graph_status"] == ["the CUDA simulator cannot capture graphs"]
    assert r["replay_vs_eager"] == {"equal": True}, r["replay_vs_eager"]     # bit for bit
    assert max(r["vs_cpu"].values()) <= 1e-4, r["vs_cpu"]
    assert set(r["vs_cpu"]) >= {"step1.loss", "step2.loss", "step2.logits", "params", "running"}


def test_a_replayed_step_allocates_nothing_and_calls_each_record_once(sim):
    r = sim["train"]
    assert r["replays"] == 1 and r["replay_allocs"] == 0
    assert r["replay_kernels"] == r["records"] and r["records"] > 20


# ---------------------------------------------------------------- the subprocess side

LSTM = """
import "{lib}"
network lm(vocab = 7, embed = 4, hidden = 5, layers = 2) {{
  input chars: i64[N, T]
  input next: i64[N, T]
  logits = charlm(chars, lstm, vocab, embed, hidden, layers, false, name="")
  output logits
  loss ce = cross_entropy(logits, next)
}}
"""

# the library's residual blocks at small widths: a stem, an identity block, a strided block
# with its 1x1 projection, pooling and the classifier
RESNET = """
import "{lib}"
network small_resnet(classes = 10) {{
  input image: f32[N, 3, 8, 8]
  input label: i64[N]
  x = image -> conv(4, k=3, p=1, bias=false) -> bn -> relu
  x = basic(x, 4)
  x = basic(x, 8, 2)
  logits = x -> global_avgpool -> flatten -> linear(classes)
  output logits
  loss ce = cross_entropy(logits, label)
}}
"""

# per-pixel classes: a transpose, a concat and cross entropy over 4-d logits (index tables
# uploaded from the host: constants the records keep)
SEG = """
network seg(classes = 3) {
  input image: f32[N, 2, 4, 4]
  input label: i64[N, 4, 4]
  f = image -> conv(4, k=3, p=1) -> relu
  g = transpose(f, [0, 1, 3, 2])
  logits = concat(f, g) -> conv(classes, k=1)
  output logits
  loss ce = cross_entropy(logits, label)
}
"""

# small enough for the simulator (every thread a Python thread): a norm heading a fused
# kernel, index-table uploads (concat, coords; split in the backward), saved switches,
# a GEMM, cross entropy
TRAIN = """
network tiny(classes = 3) {
  input image: f32[N, 2, 4, 4]
  input label: i64[N]
  x = image -> bn -> relu
  logits = concat(x, coords(x)) -> maxpool(k=2, s=2) -> global_avgpool -> flatten -> linear(classes)
  output logits
  loss ce = cross_entropy(logits, label)
}
"""


def _graph(text):
    import tempfile
    from netdsl.lang.elaborate import elaborate
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "net.net"
        p.write_text(text)
        return elaborate(str(p), None, {})[0]


def _step_parts(m, feeds):
    """(program, run state, host feeds by value id) of a training step, as Model.train_step makes them."""
    dims, fv = m.bind(feeds, upload=False)
    prog = m._program(True, dims, ())
    st = m._state(dims, True, None)
    st.grad_buffers = m.flat.bind(m.training_graph.grads)
    return prog, st, fv


def _dry(text, feeds) -> dict:
    """Records of one step, the kernels not run: coverage per plan step and the arena's slots."""
    from test_arena import _spans
    from netdsl.runtime import cuda_arena
    from netdsl.runtime.model import Model
    m = Model(_graph(text), seed=0, device="cuda")
    prog, st, fv = _step_parts(m, feeds)
    r, _ = cuda_arena.record(prog, st, {k: m.target.upload(a) for k, a in fv.items()}, tuple(st.params.values()),
                             "kernel", execute=False)
    if isinstance(r, str):
        return {"refused": r}
    table = m.target.table
    uncovered = [s.name for s, got in zip(prog.plan.steps, r.per_step) if not got and not s.fused
                 and table[s.nodes[0].op].writes != "views" and s.nodes[0].op not in cuda_arena.CONSTANT_UPLOADS]
    spans = _spans(r.plan)
    slots = [(spans[k], off, off + -(-n // cuda_arena.ALIGN) * cuda_arena.ALIGN) for k, (off, n) in r.layout.slots.items()]
    live = [0] * len(r.plan.steps)
    for (a, b), lo, hi in slots:
        for i in range(a, b + 1):
            live[i] += hi - lo
    return {"refused": None, "uncovered": uncovered, "launches": sum(ln.grid is not None for ln in r.launches),
            "copies": sum(ln.grid is None for ln in r.launches), "replay_calls": len(r.calls),
            "steps": len(prog.plan.steps), "slots": slots, "size": r.size, "peak_live": max(live),
            "naive": sum(hi - lo for _, lo, hi in slots)}


def _rel(x, y) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(np.abs(x - y).max() / max(np.abs(y).max(), 1e-6))


def _train() -> dict:
    """Step 1 recorded (run eagerly), an SGD update, step 2 replayed on a new batch; then step
    2 again eagerly (the old path, on the same parameters) to compare bit for bit; both
    against the CPU model trained the same way."""
    from numba import cuda
    from numba.cuda.simulator.kernel import FakeCUDAKernel
    from netdsl.runtime import cuda_arena, make_optimizer
    from netdsl.runtime.cuda import DeviceOptimizer
    from netdsl.runtime.model import Model
    g = _graph(TRAIN)
    cpu = Model(g, seed=2)
    m = Model(g, params={k: v.copy() for k, v in cpu.params.items()}, device="cuda")
    rng = np.random.default_rng(3)
    batches = [{"image": rng.standard_normal((2, 2, 4, 4)).astype(np.float32), "label": rng.integers(0, 3, 2)}
               for _ in range(2)]
    opts = [make_optimizer("sgd", x.trainable(), lr=0.1, momentum=0.9) for x in (cpu, m)]
    opts[1] = DeviceOptimizer(opts[1], m.trainable(), m.flat)
    vs_cpu, out = {}, {}
    counts = {"allocs": 0, "kernels": 0, "replays": 0}
    inside = []

    def counted(f, key):
        def wrapped(*a, **k):
            counts[key] += bool(inside)
            return f(*a, **k)
        return wrapped
    # what a replay allocates and launches (a launch configures its kernel: device functions do not)
    da, td, conf, replay = cuda.device_array, cuda.to_device, FakeCUDAKernel.__getitem__, cuda_arena.Records.replay

    def replaying(self, *a):
        inside.append(1)
        counts["replays"] += 1
        try:
            return replay(self, *a)
        finally:
            inside.pop()
    cuda.device_array, cuda.to_device = counted(da, "allocs"), counted(td, "allocs")
    FakeCUDAKernel.__getitem__, cuda_arena.Records.replay = counted(conf, "kernels"), replaying
    for i, b in enumerate(batches):
        tc, _, oc, gc = cpu.train_step(b)
        tg, _, og, gg = m.train_step(b)
        host = {"loss": tg, "logits": og["logits"], **{k: v.copy_to_host() for k, v in gg.items()}}
        vs_cpu[f"step{i + 1}.loss"] = abs(tg - tc) / abs(tc)
        vs_cpu[f"step{i + 1}.logits"] = _rel(og["logits"], oc["logits"])
        vs_cpu.update({f"step{i + 1}.grad.{k}": _rel(host[k], gc[k]) for k in gc})
        if i == 1:      # the running statistics the replay updated; then the same step eagerly
            hp = m.host_params()         # (NETDSL_CUDA_ARENA=0's path), before the update
            out["running"] = max(_rel(hp[k], cpu.params[k]) for k in hp if "running" in k)
            prog, st, fv = _step_parts(m, b)
            env = prog.run(st, {k: m.target.upload(a) for k, a in fv.items()})
            eager = {"loss": float(env[id(g.losses[0].value)].copy_to_host()),
                     "logits": env[id(g.outputs["logits"])].copy_to_host(),
                     **{k: env[id(v)].copy_to_host() for k, v in m.training_graph.grads.items()}}
            diff = [k for k in host if not np.array_equal(host[k], eager[k])]
            out["replay_vs_eager"] = {"equal": True} if not diff else {"differ": diff}
        opts[0].step(gc)
        opts[1].step(gg)
    cuda.device_array, cuda.to_device, FakeCUDAKernel.__getitem__, cuda_arena.Records.replay = da, td, conf, replay
    hp = m.host_params()
    # (the running statistics saw step 2 twice here: the eager rerun updated them again)
    vs_cpu["params"] = max(_rel(hp[k], cpu.params[k]) for k in cpu.trainable())
    vs_cpu["running"] = out.pop("running")
    r = next(iter(m._graphs.arena.records.values()))
    return {**out, "vs_cpu": vs_cpu, "status": next(iter(m._graphs.arena.status.values())),
            "graph_status": list(m.graph_status.values()), "replay_allocs": counts["allocs"],
            "replay_kernels": counts["kernels"], "replays": counts["replays"],
            "records": sum(ln.grid is not None for ln in r.launches)}


def main_sim() -> dict:
    import io
    from contextlib import redirect_stderr
    rng = np.random.default_rng(0)
    with redirect_stderr(io.StringIO()):
        dry = {"resnet": _dry(RESNET.format(lib=ROOT / "specs" / "lib" / "resnet.net"),
                              {"image": rng.standard_normal((2, 3, 8, 8)).astype(np.float32),
                               "label": np.array([1, 2])}),
               "lstm": _dry(LSTM.format(lib=ROOT / "specs" / "lib" / "rnn.net"),
                            {"chars": rng.integers(0, 7, (2, 3)), "next": rng.integers(0, 7, (2, 3))}),
               "seg": _dry(SEG, {"image": rng.standard_normal((2, 2, 4, 4)).astype(np.float32),
                                 "label": rng.integers(0, 3, (2, 4, 4))})}
        return {"dry": dry, "train": _train()}


# ---------------------------------------------------------------- on a GPU (scripts/gpu-check)

def _device_runs(text, batches, lib, graph_records=False) -> dict:
    """SGD steps of one network: records (kernel launch, numba's configured launcher, packed),
    eager twice (NETDSL_CUDA_ARENA=0: is eager reproducible itself?) and the CPU, graphs off;
    graph_records: also with graphs on and NETDSL_CUDA_GRAPH_RECORDS=1 (step 1 recorded, 2
    replayed, 3 captured and launched, then launched). The comparisons and the pool's
    allocations per step (mallocs: taken from the pool at all)."""
    from test_cuda_graph import _compare, _steps
    from netdsl.runtime import cuda_graph, cuda_pool
    from netdsl.runtime.model import Model
    g = _graph(text.format(lib=ROOT / "specs" / "lib" / lib))
    params = dict(Model(g, seed=0).params)
    pool = cuda_pool.pool()
    runs, mallocs, status = {}, {}, {}
    orig = cuda_graph.GraphSteps.run
    ways = [("records", "1"), ("config", "config"), ("packed", "packed"), ("eager", "0"), ("eager2", "0")]
    for name, arena in ways + ([("graph", "1")] if graph_records else []):
        os.environ["NETDSL_CUDA_ARENA"] = arena
        os.environ["NETDSL_CUDA_GRAPH_RECORDS"] = "1" if name == "graph" else "0"
        per, seen = [], []

        def counted(self, *a, **k):     # pool allocations inside the step (not the finite check after it)
            m0 = (pool.hits + pool.misses) if pool is not None else 0
            out = orig(self, *a, **k)
            per.append((pool.hits + pool.misses - m0) if pool is not None else None)
            seen.append(self)
            return out
        cuda_graph.GraphSteps.run = counted
        try:
            runs[name] = _steps(g, params, batches, "cuda", "1" if name == "graph" else "0")
        finally:
            cuda_graph.GraphSteps.run = orig
            del os.environ["NETDSL_CUDA_GRAPH_RECORDS"]
        mallocs[name] = per
        status[name] = list(seen[-1].arena.status.values())
    runs["cpu"] = _steps(g, params, batches, "cpu", "1")
    extra = {"graph_records_vs_records": _compare(runs["graph"], runs["records"])} if graph_records else {}
    return {**extra, "records_vs_eager": _compare(runs["records"], runs["eager"]),
            "config_vs_records": _compare(runs["config"], runs["records"]),
            "packed_vs_records": _compare(runs["packed"], runs["records"]),
            "eager_vs_eager": _compare(runs["eager2"], runs["eager"]),
            "records_vs_cpu": _compare(runs["records"], runs["cpu"]),
            "eager_vs_cpu": _compare(runs["eager"], runs["cpu"]),
            "mallocs": mallocs, "status": status}


def main_device() -> dict:
    import netdsl.runtime.cuda  # noqa: F401  (first: the stream mode and the pool, before numba.cuda)
    from test_cuda_graph import RESNET18
    rng = np.random.default_rng(0)
    img = [{"image": rng.standard_normal((8, 3, 32, 32)).astype(np.float32), "label": rng.integers(0, 10, 8)}
           for _ in range(4)]
    seq = [{"chars": rng.integers(0, 7, (4, 6)), "next": rng.integers(0, 7, (4, 6))} for _ in range(4)]
    return {"resnet18": _device_runs(RESNET18, img, "resnet.net"),
            "lstm": _device_runs(LSTM, seq, "rnn.net", graph_records=True)}


if __name__ == "__main__":
    import warnings
    warnings.simplefilter("ignore")     # the simulator's uint64 hash overflows on purpose
    mode = sys.argv[1]
    if mode == "sim" and os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
        sys.exit("run under NUMBA_ENABLE_CUDASIM=1")
    print(json.dumps({"sim": main_sim, "device": main_device}[mode]()))
