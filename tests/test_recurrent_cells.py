"""Recurrent cells, attention over locations, sampling and argmax against references.

The fused cells (rnn_cell, lstm_cell in both gate orders, gru_cell): forward, final
state and every gradient (x, h, c and the four parameters) against torch.nn.RNNCell /
LSTMCell / GRUCell with the weights copied, in float32 and float64, on the kernels and
through a compiled network run by `Model`; float64 finite differences on a tiny case;
the hoisted input projection (all steps in one GEMM, then one recurrent step at a
time, backpropagated through time by hand) against torch.nn.LSTM/GRU/RNN over a
sequence; the notes' written-out LSTM (linear over [h; x] and split) agreeing with the
fused cell. Attention scores, the weighted sum and the hard read against torch code
written here; sampling against its distribution (chi-square) and argmax. The CUDA
runtime under the simulator against the CPU (this file run as a script `sim`).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))

from helpers import compile_text  # noqa: E402
from netdsl.errors import NetdslError  # noqa: E402
from netdsl.kernels.cpu import recurrent as R  # noqa: E402
from netdsl.runtime.model import Model  # noqa: E402

if __name__ != "__main__":
    import torch

TOL = {np.float32: 2e-5, np.float64: 1e-12}
GATES = {"rnn": 1, "lstm": 4, "gru": 3}
# (kind, order): lstm in the notes' order i, f, o, g and in torch's i, f, g, o
CELLS = [("rnn", "ifog"), ("lstm", "ifog"), ("lstm", "ifgo"), ("gru", "ifog")]
ERRORS: dict = {}     # worst relative error per (check, dtype), printed at the end of the module


def rel(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def close(got, want, dt, what):
    e = rel(got, want)
    key = (what.split(":")[0], np.dtype(dt).name)
    ERRORS[key] = max(ERRORS.get(key, 0.0), e)
    assert e < TOL[dt], f"{what}: relative error {e:.2e}"


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    for (what, dt), e in sorted(ERRORS.items()):
        print(f"\n  max relative error vs reference  {what:<28} {dt:<8} {e:.1e}", end="")


def to_ours(w, kind, order):
    """torch's gate rows (LSTM: i, f, g, o) in our order: "ifog" swaps the last two blocks."""
    if kind != "lstm" or order == "ifgo":
        return w
    i, f, g, o = np.split(w, 4, axis=0)
    return np.concatenate([i, f, o, g], axis=0)


def torch_cell(kind, D, H, params):
    m = {"rnn": torch.nn.RNNCell, "lstm": torch.nn.LSTMCell, "gru": torch.nn.GRUCell}[kind](D, H).double()
    with torch.no_grad():
        for name, v in params.items():
            getattr(m, name).copy_(torch.tensor(v))
    return m


def problem(kind, N, D, H, seed=0):
    """Inputs, torch-layout parameters (float64) and output gradients of one cell step."""
    rng = np.random.default_rng(seed)
    G = GATES[kind]
    ins = {"x": rng.standard_normal((N, D)), "h": rng.standard_normal((N, H)), "c": rng.standard_normal((N, H))}
    params = {"weight_ih": rng.uniform(-0.6, 0.6, (G * H, D)), "weight_hh": rng.uniform(-0.6, 0.6, (G * H, H)),
              "bias_ih": rng.uniform(-0.5, 0.5, G * H), "bias_hh": rng.uniform(-0.5, 0.5, G * H)}
    grads = {"h": rng.standard_normal((N, H)), "c": rng.standard_normal((N, H))}
    return ins, params, grads


def torch_step(kind, ins, params, grads):
    """h', c', and the gradients of sum(gh * h' + gc * c') for x, h, c and each parameter."""
    N, D = ins["x"].shape
    H = ins["h"].shape[1]
    m = torch_cell(kind, D, H, params)
    t = {k: torch.tensor(v, requires_grad=True) for k, v in ins.items()}
    if kind == "lstm":
        h, c = m(t["x"], (t["h"], t["c"]))
        loss = (h * torch.tensor(grads["h"])).sum() + (c * torch.tensor(grads["c"])).sum()
    else:
        h, c = m(t["x"], t["h"]), None
        loss = (h * torch.tensor(grads["h"])).sum()
    loss.backward()
    out = {"h'": h.detach().numpy(), **{f"g{k}": t[k].grad.numpy() for k in ("x", "h")},
           **{f"g{k}": getattr(m, k).grad.numpy() for k in params}}
    if kind == "lstm":
        out.update({"c'": c.detach().numpy(), "gc": t["c"].grad.numpy()})
    return out


