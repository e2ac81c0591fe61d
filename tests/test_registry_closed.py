"""The operator table is closed: every registered operator runs on the CPU (its backward
too), or its registry entry says why it cannot yet, and then `netdsl run` and `Model`
stop cleanly at the first such node of a spec; every target binds the gradient of each
`vjp="kernel"` operator it claims; every initialiser an operator names exists."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import ROOT, SPECS, cli, compile_spec, compile_text
from netdsl.errors import NetdslError
from netdsl.ops import OPS, OpDef, not_runnable
from netdsl.ops import inits
from netdsl.ops.elementwise import SCALAR
from netdsl.ir.graph import walk
from netdsl.ops.registry import register
from netdsl.runtime import cpu
from netdsl.runtime.executor import Program
from netdsl.runtime.model import Model


def _generated(name: str) -> bool:
    """Elementwise operators get generated kernels (codegen) from their scalar expressions."""
    return name in SCALAR or name == "ew_grad"


def _runs_somewhere(op: OpDef) -> bool:
    return not isinstance(op.pending, str)     # None, or pending only for some uses (a function)


def test_every_operator_runs_on_the_cpu_or_says_why_not():
    unbound, no_grad, bad_reason = [], [], []
    for op in {id(op): op for op in OPS.values()}.values():    # (an alias shares its entry)
        name = op.name
        if isinstance(op.pending, str):
            if len(op.pending) < 10:
                bad_reason.append(name)
            continue
        if op.kind == "elementwise":
            if not _generated(name):
                unbound.append(name)     # the planner fuses it, and codegen knows only SCALAR
        elif name not in cpu.KERNELS:
            unbound.append(name)
        if op.differentiable and op.kind != "grad":
            if op.vjp is None:
                no_grad.append(name)
            elif op.vjp == "kernel":
                g = OPS.get(f"{name}_grad")
                if g is None or g.pending is not op.pending or f"{name}_grad" not in cpu.KERNELS:
                    no_grad.append(name)
    assert not unbound, f"runnable operators without a CPU kernel: {unbound}"
    assert not no_grad, f"differentiable operators whose backward cannot run: {no_grad}"
    assert not bad_reason, f"pending operators need a reason a user can read: {bad_reason}"


def test_the_check_sees_a_missing_kernel_and_a_missing_gradient(monkeypatch):
    """The walk above can fail: an operator dropped from the CPU table, or a gradient lost."""
    monkeypatch.delitem(cpu.KERNELS, "pad")
    with pytest.raises(AssertionError, match="pad"):
        test_every_operator_runs_on_the_cpu_or_says_why_not()
    monkeypatch.undo()
    monkeypatch.delitem(cpu.KERNELS, "conv_grad")
    with pytest.raises(AssertionError, match="conv"):
        test_every_operator_runs_on_the_cpu_or_says_why_not()


def test_no_target_binds_what_is_not_registered_or_not_runnable():
    for name in cpu.KERNELS:
        assert name in OPS, f"CPU binds unknown operator {name}"
        assert _runs_somewhere(OPS[name]), f"CPU binds {name}, which its entry calls not runnable: flip it"


CUDA_TABLE = """
import json
from netdsl.runtime import cuda
print(json.dumps(sorted(cuda.KERNELS)))
"""


@pytest.fixture(scope="module")
def cuda_table():
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
    r = subprocess.run([sys.executable, "-c", CUDA_TABLE], capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return set(json.loads(r.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("target", ["cpu", "cuda"])
def test_each_target_binds_the_gradient_of_every_kernel_vjp_it_claims(target, cuda_table):
    table = set(cpu.KERNELS) if target == "cpu" else cuda_table
    assert len(table) >= 50
    missing = [n for n in table if n in OPS and OPS[n].vjp == "kernel" and f"{n}_grad" not in table]
    assert not missing, f"{target}: gradient kernels missing for {missing}"
    unknown = [n for n in table if n not in OPS or not _runs_somewhere(OPS[n])]
    assert not unknown, f"{target} binds unregistered or pending operators {unknown}"


def test_a_gradient_operator_waits_with_its_forward():
    """`<op>_grad` shares its forward's reason (or its running), e.g. roi_align's since its kernels."""
    for name, op in OPS.items():
        if op.vjp == "kernel" and op.name == name:
            assert OPS[f"{name}_grad"].pending is op.pending, name
    assert OPS["roi_align"].pending is None and OPS["roi_align_grad"].pending is None


# ---- initialisers

def test_every_initialiser_an_operator_names_exists():
    for name, op in OPS.items():
        if op.params is not None:
            assert op.inits, name
            assert all(i in inits.INITIALISERS for i in op.inits), (name, op.inits)


def test_an_unknown_initialiser_fails_when_the_operator_is_defined():
    op = OpDef("t_unknown_init", ("x",), (), lambda ctx: [], params=lambda ctx: {}, inits=("kaiming_unifrom",))
    with pytest.raises(RuntimeError, match="kaiming_unifrom"):
        register(op)
    assert "t_unknown_init" not in OPS
    with pytest.raises(RuntimeError, match="declares no initialisers"):
        register(OpDef("t_no_inits", ("x",), (), lambda ctx: [], params=lambda ctx: {}))
    assert "t_no_inits" not in OPS


def test_a_parameter_rule_may_use_only_the_initialisers_it_declares():
    op = OpDef("t_undeclared", ("x",), (), lambda ctx: [],
               params=lambda ctx: {"weight": ((2,), "normal(0.5)", "weight")}, inits=("zeros",))
    register(op)
    try:
        with pytest.raises(RuntimeError, match="normal"):
            op.params(None)
    finally:
        del OPS["t_undeclared"]


@pytest.mark.parametrize("spec, want", [("zeros", (inits.CONSTANT, 0.0)), ("constant(20)", (inits.CONSTANT, 20.0)),
                                        ("constant(-1.5e-3)", (inits.CONSTANT, -1.5e-3)),
                                        ("normal(0.01)", (inits.NORMAL, 0.01)), ("uniform(0.1)", (inits.UNIFORM, 0.1))])
def test_initialiser_specs_parse(spec, want):
    fn, args = inits.parse(spec)
    assert fn(None, *args) == want
    assert inits.parse(spec) is inits.parse(spec)     # parsed once


@pytest.mark.parametrize("spec, msg", [("nope", "unknown initialiser 'nope'"), ("constant", "takes 1 number"),
                                       ("constant(a)", "must be numbers"), ("zeros(1)", "takes 0 number"),
                                       ("normal(1, 2)", "takes 1 number"), ("normal(1", "of the form")])
def test_bad_initialiser_specs_say_what_is_wrong(spec, msg):
    with pytest.raises(ValueError, match=msg.replace("(", r"\(")):
        inits.parse(spec)


def test_ssd300s_l2norm_scale_starts_at_its_constant():
    """specs/det/ssd300.net: l2norm's weight is constant(20), which once raised ValueError."""
    from netdsl.runtime.init import init_params
    g = compile_spec("det/ssd300.net")
    w = init_params(g, 0)
    scales = [n for n, p in g.params.items() if p.node.op == "l2norm"]
    assert scales and all((w[n] == 20.0).all() and w[n].dtype == np.float32 for n in scales)


