"""CUDA graphs for the training step (runtime/cuda_graph.py) without a GPU.

- which plans may be captured, from the kernel bindings' host-work marks: ResNet-18 yes;
  a detector (host sampling) and a char LSTM (a scan steps through time on the host) no,
  with the reason named;
- the eager / capture / replay switch and its fallbacks, with the device parts faked;
- under Numba's CUDA simulator (this file run as a script in a subprocess, as
  tests/test_cuda_sim.py does): the graph path refuses cleanly and a CUDA model trains
  eagerly with the same numbers as with NETDSL_CUDA_GRAPHS=0.

On a GPU, scripts/gpu-check's graph section replays the captured step and compares it with
the eager step bit for bit and with the CPU step (tests/test_cuda_graph.py device).
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


def _plan_reason(spec, dims, **over):
    from netdsl import autodiff
    from netdsl.lang.elaborate import elaborate
    from netdsl.plan import plan
    from netdsl.runtime.cuda_graph import plan_reason
    g, _ = elaborate(str(ROOT / "specs" / spec), None, over)
    tg = autodiff.build(g)
    return plan_reason(plan(tg.nodes, tg.keep(), dims, True, norms="heads"))    # as the CUDA executor plans


def test_resnet18_plan_is_capturable():
    assert _plan_reason("resnet18.net", {"N": 8}) is None


def test_detector_plan_is_not_capturable_and_says_why():
    why = _plan_reason("det/faster_rcnn.net", {"N": 2, "G": 3})
    # the first host-working step is named with its node path, the others by operator; the
    # RPN's host sampling and its proposals (a data-dependent count) are among them
    assert why is not None and why.split(" ")[1].startswith("(")
    assert "sample_anchors" in why and "proposals" in why


def test_char_lstm_plan_is_not_capturable_and_says_why():
    why = _plan_reason("rnn/charlm_lstm.net", {"N": 2, "T": 8})
    assert why is not None and why.startswith("scan (") and "steps through time on the host" in why


def test_marks_that_depend_on_the_node():
    from types import SimpleNamespace as NS
    from netdsl.runtime.cuda_graph import host_work
    v = lambda rank: NS(shape=(1,) * rank)
    drop = lambda p: NS(op="dropout", path="d", attrs={"p": p}, inputs=[v(2)])
    ce = lambda r: NS(op="cross_entropy", path="ce", attrs={}, inputs=[v(r), v(1)])
    assert host_work([drop(0.0)]) is None and "seed" in host_work([drop(0.5)])
    assert host_work([ce(2)]) is None and "transpose" in host_work([ce(4)])
    assert host_work([NS(op="conv", path="c", attrs={}, inputs=[])]) is None


PTDS_ORDER = r"""
import json, os, sys
import netdsl.runtime.model, netdsl.runtime.train, netdsl.cli     # none of these loads numba.cuda
before = "numba.cuda" in sys.modules or "cuda.bindings.driver" in sys.modules
import netdsl.runtime.cuda
print(json.dumps([before, os.environ.get("CUDA_PYTHON_CUDA_PER_THREAD_DEFAULT_STREAM")]))
"""


def test_per_thread_default_stream_is_chosen_before_numba_cuda_loads():
    """netdsl.runtime.cuda sets the variable cuda-bindings reads before numba.cuda is first
    imported (a process of its own: the import order is the point)."""
    import subprocess
    e = {k: v for k, v in os.environ.items()
         if k not in ("NUMBA_ENABLE_CUDASIM", "NETDSL_CUDA_GRAPHS", "CUDA_PYTHON_CUDA_PER_THREAD_DEFAULT_STREAM")}
    out = subprocess.run([sys.executable, "-c", PTDS_ORDER], capture_output=True, text=True, env=e,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [False, "1"]


@pytest.mark.parametrize("env, want", [({}, "1"), ({"NETDSL_CUDA_GRAPHS": "0"}, None),
                                       ({"NUMBA_ENABLE_CUDASIM": "1"}, None),
                                       ({"CUDA_PYTHON_CUDA_PER_THREAD_DEFAULT_STREAM": "0"}, "0")])
def test_prepare_keeps_the_users_choice(monkeypatch, env, want):
    from netdsl.runtime.cuda_graph import PTDS, prepare
    for k in ("NUMBA_ENABLE_CUDASIM", "NETDSL_CUDA_GRAPHS", PTDS):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    prepare()
    assert os.environ.get(PTDS) == want


# ---------------------------------------------------------------- the switch, device parts faked

class FakeProgram:
    def __init__(self, steps=()):
        self.profile, self.runs = None, 0
        self.plan = type("P", (), {"steps": list(steps)})()

    def run(self, st, fv):
        self.runs += 1
        return {"eager": fv}


class FakeGraph:
    def __init__(self, params, nodes=7):
        self.params, self.nodes, self.launches = params, nodes, 0

    def launch(self, host_feeds):
        self.launches += 1
        return {"graph": host_feeds}


class St:
    def __init__(self):
        self.saved, self.grad_ready = {}, None


@pytest.fixture
def graphs(monkeypatch):
    """cuda_graph with its device parts faked: the pool present, PTDS in effect, capture
    returning a FakeGraph (or raising what `fail` holds)."""
    from netdsl.runtime import cuda_graph, cuda_pool
    monkeypatch.delenv("NUMBA_ENABLE_CUDASIM", raising=False)
    monkeypatch.delenv("NETDSL_CUDA_GRAPHS", raising=False)
    monkeypatch.setattr(cuda_pool, "pool", lambda: object())
    monkeypatch.setattr(cuda_graph, "ptds_ok", lambda: None)
    monkeypatch.setattr(cuda_graph, "_told", set())
    made, fail = [], []

    def capture(prog, st, inputs, params):
        if fail:
            raise cuda_graph.CaptureFailed(fail[0])
        made.append(FakeGraph(params))
        return made[-1]
    monkeypatch.setattr(cuda_graph, "capture", capture)
    return cuda_graph, made, fail


def _step(gs, prog, params=("p",), why=None):
    return gs.run(prog, St(), {1: "batch"}, lambda fv: {k: "dev:" + v for k, v in fv.items()},
                  params, why)


def test_eager_then_capture_then_replay(graphs, capsys):
    cg, made, _ = graphs
    gs, prog = cg.GraphSteps(), FakeProgram()
    assert _step(gs, prog) == {"eager": {1: "dev:batch"}}       # first step: eager (compiles, warms up)
    assert _step(gs, prog) == {"graph": {1: "batch"}}           # second: captured, then launched
    assert _step(gs, prog) == {"graph": {1: "batch"}}           # then replayed
    assert prog.runs == 1 and len(made) == 1 and made[0].launches == 2
    assert gs.status[prog] == "graph (7 nodes)"
    assert "replayed as one CUDA graph" in capsys.readouterr().err


def test_another_batch_shape_runs_eagerly(graphs):
    cg, made, _ = graphs
    gs, prog, short = cg.GraphSteps(), FakeProgram(), FakeProgram()
    for _ in range(3):
        _step(gs, prog)
    for _ in range(3):      # a short last batch is another program: never captured
        assert "eager" in _step(gs, short)
    assert len(made) == 1 and short.runs == 3 and short not in gs.status
    assert "graph" in _step(gs, prog)


def test_replaced_parameters_are_captured_again(graphs):
    cg, made, _ = graphs
    gs, prog = cg.GraphSteps(), FakeProgram()
    for _ in range(3):
        _step(gs, prog, params=("a",))
    assert "eager" in _step(gs, prog, params=("b",))            # new arrays: the graph is dropped
    assert "graph" in _step(gs, prog, params=("b",)) and len(made) == 2 and made[1].params == ("b",)


def test_capture_failure_falls_back_and_keeps_the_reason(graphs, capsys):
    cg, made, fail = graphs
    fail.append("capture failed: CudaAPIError: cuMemcpyHtoD CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED")
    gs, prog = cg.GraphSteps(), FakeProgram()
    for _ in range(4):
        assert "eager" in _step(gs, prog)
    assert prog.runs == 4 and not made and gs.status[prog] == fail[0]     # tried once, not again
    assert "eager: capture failed" in capsys.readouterr().err


def test_a_refused_capture_names_the_step():
    """The reason kept for a capture the driver refused names the plan step that was running."""
    from types import SimpleNamespace as NS
    from netdsl.runtime import cuda_graph
    from netdsl.runtime.executor import Program

    class Refused(Exception):
        pass

    def kernel(n, ins, st):
        raise Refused("cuMemcpyHtoD: CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED")
    node = NS(op="mystery", path="head.mystery", inputs=[], param=None)
    step = NS(nodes=[node], fused=False, inputs=[], outputs=[])
    prog = NS(plan=NS(steps=[step], free_after=[[]]), profile=None,
              target=NS(table={"mystery": kernel}, download=None, sync=None), workspace=None)
    try:
        Program.run(prog, NS(params={}, grad_ready=None), {})
    except Refused as e:
        assert cuda_graph._where(e) == " at mystery (head.mystery)"
    else:
        raise AssertionError("the kernel did not raise")


@pytest.mark.parametrize("case", ["off", "sim", "no_pool", "profile", "hooks", "plan", "runtime"])
def test_reasons_to_stay_eager(graphs, monkeypatch, case):
    from types import SimpleNamespace as NS
    from netdsl.runtime import cuda_pool
    cg, made, _ = graphs
    prog, why, st = FakeProgram(), None, St()
    if case == "off":
        monkeypatch.setenv("NETDSL_CUDA_GRAPHS", "0")
    elif case == "sim":
        monkeypatch.setenv("NUMBA_ENABLE_CUDASIM", "1")
    elif case == "no_pool":
        monkeypatch.setattr(cuda_pool, "pool", lambda: None)
    elif case == "profile":
        prog.profile = {}
    elif case == "hooks":
        st.grad_ready = print
    elif case == "plan":
        prog = FakeProgram([NS(nodes=[NS(op="sample_anchors", path="rpn.sample", attrs={}, inputs=[])])])
    else:
        why = "the recurrent state is given from outside (carry)"
    gs = cg.GraphSteps()
    for _ in range(3):
        assert "eager" in gs.run(prog, st, {1: "b"}, lambda fv: fv, (), why)
    expect = {"off": "NETDSL_CUDA_GRAPHS=0", "sim": "simulator", "no_pool": "NETDSL_CUDA_POOL=0",
              "profile": "NETDSL_PROFILE", "hooks": "gradient hooks", "plan": "sample_anchors (rpn.sample)",
              "runtime": "carry"}[case]
    why, transient = gs.reason(prog, st, why)
    assert not made and expect in why and transient == (case in ("profile", "hooks", "runtime"))
    if transient:       # for that step only: the next plain steps are captured and replayed
        prog.profile, st.grad_ready = None, None
        assert "graph" in gs.run(prog, st, {1: "b"}, lambda fv: fv, (), None) and len(made) == 1


# ---------------------------------------------------------------- under the simulator

def test_simulator_refuses_graphs_and_trains_the_same():
    from helpers import script_results
    r = script_results(HERE, {"sim": True}, timeout=600)["sim"]
    assert r["status_default"] == ["the CUDA simulator cannot capture graphs"]
    assert r["status_off"] == ["NETDSL_CUDA_GRAPHS=0"]
    assert r["losses_default"] == r["losses_off"] and len(r["losses_default"]) == 3
    assert r["params_equal"] and r["pool"] is None
    assert "eager: the CUDA simulator cannot capture graphs" in r["note"]


# ---------------------------------------------------------------- the subprocess side

# small: under the simulator every thread is a Python thread (a conv-bn step takes seconds)
NET = """
network small(classes = 3) {
  input x: f32[N, 4]
  input label: i64[N]
  logits = x -> linear(6) -> relu -> linear(classes)
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


def _train(g, params, feeds, steps, graphs: str):
    """`steps` SGD steps of a CUDA model; returns (losses, final host params, graph status)."""
    from netdsl.runtime import make_optimizer
    from netdsl.runtime.cuda import DeviceOptimizer
    from netdsl.runtime.model import Model
    os.environ["NETDSL_CUDA_GRAPHS"] = graphs
    m = Model(g, params={k: v.copy() for k, v in params.items()}, device="cuda")
    opt = DeviceOptimizer(make_optimizer("sgd", m.trainable(), lr=0.1, momentum=0.9), m.trainable(), m.flat)
    losses = []
    for i in range(steps):
        total, _, _, grads = m.train_step(feeds[i % len(feeds)])
        opt.step(grads)
        losses.append(total)
    return losses, m.host_params(), list(m.graph_status.values())


def main_sim() -> dict:
    import io
    from contextlib import redirect_stderr
    from netdsl.runtime import cuda_pool
    from netdsl.runtime.model import Model
    g = _graph(NET)
    params = Model(g, seed=3).params
    rng = np.random.default_rng(4)
    feeds = [{"x": rng.standard_normal((2, 4)).astype(np.float32), "label": np.array([1, 2])} for _ in range(2)]
    err = io.StringIO()
    with redirect_stderr(err):
        la, pa, sa = _train(g, params, feeds, 3, "1")
    lb, pb, sb = _train(g, params, feeds, 3, "0")
    return {"losses_default": la, "losses_off": lb, "status_default": sa, "status_off": sb,
            "params_equal": all(np.array_equal(pa[k], pb[k]) for k in pa), "pool": cuda_pool.memory_stats(),
            "note": err.getvalue()}


# ---------------------------------------------------------------- on a GPU (scripts/gpu-check)

RESNET18 = """
import "{lib}"
network r18(classes = 10) {{
  input image: f32[N, 3, 32, 32]
  input label: i64[N]
  logits = resnet(image, basic, [2, 2, 2, 2], classes, name="")
  output logits
  loss ce = cross_entropy(logits, label)
}}
"""


def _steps(g, params, batches, device, graphs):
    """SGD steps (momentum, weight decay) on `device`: per step the loss, logits and gradients
    (host copies, taken before the update), the device allocations the pool made during the
    step; then the final parameters and the graph status."""
    from netdsl.runtime import cuda_pool, make_optimizer
    from netdsl.runtime.model import Model
    os.environ["NETDSL_CUDA_GRAPHS"] = graphs
    m = Model(g, params={k: v.copy() for k, v in params.items()}, device=device)
    opt = make_optimizer("sgd", m.trainable(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    if device == "cuda":
        from netdsl.runtime.cuda import DeviceOptimizer
        opt = DeviceOptimizer(opt, m.trainable(), m.flat)
    pool = cuda_pool.pool() if device == "cuda" else None
    steps = []
    for b in batches:
        a0 = pool.device_allocs if pool is not None else 0
        total, _, outs, grads = m.train_step(b)
        host = {k: np.array(m.target.download(v)) for k, v in grads.items()}
        opt.step(grads)
        steps.append({"loss": total, "logits": outs["logits"], "grads": host,
                      "allocs": (pool.device_allocs - a0) if pool is not None else 0})
    return steps, m.host_params(), list(m.graph_status.values())


def _compare(a, b) -> dict:
    """Bitwise equality of two runs (per step: loss, logits, gradients; final parameters) and the
    worst relative difference (to the largest magnitude of each array)."""
    sa, pa, _ = a
    sb, pb, _ = b
    rel = lambda x, y: float(np.abs(np.asarray(x, np.float64) - y).max() / max(np.abs(np.asarray(y)).max(), 1e-6))
    out = {"equal": True, "worst": 0.0, "where": None}

    def see(name, x, y):
        x, y = np.asarray(x), np.asarray(y)
        out["equal"] &= bool(np.array_equal(x, y))
        r = rel(x, y)
        if r > out["worst"]:
            out["worst"], out["where"] = r, name
    for i, (x, y) in enumerate(zip(sa, sb)):
        see(f"step{i + 1}.loss", x["loss"], y["loss"])
        see(f"step{i + 1}.logits", x["logits"], y["logits"])
        for k in y["grads"]:
            see(f"step{i + 1}.grad.{k}", x["grads"][k], y["grads"][k])
    for k in pb:
        see(f"params.{k}", pa[k], pb[k])
    return out


def main_device() -> dict:
    """ResNet-18, 32x32, batch 8: 4 SGD steps eagerly (twice: is the eager step itself
    reproducible bit for bit?), with graphs (step 1 eager, step 2 captured and launched,
    steps 3-4 replayed with new batches), and on the CPU."""
    import netdsl.runtime.cuda  # noqa: F401  (first: the per-thread default stream and the pool, before numba.cuda)
    from netdsl.runtime import cuda_pool
    from netdsl.runtime.model import Model
    g = _graph(RESNET18.format(lib=ROOT / "specs" / "lib" / "resnet.net"))
    params = dict(Model(g, seed=0).params)
    rng = np.random.default_rng(0)
    batches = [{"image": rng.standard_normal((8, 3, 32, 32)).astype(np.float32), "label": rng.integers(0, 10, 8)}
               for _ in range(4)]
    eager = _steps(g, params, batches, "cuda", "0")
    eager2 = _steps(g, params, batches, "cuda", "0")
    graph = _steps(g, params, batches, "cuda", "1")
    cpu = _steps(g, params, batches, "cpu", "1")
    from netdsl.runtime import cuda_blas     # last: it patches netdsl's GEMM for the rest of the process
    os.environ["NETDSL_CUDA_BLAS"] = "1"
    why = cuda_blas.install()
    blas = None
    if why is None:
        run = _steps(g, params, batches, "cuda", "1")
        blas = {"vs_cpu": _compare(run, cpu), "status": run[2], "products": dict(cuda_blas.stats)}
    return {"blas": blas, "blas_off": why,"status": graph[2], "status_eager": eager[2],
            "graph_vs_eager": _compare(graph, eager), "eager_vs_eager": _compare(eager2, eager),
            "eager_vs_cpu": _compare(eager, cpu), "graph_vs_cpu": _compare(graph, cpu),
            "allocs": {"eager": [s["allocs"] for s in eager[0]], "graph": [s["allocs"] for s in graph[0]]},
            "losses": {"eager": [s["loss"] for s in eager[0]], "graph": [s["loss"] for s in graph[0]],
                       "cpu": [s["loss"] for s in cpu[0]]},
            "pool": cuda_pool.memory_stats()}


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "sim" and os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
        sys.exit("run under NUMBA_ENABLE_CUDASIM=1")
    print(json.dumps({"sim": main_sim, "device": main_device}[mode]()))