def ours_step(kind, order, ins, params, grads, dt):
    a = lambda v: np.asarray(v, dt)
    lstm = kind == "lstm"
    p = {k: a(to_ours(v, kind, order)) for k, v in params.items()}
    x, h, c = a(ins["x"]), a(ins["h"]), a(ins["c"]) if lstm else None
    h2, c2, acts = R.cell_forward(kind, x, h, c, p["weight_ih"], p["weight_hh"], p["bias_ih"], p["bias_hh"], order)
    gx, gh, gc, gwi, gwh, gbi, gbh = R.cell_backward(kind, acts, a(grads["h"]), a(grads["c"]) if lstm else None,
                                                     x, h, c, p["weight_ih"], p["weight_hh"], order)
    out = {"h'": h2, "gx": gx, "gh": gh, "gweight_ih": to_ours(gwi, kind, order),
           "gweight_hh": to_ours(gwh, kind, order), "gbias_ih": to_ours(gbi, kind, order),
           "gbias_hh": to_ours(gbh, kind, order)}
    if lstm:   # (to_ours swaps the o and g blocks: its own inverse)
        out.update({"c'": c2, "gc": gc})
    for k, v in out.items():
        assert v.dtype == dt, (k, v.dtype)
    return out


# ---------------------------------------------------------------- the cells against torch