# ---- not-runnable nodes stop Model and `netdsl run` cleanly

RNN_SPEC = """
step cell(x_t: seq, H) {
  carry h = zeros([x_t.N, H])
  h = tanh(linear(h, H, bias=false) + linear(x_t, H, bias=false))
  emit h
}
network r(T = 4) {
  input x: f32[N, T, 3]
  input y: i64[N, T]
  hs = scan cell(x, 5)
  logits = hs -> linear(7)
  output logits
  loss ce = cross_entropy(logits, y)
}
"""


def test_a_pending_operator_inside_a_step_stops_model_at_its_line(tmp_path, monkeypatch):
    """A scan runs its step's operators: one that cannot run stops Model at its own line in
    the step (with the scan's call as a note), not at the scan and never with a KeyError."""
    g = compile_text(tmp_path, RNN_SPEC)
    tanh = next(n for n in g.nodes if n.op == "scan").body.nodes[-1]
    assert tanh.op == "tanh"
    monkeypatch.setattr(OPS["tanh"], "pending", "tanh is made pending for this test")
    for make in (lambda: Model(g).infer({"x": np.zeros((2, 4, 3), np.float32)}),
                 lambda: Model(g).train_step({"x": np.zeros((2, 4, 3), np.float32), "y": np.zeros((2, 4), np.int64)})):
        with pytest.raises(NetdslError, match=r"operator 'tanh' cannot run yet \(cell1.tanh1\)") as e:
            make()
        assert e.value.pos == tanh.pos and e.value.pos.line == 4
        assert any(n.pos.line == 10 for n in e.value.notes)
    with pytest.raises(NetdslError, match="tanh"):     # the executor on its own, past the planner
        Program(g.nodes, list(g.outputs.values()), {"N": 2})


def test_the_first_pending_node_in_graph_order_is_named(tmp_path, monkeypatch):
    for op in ("roi_align", "roi_pool"):     # (both run since the detection kernels)
        monkeypatch.setattr(OPS[op], "pending", "detection operators made pending for this test")
    g = compile_text(tmp_path, """
network d() {
  input image: f32[N, 3, 32, 32]
  input rois: f32[R, 5]
  f = image -> conv(8, k=3, p=1)
  a = roi_align(f, rois, out=2, scale=1.0)
  b = roi_pool(f, rois, out=2, scale=1.0)
  output a, b
}
""")
    with pytest.raises(NetdslError, match=r"'roi_align' cannot run yet \(roi_align1\): detection") as e:
        Model(g)
    assert e.value.pos.line == 6


