"""The layer kernels (kernels/cpu/recurrent_layer.py): a scan whose step is one fused
lstm_cell or rnn_cell runs as one kernel call each way. Against torch.nn.LSTM and
torch.nn.RNN (outputs, final states and every gradient, float64) with the hidden units in 1, 2 and 3 threads' shares (7
units: shares of unequal size), and in a network against the per-step scan it
replaces: the same loss, outputs, final states and gradients, with state carried in
(truncated BPTT) and with --grad-flow (which takes the per-step path)."""
import numpy as np
import pytest
import torch

from helpers import compile_text
from netdsl.kernels.cpu import recurrent_layer as L
from netdsl.runtime import scan as rscan
from netdsl.runtime.model import Model
from test_scan import FUSED, STACK, data

TORCH_ROWS = {"ifog": [0, 1, 3, 2], "ifgo": [0, 1, 2, 3]}     # torch's i, f, g, o from our blocks


@pytest.mark.parametrize("cell", ["lstm-ifog", "lstm-ifgo", "rnn"])
@pytest.mark.parametrize("shares", [1, 2, 3])
def test_layer_matches_torch(monkeypatch, cell, shares):
    """shares: how many threads' shares the units are split into (3 on this 2-core machine
    too: prange runs the shares on the threads it has)."""
    monkeypatch.setattr(L, "_threads", lambda k, size, rows: (k.parallel if shares > 1 else k.serial, shares))
    kind, _, order = cell.partition("-")
    G = 4 if kind == "lstm" else 1
    N, T, D, H = 3, 6, 4, 7
    r = np.random.default_rng(5)
    x, h0, c0 = r.standard_normal((N, T, D)), r.standard_normal((N, H)), r.standard_normal((N, H))
    w_ih, w_hh = r.standard_normal((G * H, D)) * 0.5, r.standard_normal((G * H, H)) * 0.5
    b_ih, b_hh = r.standard_normal(G * H), r.standard_normal(G * H)
    ghs, gh_T, gc_T = r.standard_normal((N, T, H)), r.standard_normal((N, H)), r.standard_normal((N, H))
    lstm = kind == "lstm"

    hs, h_T, c_T, saved = L.layer_forward(kind, x, h0, c0 if lstm else None, w_ih, w_hh, b_ih, b_hh, order or "ifog",
                                          keep=True)
    gx, gh0, gc0, gw_ih, gw_hh, gb = L.layer_backward(saved, ghs, gh_T, gc_T if lstm else None, need_gx=True)

    rows = (lambda a: np.concatenate([np.split(a, 4)[k] for k in TORCH_ROWS[order]])) if lstm else (lambda a: a)
    ref = (torch.nn.LSTM if lstm else torch.nn.RNN)(D, H, batch_first=True).double()
    with torch.no_grad():
        for name, v in (("weight_ih_l0", w_ih), ("weight_hh_l0", w_hh), ("bias_ih_l0", b_ih), ("bias_hh_l0", b_hh)):
            getattr(ref, name).copy_(torch.tensor(rows(v)))
    tx, th, tc = (torch.tensor(a, requires_grad=True) for a in (x, h0[None], c0[None]))
    ths, fin = ref(tx, (th, tc) if lstm else th)
    thT, tcT = fin if lstm else (fin, None)
    loss = (ths * torch.tensor(ghs)).sum() + (thT[0] * torch.tensor(gh_T)).sum()
    if lstm:
        loss = loss + (tcT[0] * torch.tensor(gc_T)).sum()
    loss.backward()
    close = lambda a, b: np.testing.assert_allclose(a, b.detach().numpy(), rtol=1e-10, atol=1e-12)
    close(hs, ths), close(h_T, thT[0]), close(gx, tx.grad), close(gh0, th.grad[0])
    if lstm:
        close(c_T, tcT[0]), close(gc0, tc.grad[0])
    else:
        assert c_T is None and gc0 is None
    close(rows(gw_ih), ref.weight_ih_l0.grad), close(rows(gw_hh), ref.weight_hh_l0.grad)
    close(rows(gb), ref.bias_ih_l0.grad), close(rows(gb), ref.bias_hh_l0.grad)
    # inference keeps nothing and gives the same outputs
    hs2, h2, c2, none = L.layer_forward(kind, x, h0, c0 if lstm else None, w_ih, w_hh, b_ih, b_hh, order or "ifog")
    assert none is None
    np.testing.assert_array_equal(hs2, hs), np.testing.assert_array_equal(h2, h_T)