@pytest.mark.parametrize("dt", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("kind,order", CELLS, ids=[f"{k}-{o}" for k, o in CELLS])
@pytest.mark.parametrize("size", [(5, 7, 6), (64, 96, 128)], ids=["small", "threads"])
def test_cell_kernels_match_torch(kind, order, dt, size):
    """The second size is above the kernels' parallel threshold: rows split over threads."""
    ins, params, grads = problem(kind, *size)
    want = torch_step(kind, ins, params, grads)
    got = ours_step(kind, order, ins, params, grads, dt)
    assert set(got) == set(want)
    for k in want:
        close(got[k], want[k], dt, f"cell {k}: {kind}-{order}")


@pytest.mark.parametrize("kind,order", CELLS, ids=[f"{k}-{o}" for k, o in CELLS])
def test_cell_gradients_match_finite_differences(kind, order):
    """Every gradient of L = sum(gh * h' + gc * c') by central differences in float64."""
    ins, params, grads = problem(kind, 2, 3, 2, seed=1)
    lstm = kind == "lstm"
    p = {k: to_ours(v, kind, order) for k, v in params.items()}

    def loss(ins, p):
        h2, c2, _ = R.cell_forward(kind, ins["x"], ins["h"], ins["c"] if lstm else None, p["weight_ih"],
                                   p["weight_hh"], p["bias_ih"], p["bias_hh"], order)
        return float((h2 * grads["h"]).sum() + ((c2 * grads["c"]).sum() if lstm else 0.0))

    got = ours_step(kind, order, ins, params, grads, np.float64)
    checked = 0
    for group, names in ((ins, ("x", "h", "c") if lstm else ("x", "h")), (p, tuple(p))):
        for name in names:
            num = np.zeros_like(group[name])
            for i in np.ndindex(num.shape):
                keep = group[name][i]
                group[name][i] = keep + 1e-6
                up = loss(ins, p)
                group[name][i] = keep - 1e-6
                num[i] = (up - loss(ins, p)) / 2e-6
                group[name][i] = keep
                checked += 1
            g = got[f"g{name}"]
            if group is p:
                g = to_ours(g, kind, order)
            e = rel(g, num)
            ERRORS[("finite differences", "float64")] = max(ERRORS.get(("finite differences", "float64"), 0), e)
            assert e < 1e-7, (name, e)
    assert checked == sum(v.size for v in ins.values() if lstm or v is not ins["c"]) + sum(v.size for v in p.values())


def test_a_cell_without_bias_and_a_missing_c_gradient():
    """bias=false (None biases) is the biased cell with zero biases; an LSTM whose c' gets
    no gradient (None) is one whose c' gradient is zero."""
    ins, params, grads = problem("lstm", 4, 5, 3)
    x, h, c, wi, wh = ins["x"], ins["h"], ins["c"], params["weight_ih"], params["weight_hh"]
    z = np.zeros(12)
    a = R.cell_forward("lstm", x, h, c, wi, wh, None, None)
    b = R.cell_forward("lstm", x, h, c, wi, wh, z, z)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    g1 = R.cell_backward("lstm", a[2], grads["h"], None, x, h, c, wi, wh)
    g2 = R.cell_backward("lstm", a[2], grads["h"], np.zeros_like(c), x, h, c, wi, wh)
    for u, v in zip(g1, g2):
        np.testing.assert_array_equal(u, v)


# ---------------------------------------------------------------- the hoisted input projection

@pytest.mark.parametrize("kind", ["rnn", "lstm", "gru"])
def test_hoisted_projection_through_time_matches_torch_sequence(kind):
    """What a time loop does: project x [N, T, D] for every step in one GEMM (rows N*T),
    then cell_step per step; backward in reverse with cell_step_backward summing the
    recurrent weight gradients (accumulate) and one project_backward over all the steps'
    gxp. Against torch.nn.RNN/LSTM/GRU over the sequence (batch_first), loss
    sum(G * outputs) + sum(Gh * h_T) (+ sum(Gc * c_T))."""
    N, T, D, H = 3, 5, 4, 6
    G = GATES[kind]
    rng = np.random.default_rng(7)
    x = rng.standard_normal((N, T, D))
    h0, c0 = rng.standard_normal((N, H)), rng.standard_normal((N, H))
    gout, ghT, gcT = rng.standard_normal((N, T, H)), rng.standard_normal((N, H)), rng.standard_normal((N, H))
    params = {"weight_ih": rng.uniform(-0.5, 0.5, (G * H, D)), "weight_hh": rng.uniform(-0.5, 0.5, (G * H, H)),
              "bias_ih": rng.uniform(-0.5, 0.5, G * H), "bias_hh": rng.uniform(-0.5, 0.5, G * H)}
    lstm = kind == "lstm"

    m = {"rnn": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[kind](D, H, batch_first=True).double()
    with torch.no_grad():
        for k, v in params.items():
            getattr(m, f"{k}_l0").copy_(torch.tensor(v))
    tx, th, tc = (torch.tensor(v, requires_grad=True) for v in (x, h0, c0))
    out, st = m(tx, (th[None], tc[None]) if lstm else th[None])
    loss = (out * torch.tensor(gout)).sum() + (st[0][0] if lstm else st[0]).mul(torch.tensor(ghT)).sum()
    if lstm:
        loss = loss + (st[1][0] * torch.tensor(gcT)).sum()
    loss.backward()

    p = {k: to_ours(v, kind, "ifog") for k, v in params.items()}
    xp = R.project(x.reshape(N * T, D), p["weight_ih"], p["bias_ih"]).reshape(N, T, G * H)
    hs, cs, acts = [h0], [c0], []
    for t in range(T):
        h, c, a = R.cell_step(kind, np.ascontiguousarray(xp[:, t]), hs[-1], cs[-1] if lstm else None,
                              p["weight_hh"], p["bias_hh"])
        hs.append(h)
        cs.append(c)
        acts.append(a)
    outs = np.stack(hs[1:], axis=1)
    close(outs, out.detach().numpy(), np.float64, f"sequence outputs: {kind}")

    gw_hh, gb_hh = np.empty_like(p["weight_hh"]), np.empty_like(p["bias_hh"])
    gxp = np.empty((N, T, G * H))
    gh, gc = ghT.copy(), gcT.copy() if lstm else None
    for t in reversed(range(T)):
        gxp[:, t], gh, gc, _, _ = R.cell_step_backward(kind, acts[t], gh + gout[:, t], gc, hs[t],
                                                       cs[t] if lstm else None, p["weight_hh"], "ifog",
                                                       gw_hh, gb_hh, accumulate=t < T - 1)
    gx, gw_ih, gb_ih = R.project_backward(gxp.reshape(N * T, G * H), x.reshape(N * T, D), p["weight_ih"])
    checks = {"gx": (gx.reshape(N, T, D), tx.grad), "gh0": (gh, th.grad),
              "gweight_ih": (to_ours(gw_ih, kind, "ifog"), m.weight_ih_l0.grad),
              "gweight_hh": (to_ours(gw_hh, kind, "ifog"), m.weight_hh_l0.grad),
              "gbias_ih": (to_ours(gb_ih, kind, "ifog"), m.bias_ih_l0.grad),
              "gbias_hh": (to_ours(gb_hh, kind, "ifog"), m.bias_hh_l0.grad)}
    if lstm:
        checks["gc0"] = (gc, tc.grad)
    for k, (a, b) in checks.items():
        close(a, b.numpy(), np.float64, f"sequence {k}: {kind}")


# ---------------------------------------------------------------- through a compiled network

def cell_spec(kind, N, D, H, order="ifog"):
    """x, h (and c) are parameters shaped by reshape, so the step returns their gradients."""
    lstm = kind == "lstm"
    call = (f'h1, c1 = lstm_cell(x, h0, c0, {H}, order="{order}", name="cell")' if lstm
            else f'h1 = {kind}_cell(x, h0, {H}, name="cell")')
    return f"""
network cell_net() {{
  input one: f32[1, 1]
  input t: f32[{N}, {H}]
  input tc: f32[{N}, {H}]
  x = one -> linear({N * D}, bias=false, name="x") -> reshape([{N}, {D}])
  h0 = one -> linear({N * H}, bias=false, name="h") -> reshape([{N}, {H}])
  c0 = one -> linear({N * H}, bias=false, name="c") -> reshape([{N}, {H}])
  {call}
  y = {"h1 + c0" if not lstm else "h1"}
  output y{", c1" if lstm else ""}
  loss lh = l2(y, t)
  {"loss lc = l2(c1, tc)" if lstm else ""}
}}
"""


@pytest.mark.parametrize("dt", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("kind,order", CELLS, ids=[f"{k}-{o}" for k, o in CELLS])
def test_cell_in_a_network_matches_torch(tmp_path, kind, order, dt):
    N, D, H = 3, 4, 5
    lstm = kind == "lstm"
    g = compile_text(tmp_path, cell_spec(kind, N, D, H, order))
    ins, params, _ = problem(kind, N, D, H, seed=3)
    rng = np.random.default_rng(4)
    t, tc = rng.standard_normal((N, H)), rng.standard_normal((N, H))
    feed = {f"{k}.weight": v.reshape(-1, 1).astype(dt) for k, v in ins.items()}
    feed.update({f"cell.{k}": to_ours(v, kind, order).astype(dt) for k, v in params.items()})
    m = Model(g, params=feed, dtype=dt)
    loss, _, outs, grads = m.train_step({"one": np.ones((1, 1), dt), "t": t.astype(dt), "tc": tc.astype(dt)})

    cell = torch_cell(kind, D, H, params)
    tt = {k: torch.tensor(v, requires_grad=True) for k, v in ins.items()}
    mse = torch.nn.functional.mse_loss
    if lstm:
        h1, c1 = cell(tt["x"], (tt["h"], tt["c"]))
        y = h1
        want_loss = mse(h1, torch.tensor(t)) + mse(c1, torch.tensor(tc))
    else:
        y = cell(tt["x"], tt["h"]) + tt["c"]       # c0 enters the loss directly: its gradient is the loss's
        want_loss = mse(y, torch.tensor(t))
    want_loss.backward()
    want_loss = want_loss.item()
    assert abs(loss - want_loss) <= TOL[dt] * want_loss
    close(outs["y"], y.detach().numpy(), dt, f"network h': {kind}")
    if lstm:
        close(outs["c1"], c1.detach().numpy(), dt, f"network c': {kind}")
    for k in ("x", "h", "c"):
        close(grads[f"{k}.weight"].reshape(tt[k].shape), tt[k].grad.numpy(), dt, f"network g{k}: {kind}")
    for k in params:
        close(to_ours(grads[f"cell.{k}"], kind, order), getattr(cell, k).grad.numpy(), dt, f"network g{k}: {kind}")


WRITTEN_OUT = """
network both() {
  input one: f32[1, 1]
  input t: f32[3, 5]
  x = one -> linear(12, bias=false, name="x") -> reshape([3, 4])
  h0 = one -> linear(15, bias=false, name="h") -> reshape([3, 5])
  c0 = one -> linear(15, bias=false, name="c") -> reshape([3, 5])
  h1, c1 = lstm_cell(x, h0, c0, 5, name="cell")
  i, f, o, g = split(linear(concat(h0, x), 20, name="lin"), 4)
  c2 = sigmoid(f) * c0 + sigmoid(i) * tanh(g)
  h2 = sigmoid(o) * tanh(c2)
  output h1, c1, h2, c2
  loss la = l2(h1, t)
  loss lb = l2(c1, t)
  loss lc = l2(h2, t)
  loss ld = l2(c2, t)
}
"""


def test_the_notes_written_out_lstm_agrees_with_the_fused_cell(tmp_path):
    """The notes' form W [h; x] + b then split into i, f, o, g is lstm_cell with
    W = [weight_hh | weight_ih] and b = bias_ih + bias_hh: same states, and the linear's
    gradients are the cell's, side by side."""
    g = compile_text(tmp_path, WRITTEN_OUT)
    ins, params, _ = problem("lstm", 3, 4, 5, seed=5)
    p = {k: to_ours(v, "lstm", "ifog") for k, v in params.items()}
    feed = {f"{k}.weight": v.reshape(-1, 1) for k, v in ins.items()}
    feed.update({f"cell.{k}": v for k, v in p.items()})
    feed.update({"lin.weight": np.concatenate([p["weight_hh"], p["weight_ih"]], axis=1),
                 "lin.bias": p["bias_ih"] + p["bias_hh"]})
    m = Model(g, params=feed, dtype=np.float64)
    t = np.random.default_rng(6).standard_normal((3, 5))
    _, _, outs, grads = m.train_step({"one": np.ones((1, 1)), "t": t})
    close(outs["h1"], outs["h2"], np.float64, "written-out h'")
    close(outs["c1"], outs["c2"], np.float64, "written-out c'")
    close(grads["cell.weight_hh"], grads["lin.weight"][:, :5], np.float64, "written-out gweight_hh")
    close(grads["cell.weight_ih"], grads["lin.weight"][:, 5:], np.float64, "written-out gweight_ih")
    close(grads["cell.bias_ih"], grads["lin.bias"], np.float64, "written-out gbias")
    close(grads["cell.bias_hh"], grads["lin.bias"], np.float64, "written-out gbias")


# ---------------------------------------------------------------- attention over locations

def torch_attention(f, q, wf, wq, b, ws):
    u = torch.tanh(f @ wf.T + (q @ wq.T + b)[:, None, :])
    return torch.softmax((u @ ws.T)[..., 0], dim=1)


def attention_problem(N, L, D, Q, A, seed=0):
    rng = np.random.default_rng(seed)
    return {"feats": rng.standard_normal((N, L, D)), "query": rng.standard_normal((N, Q)),
            "weight_feat": rng.uniform(-0.5, 0.5, (A, D)), "weight_query": rng.uniform(-0.5, 0.5, (A, Q)),
            "bias": rng.uniform(-0.5, 0.5, A), "weight_score": rng.uniform(-1, 1, (1, A))}


@pytest.mark.parametrize("dt", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("size", [(3, 5, 4, 6, 7), (32, 49, 64, 96, 80)], ids=["small", "threads"])
def test_attention_kernels_match_torch(dt, size):
    v = attention_problem(*size)
    t = {k: torch.tensor(a, requires_grad=True) for k, a in v.items()}
    w = torch_attention(*t.values())
    gw = np.random.default_rng(1).standard_normal(w.shape)
    (w * torch.tensor(gw)).sum().backward()
    a = {k: x.astype(dt) for k, x in v.items()}
    got, u = R.attention_scores(*a.values())
    close(got, w.detach().numpy(), dt, "attention weights")
    grads = R.attention_scores_backward(gw.astype(dt), got, u, a["feats"], a["query"], a["weight_feat"],
                                        a["weight_query"], a["weight_score"])
    for k, g in zip(v, grads):
        close(g, t[k].grad.numpy(), dt, f"attention g{k}")
    # soft and hard reads
    f, wts = t["feats"].detach().requires_grad_(), w.detach().requires_grad_()
    y = (wts[..., None] * f).sum(1)
    gy = np.random.default_rng(2).standard_normal(y.shape)
    (y * torch.tensor(gy)).sum().backward()
    close(R.weighted_sum(a["feats"], got), y.detach().numpy(), dt, "weighted_sum")
    gf, gwts = R.weighted_sum_backward(gy.astype(dt), a["feats"], got)
    close(gf, f.grad.numpy(), dt, "weighted_sum gfeats")
    close(gwts, wts.grad.numpy(), dt, "weighted_sum gweights")
    ix = np.random.default_rng(3).integers(0, size[1], size[0])
    close(R.gather_location(a["feats"], ix), v["feats"][np.arange(size[0]), ix], dt, "gather_location")


ATTENTION = """
network att() {
  input one: f32[1, 1]
  input t: f32[3, 4]
  input where: i64[3]
  feats = one -> linear(60, bias=false, name="f") -> reshape([3, 5, 4])
  q = one -> linear(18, bias=false, name="q") -> reshape([3, 6])
  alpha = attention_scores(feats, q, 7, name="att")
  soft = weighted_sum(feats, alpha)
  hard = gather_location(feats, where)
  best = argmax(alpha)
  output alpha, soft, hard, best
  loss l = l2(soft + hard * 0.5, t)
}
"""


@pytest.mark.parametrize("dt", [np.float32, np.float64], ids=["f32", "f64"])
def test_attention_in_a_network_matches_torch(tmp_path, dt):
    g = compile_text(tmp_path, ATTENTION)
    v = attention_problem(3, 5, 4, 6, 7, seed=8)
    where = np.array([4, 0, 2])
    t = np.random.default_rng(9).standard_normal((3, 4))
    feed = {"f.weight": v["feats"].reshape(-1, 1), "q.weight": v["query"].reshape(-1, 1),
            **{f"att.{k}": v[k] for k in ("weight_feat", "weight_query", "bias", "weight_score")}}
    m = Model(g, params={k: x.astype(dt) for k, x in feed.items()}, dtype=dt)
    loss, _, outs, grads = m.train_step({"one": np.ones((1, 1), dt), "t": t.astype(dt), "where": where})

    tv = {k: torch.tensor(x, requires_grad=True) for k, x in v.items()}
    alpha = torch_attention(*tv.values())
    soft = (alpha[..., None] * tv["feats"]).sum(1)
    hard = tv["feats"][torch.arange(3), torch.tensor(where)]
    want = torch.nn.functional.mse_loss(soft + hard * 0.5, torch.tensor(t))
    want.backward()
    assert abs(loss - want.item()) <= TOL[dt] * want.item()
    close(outs["alpha"], alpha.detach().numpy(), dt, "network attention weights")
    close(outs["soft"], soft.detach().numpy(), dt, "network weighted_sum")
    close(outs["hard"], hard.detach().numpy(), dt, "network gather_location")
    np.testing.assert_array_equal(outs["best"], alpha.detach().numpy().argmax(1))
    assert outs["best"].dtype == np.int64
    close(grads["f.weight"].reshape(3, 5, 4), tv["feats"].grad.numpy(), dt, "network gfeats")
    close(grads["q.weight"].reshape(3, 6), tv["query"].grad.numpy(), dt, "network gquery")
    for k in ("weight_feat", "weight_query", "bias", "weight_score"):
        close(grads[f"att.{k}"], tv[k].grad.numpy(), dt, f"network g{k}")


def test_a_location_outside_the_grid_is_a_located_error(tmp_path):
    g = compile_text(tmp_path, ATTENTION)
    m = Model(g, seed=1)
    msg = r"gather_location \(gather_location1\): index\[1\] = 5 is not a location in \[0, 5\)"
    with pytest.raises(NetdslError, match=msg) as e:
        m.infer({"one": np.ones((1, 1), np.float32), "where": np.array([0, 5, 1])})
    assert e.value.pos is not None and e.value.pos.line == 10


def test_an_integer_fill_is_an_index(tmp_path):
    """fill(..., dtype="i64") makes integers (a decoder's first token, a fixed location),
    whatever the run's float type."""
    g = compile_text(tmp_path, """
network fixed() {
  input one: f32[1, 1]
  feats = one -> linear(60, bias=false, name="f") -> reshape([3, 5, 4])
  y = gather_location(feats, fill([3], 2, dtype="i64"))
  output y
}
""")
    f = np.random.default_rng(0).standard_normal((3, 5, 4))
    for dt in (np.float32, np.float64):
        m = Model(g, params={"f.weight": f.reshape(-1, 1).astype(dt)}, dtype=dt)
        np.testing.assert_array_equal(m.infer({"one": np.ones((1, 1), dt)})["y"], f[:, 2].astype(dt))


# ---------------------------------------------------------------- sampling and argmax

@pytest.mark.parametrize("dt", [np.float32, np.float64], ids=["f32", "f64"])
def test_a_one_hot_distribution_draws_its_hot_index(dt):
    L = 9
    w = np.eye(L, dtype=dt)[np.arange(200) % L]
    for seed in range(5):
        np.testing.assert_array_equal(R.sample_categorical(w, seed), np.arange(200) % L)


@pytest.mark.parametrize("dt", [np.float32, np.float64], ids=["f32", "f64"])
def test_sampled_frequencies_match_the_distribution(dt):
    """Chi-square goodness of fit over 60,000 draws of one distribution (with a zero entry,
    never drawn), at a fixed seed; and the test sees a wrong distribution."""
    from scipy.stats import chisquare
    p = np.array([0.05, 0.1, 0.0, 0.25, 0.4, 0.2])
    rows = 60000
    draws = R.sample_categorical(np.tile(p.astype(dt), (rows, 1)), seed=12345)
    counts = np.bincount(draws, minlength=len(p))
    assert counts[2] == 0
    keep = p > 0
    fit = chisquare(counts[keep], rows * p[keep])
    assert fit.pvalue > 1e-3, (counts, fit)
    wrong = np.array([0.06, 0.1, 0.0, 0.24, 0.4, 0.2])
    assert chisquare(counts[keep], rows * wrong[keep]).pvalue < 1e-6


def test_sampling_repeats_by_seed_and_rows_are_independent():
    p = np.full((500, 10), 0.1, np.float32)
    a, b, c = (R.sample_categorical(p, s) for s in (3, 3, 4))
    np.testing.assert_array_equal(a, b)
    assert (a != c).mean() > 0.8          # other seed: other draws (same index 10% of the time)
    assert len(np.unique(a)) == 10        # rows draw apart, not one draw repeated
    # unnormalised weights are read as proportions; NaN and negative entries are never drawn
    w = np.array([[2.0, 0.0, np.nan, -1.0, 6.0]] * 4000)
    d = R.sample_categorical(w, 5)
    assert set(np.unique(d)) == {0, 4} and abs((d == 4).mean() - 0.75) < 0.03
    np.testing.assert_array_equal(R.sample_categorical(np.array([[0.0, -1.0], [np.nan, 0.0]]), 0), [-1, -1])


def test_sampling_at_temperature_to_zero_is_argmax():
    """softmax(z / T) sampled: as T -> 0 the largest logit's probability goes to 1 (logits
    here at least 0.4 apart, so at T = 0.01 the others share under 12 * e^-40)."""
    rng = np.random.default_rng(0)
    z = rng.permuted(np.tile(np.arange(12.0), (300, 1)), axis=1) * 0.5 + rng.uniform(-0.05, 0.05, (300, 12))
    for temp in (1e-1, 1e-2, 1e-3):
        if temp == 1e-1:       # not yet: some rows draw another index
            e = np.exp((z - z.max(1, keepdims=True)) / temp)
            assert (R.sample_categorical(e / e.sum(1, keepdims=True), 7) != z.argmax(1)).any()
            continue
        e = np.exp((z - z.max(1, keepdims=True)) / temp)
        np.testing.assert_array_equal(R.sample_categorical(e / e.sum(1, keepdims=True), 7), z.argmax(1))


def test_argmax_is_the_first_largest_and_nan_counts_as_largest():
    x = np.array([[1.0, 3.0, 3.0, 2.0], [np.nan, 5.0, 1.0, 7.0], [0.0, 1.0, np.nan, 9.0]])
    np.testing.assert_array_equal(R.argmax(x, -1), [1, 0, 2])
    np.testing.assert_array_equal(R.argmax(x, -1), torch.argmax(torch.tensor(x), -1).numpy())
    y = np.random.default_rng(0).standard_normal((3, 4, 5))
    for ax in (0, 1, 2, -1):
        np.testing.assert_array_equal(R.argmax(y, ax), torch.argmax(torch.tensor(y), ax).numpy())


SAMPLE = """
network s() {
  input logits: f32[N, 6]
  x = logits -> linear(6, name="lin")
  pick = sample_categorical(softmax(x))
  output pick
  loss l = l2(x, logits)
}
"""


def test_sampling_in_a_network_is_seeded_by_run_step_and_node(tmp_path):
    """Like dropout: the same seed and step draw the same samples; another step or seed,
    others. No gradient flows through the sample (the loss trains lin only)."""
    g = compile_text(tmp_path, SAMPLE)
    z = np.zeros((400, 6), np.float32)
    draws = {}
    for seed, step in ((0, 0), (0, 0), (0, 1), (1, 0)):
        m = Model(g, params={"lin.weight": np.eye(6, dtype=np.float32), "lin.bias": np.zeros(6, np.float32)},
                  seed=seed)
        m.step = step
        _, _, outs, grads = m.train_step({"logits": z})
        assert set(grads) == {"lin.weight", "lin.bias"}
        draws.setdefault((seed, step), []).append(outs["pick"])
    np.testing.assert_array_equal(*draws[(0, 0)])
    assert (draws[(0, 0)][0] != draws[(0, 1)][0]).mean() > 0.6
    assert (draws[(0, 0)][0] != draws[(1, 0)][0]).mean() > 0.6
    assert len(np.unique(draws[(0, 0)][0])) == 6


# ---------------------------------------------------------------- CUDA, under the simulator

SIM_SPEC = """
network sim() {
  input one: f32[1, 1]
  input t: f32[2, 3]
  x = one -> linear(8, bias=false, name="x") -> reshape([2, 4])
  h0 = one -> linear(6, bias=false, name="h") -> reshape([2, 3])
  feats = one -> linear(30, bias=false, name="f") -> reshape([2, 5, 3])
  a = rnn_cell(x, h0, 3, name="rnn")
  b, c = lstm_cell(x, a, h0, 3, name="lstm")
  d = gru_cell(x, b * c, 3, name="gru")
  alpha = attention_scores(feats, d, 4, name="att")
  where = sample_categorical(alpha)
  best = argmax(alpha)
  y = weighted_sum(feats, alpha) + gather_location(feats, where) * 0.5 + gather_location(feats, best)
  output y, where, best
  loss l = l2(y, t)
}
"""


def test_cuda_runtime_matches_cpu_under_the_simulator():
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
    p = subprocess.run([sys.executable, str(HERE), "sim"], capture_output=True, text=True, env=env,
                       cwd=HERE.parent.parent, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["samples_equal"] and r["argmax_equal"]
    assert len(r["grads"]) == 19, sorted(r["grads"])
    bad = {k: v for k, v in {**r["grads"], "loss": r["loss"], "y": r["y"]}.items() if not v < 1e-5}
    assert not bad, bad


def _script_sim():
    import tempfile
    import warnings
    warnings.simplefilter("ignore")      # the simulator's uint64 hash overflows on purpose
    with tempfile.TemporaryDirectory() as tmp:
        g = compile_text(tmp, SIM_SPEC)
    cpu = Model(g, seed=3)
    gpu = Model(g, params={k: v.copy() for k, v in cpu.params.items()}, device="cuda", seed=3)
    t = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    feeds = {"one": np.ones((1, 1), np.float32), "t": t}
    lc, _, oc, gc = cpu.train_step(feeds)
    lg, _, og, gg = gpu.train_step(feeds)
    host = lambda a: a.copy_to_host() if hasattr(a, "copy_to_host") else np.asarray(a)
    return {"loss": abs(lg - lc) / abs(lc), "y": rel(host(og["y"]), oc["y"]),
            "grads": {k: rel(host(gg[k]), gc[k]) for k in gc},
            "samples_equal": bool(np.array_equal(host(og["where"]), oc["where"])),
            "argmax_equal": bool(np.array_equal(host(og["best"]), oc["best"]))}


if __name__ == "__main__":
    print(json.dumps({"sim": _script_sim}[sys.argv[1]]()))