def test_weighted_and_unweighted_point_losses_run(tmp_path):
    """(Weighted losses were pending until they had kernels; their figures are checked
    against torch in tests/test_weighted_losses.py.)"""
    base = """
network p() {{
  input x: f32[N, 4]
  input t: f32[N, 4]
  input w: f32[N, 4]
  y = x -> linear(4)
  output y
  loss l = {loss}
}}
"""
    r = np.random.default_rng(0)
    feeds = {k: r.standard_normal((3, 4)).astype(np.float32) for k in "xtw"}
    for i, loss in enumerate(("l2(y, t, w)", "smooth_l1(y, t)", 'bce(y, t, w, norm="weight")')):
        g = compile_text(tmp_path, base.format(loss=loss), name=f"u{i}.net")
        assert not_runnable(g.nodes[-1]) is None
        total, *_ = Model(g).train_step(feeds)
        assert np.isfinite(total)


SEQ_DET = sorted((SPECS / "rnn").glob("*.net")) + sorted((SPECS / "det").glob("*.net"))
# Specs whose full-size step is slow here train at their small size (the same operators).
def _sets(**kw):
    return tuple(a for k, v in kw.items() for a in ("--set", f"{k}={v}"))


SMALL = {"det/pose": _sets(size=64, width=8),
         "det/cls_loc": _sets(size=64, width=8, classes=5),
         "det/sliding_window": _sets(size=16, patch=9),
         # the detectors' small variants (docs/cli.md), G ground-truth rows and P proposals
         "det/faster_rcnn": _sets(H=64, W=64, width=8, anchor=16.0, classes=4, G=3),
         "det/fast_rcnn": _sets(H=64, W=64, width=8, classes=4, G=3, P=16),
         "det/rcnn": _sets(size=32, width=8, classes=4, G=3, P=8, H=64, W=64),
         "det/yolo_v1": _sets(size=64, width=8, pools=2, hidden=64, S=4, classes=4, G=3),
         "det/yolo_v1_pretrain": _sets(size=64, width=8, pools=2, classes=4),
         "det/ssd300": _sets(size=64, width=8, extras=2, classes=4, G=3),
         # Mask R-CNN's (at 64 x 64, keypoint head kept) and dense captioning's, as their headers give them
         "det/mask_rcnn": _sets(H=64, W=64, width=8, anchor=24.0, anchor_step=1.4142, rpn_fg_iou=0.5, post_nms=16,
                                test_post_nms=16, rois_per_image=8, detections=4, head_roi=7, classes=4, K=3, G=2),
         "det/densecap": _sets(size=32, width=8, stride=8, anchor=8.0, hidden=32, vocab=20, embed=8, H=16,
                               rois_per_image=8, pre_nms=100, post_nms=16, test_nms=8, coordconv="true",
                               batch_norm="true", dropout=0.0, feed_code="true", G=2, L=5)}
FULL_SIZE_ONLY: set = set()


def _first_pending(path: Path):
    g = compile_spec(path)
    return next((n for n in walk(g.nodes) if not_runnable(n) is not None), None)


def _lengths(g):
    """--set of a recurrent spec's sequence lengths (symbolic T, S): synthetic data needs them."""
    return [a for s in ("T", "S") if s in g.symbols for a in ("--set", f"{s}=4")]


def _infer_once(g):
    """A network without a loss (greedy decoding) cannot train: one batch of 1 through Model."""
    rng = np.random.default_rng(0)
    feeds = {k: (rng.standard_normal if v.dtype.startswith("f") else np.zeros)(
        tuple(d if isinstance(d, int) else 1 for d in v.shape)) for k, v in g.inputs.items()}
    outs = Model(g, seed=0).infer({k: a.astype(np.float32 if a.dtype.kind == "f" else np.int64)
                                   for k, a in feeds.items()})
    assert set(outs) == set(g.outputs)
    assert all(np.isfinite(a).all() for a in outs.values() if a.dtype.kind == "f")


@pytest.mark.parametrize("path", SEQ_DET, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_recurrent_and_detection_specs_train_or_stop_at_their_first_pending_node(path, tmp_path):
    n = _first_pending(path)
    g = compile_spec(path)
    if n is None and not g.losses:
        _infer_once(g)
        return
    if n is None and f"{path.parent.name}/{path.stem}" in FULL_SIZE_ONLY:
        return
    if n is None:   # every operator runs: one step on synthetic data
        r = cli("run", path, *SMALL.get(f"{path.parent.name}/{path.stem}", ()), *_lengths(g), "--data",
                "synthetic:2", "--epochs", "1", "--batch", "1", "--out", tmp_path / "run", "--no-progress")
        assert r.returncode == 0, r.stderr[-3000:]
        return
    where = f"{n.pos.file}:{n.pos.line}:{n.pos.col}"
    for data in (("--data", "synthetic:2"), ()):     # the spec's own data source is never read
        r = cli("run", path, *data, "--out", tmp_path / "run", "--no-progress")
        assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
        assert "Traceback" not in r.stderr
        assert f"{where}: error: operator '{n.op}' cannot run yet" in r.stderr, r.stderr
    assert not any((tmp_path / "run").glob("*"))     # stopped before anything was written