def test_float32_layer_agrees_with_float64():
    N, T, D, H = 4, 9, 5, 16
    r = np.random.default_rng(6)
    args = [r.standard_normal(s) * 0.5 for s in ((N, T, D), (N, H), (N, H), (4 * H, D), (4 * H, H), (4 * H,), (4 * H,))]
    ghs = r.standard_normal((N, T, H))
    got = [L.layer_forward("lstm", *[a.astype(dt) for a in args], "ifog", keep=True) for dt in (np.float32, np.float64)]
    np.testing.assert_allclose(got[0][0], got[1][0], rtol=1e-4, atol=1e-5)
    assert got[0][0].dtype == np.float32
    back = [L.layer_backward(g[3], ghs.astype(g[0].dtype)) for g in got]
    for a, b in zip(back[0], back[1]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def _run(tmp_path, monkeypatch, kind, layer: bool, **kw):
    monkeypatch.setattr(rscan.CpuArrays, "layer", layer)
    calls = []
    real = L.layer_forward
    monkeypatch.setattr("netdsl.kernels.cpu.layer_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    spec = STACK.replace("{cell}", "lstm") if kind == "lstm-written" else FUSED.replace("{cell}", kind)
    g = compile_text(tmp_path, spec, name=f"n{int(layer)}.net")
    m = Model(g, dtype=np.float64, seed=3)
    x, y = data(N=3, T=5)
    out = m.train_step({"x": x, "y": y}, **kw)
    return out, m, calls


@pytest.mark.parametrize("kind", ["lstm", "rnn", "lstm-written"])
@pytest.mark.parametrize("how", ["plain", "carry", "grad_flow"])
def test_layer_path_equals_the_per_step_scan(tmp_path, monkeypatch, kind, how):
    """lstm-written: lib/rnn.net's lstm step as the notes write it (one W over [h; x])."""
    r = np.random.default_rng(7)
    kw = {"carry": {f"layer{l}.rnn.{s}": r.standard_normal((3, 5)) for l in (1, 2) for s in "hc"[:1 if kind == "rnn"
                                                                                                  else 2]}} \
        if how == "carry" else {"grad_flow": True} if how == "grad_flow" else {}
    (la, _, oa, ga), ma, calls = _run(tmp_path, monkeypatch, kind, True, **kw)
    assert len(calls) == (0 if how == "grad_flow" else 2)     # grad_flow records per step: the step path
    (lb, _, ob, gb), mb, none = _run(tmp_path, monkeypatch, kind, False, **kw)
    assert not none
    assert abs(la - lb) < 1e-12
    np.testing.assert_allclose(oa["logits"], ob["logits"], rtol=1e-11, atol=1e-13)
    for k in ma.carries:
        np.testing.assert_allclose(ma.carries[k], mb.carries[k], rtol=1e-11, atol=1e-13, err_msg=k)
    assert set(ga) == set(gb)
    for k in ga:
        np.testing.assert_allclose(ga[k], gb[k], rtol=1e-10, atol=1e-13, err_msg=k)


def test_explain_says_which_scans_run_as_the_layer_kernel(capsys):
    """`compile --explain` names the loop that runs as the layer kernel and what it keeps:
    per step the [h; x; 1] column block, an lstm's five gate rows and c, N x (H + D + 1
    + 6H) values (here N 4, H 256, D 64: 29.0 KiB); the notes' written-out cell runs its
    step."""
    from helpers import SPECS
    from netdsl.cli import main
    spec = str(SPECS / "rnn" / "charlm_lstm.net")
    args = ["compile", spec, "--explain", "--set", "T=10", "--batch", "4", "--set", "layers=1"]
    assert main(args + ["--set", "fused=true"]) == 0
    out = capsys.readouterr().out
    assert "on the CPU one layer kernel each way, keeping 29.0 KiB per step (0.3 MiB)" in out
    assert main(args + ["--set", "fused=true", "--json"]) == 0
    import json
    loop, = json.loads(capsys.readouterr().out)["plan"]["loops"]
    assert loop["cpu_layer_saved_per_step"] == 4 * (256 + 64 + 1 + 6 * 256) * 4
    assert main(args) == 0      # the notes' lstm written out runs as the layer kernel too
    assert "on the CPU one layer kernel each way, keeping 29.0 KiB per step (0.3 MiB)" in capsys.readouterr().out
    assert main(["compile", str(SPECS / "rnn" / "charlm_gru.net"), "--explain", "--set", "T=10", "--batch", "4"]) == 0
    assert "layer kernel" not in capsys.readouterr().out
    # an rnn keeps only its [h; x; 1] columns: 4 x (256 + 64 + 1) values a step
    assert main(["compile", str(SPECS / "rnn" / "charlm_rnn.net"), "--explain", "--set", "T=10", "--batch", "4",
                 "--set", "layers=1", "--set", "fused=true", "--json"]) == 0
    loop, = json.loads(capsys.readouterr().out)["plan"]["loops"]
    assert loop["cpu_layer_saved_per_step"] == 4 * (256 + 64 + 1) * 4


NEAR = """step near(x_t: seq, H, h0 = zeros([x_t.N, H]), c0 = zeros([x_t.N, H])) {
  carry h = h0, c = c0
  i, f, o, g = split(linear(concat(h, x_t), 4 * H, name="W"), 4)
  c = {c_eq}
  h = sigmoid(o) * tanh(c)
  emit h
}
network n(D = 3, H = 5, V = 7) {
  input x: f32[N, T, D]
  input y: i64[N, T]
  hs = scan near(x, H, name="rnn")
  logits = hs -> linear(V, name="head")
  output logits
  loss ce = cross_entropy(logits, y)
}
"""


@pytest.mark.parametrize("c_eq, layer", [
    ("sigmoid(f) * c + sigmoid(i) * tanh(g)", True),
    ("tanh(g) * sigmoid(i) + c * sigmoid(f)", True),        # the same, operands the other way round
    ("sigmoid(i) * c + sigmoid(f) * tanh(g)", False),       # i and f trade places: not the notes' LSTM
    ("sigmoid(f) * c + sigmoid(i) * sigmoid(g)", False),
    ("sigmoid(f) * c + sigmoid(i) * tanh(g) * 2", False),   # a node more
])
def test_only_the_notes_lstm_written_out_is_taken_for_the_layer(tmp_path, monkeypatch, c_eq, layer):
    """A step that differs from the notes' LSTM in any way runs its own program; either way
    the training step equals the per-step path's."""
    from netdsl.lang.elaborate import elaborate
    from netdsl.layer_match import match
    path = tmp_path / "near.net"
    path.write_text(NEAR.replace("{c_eq}", c_eq))
    g, _ = elaborate(str(path), None, {})
    scan = next(n for n in g.nodes if n.op == "scan")
    assert (match(scan) is not None) == layer
    x, y = data(N=2, T=3)
    out = []
    for on in (True, False):
        monkeypatch.setattr(rscan.CpuArrays, "layer", on)
        g, _ = elaborate(str(path), None, {})
        out.append(Model(g, dtype=np.float64, seed=4).train_step({"x": x, "y": y}))
    assert abs(out[0][0] - out[1][0]) < 1e-12
    for k in out[0][3]:
        np.testing.assert_allclose(out[0][3][k], out[1][3][k], rtol=1e-10, atol=1e-13, err_msg=k)
