"""`scan` runs and trains: the step graph applied over time, its backward pass generated
from the step's VJP and run in reverse, against torch autograd through the same
recurrence written in torch, and against float64 finite differences. Truncated BPTT
(state fed from the previous chunk) against a torch loop that detaches the state."""
import numpy as np
import pytest
import torch

from helpers import SPECS, compile_text
from netdsl.runtime.model import Model

LIB = f'import "{SPECS}/lib/rnn.net"\n'


def net(body: str, inputs="input x: f32[N, T, D]\n  input y: i64[N, T]", params="D = 3, H = 5, V = 7"):
    return LIB + f"network n({params}) {{\n  {inputs}\n{body}\n}}\n"


STACK = net("""  hs = stacked(x, {cell}, H, 2, name="")
  logits = hs -> linear(V, name="head")
  output logits
  loss ce = cross_entropy(logits, y)""")


def torch_cell(kind, P, prefix, x_t, state):
    """The notes' written-out cells of specs/lib/rnn.net, in torch."""
    lin = lambda name, v: v @ P[f"{prefix}.{name}.weight"].T + (P[f"{prefix}.{name}.bias"]
                                                                 if f"{prefix}.{name}.bias" in P else 0)
    if kind == "rnn":
        (h,) = state
        return (torch.tanh(lin("W_hh", h) + lin("W_xh", x_t)),)
    if kind == "lstm":
        h, c = state
        i, f, o, g = lin("W", torch.cat([h, x_t], 1)).chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
    (h,) = state
    r, z = torch.sigmoid(lin("W_rz", torch.cat([h, x_t], 1))).chunk(2, 1)
    n = torch.tanh(lin("W_xn", x_t) + r * lin("W_hn", h))
    return ((1 - z) * n + z * h,)


def torch_stack(kind, P, x, layers=2, H=5, states=None):
    """hs of a stack of scans; states: per layer initial state (or zeros); returns logits and finals."""
    N, T, _ = x.shape
    finals = []
    for l in range(layers):
        prefix = f"layer{l + 1}.rnn"
        state = (states[l] if states else
                 tuple(torch.zeros(N, H, dtype=x.dtype) for _ in range(2 if kind == "lstm" else 1)))
        hs = []
        for t in range(T):
            state = torch_cell(kind, P, prefix, x[:, t], state)
            hs.append(state[0])
        x = torch.stack(hs, 1)
        finals.append(state)
    return x @ P["head.weight"].T + P["head.bias"], finals


def torch_loss(logits, y):
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def data(N=2, T=4, D=3, V=7, seed=0, dtype=np.float64):
    r = np.random.default_rng(seed)
    return r.standard_normal((N, T, D)).astype(dtype), r.integers(0, V, (N, T))


@pytest.mark.parametrize("kind", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("fuse", [True, False])
def test_stacked_written_out_cells_match_torch_autograd(tmp_path, kind, fuse):
    g = compile_text(tmp_path, STACK.replace("{cell}", kind))
    m = Model(g, dtype=np.float64, fuse=fuse, seed=1)
    x, y = data()
    total, _, outs, grads = m.train_step({"x": x, "y": y})
    P = {k: torch.tensor(v, requires_grad=True) for k, v in m.host_params().items()}
    logits, _ = torch_stack(kind, P, torch.tensor(x))
    loss = torch_loss(logits, torch.tensor(y))
    loss.backward()
    assert abs(total - loss.item()) < 1e-12
    np.testing.assert_allclose(outs["logits"], logits.detach().numpy(), rtol=1e-10, atol=1e-12)
    assert set(grads) == set(P)
    for k, p in P.items():
        np.testing.assert_allclose(grads[k], p.grad.numpy(), rtol=1e-9, atol=1e-12, err_msg=k)


def test_float32_step_matches_torch(tmp_path):
    g = compile_text(tmp_path, STACK.replace("{cell}", "lstm"))
    m = Model(g, seed=2)
    x, y = data(N=3, T=6, dtype=np.float32)
    total, _, _, grads = m.train_step({"x": x, "y": y})
    P = {k: torch.tensor(v, requires_grad=True) for k, v in m.host_params().items()}
    loss = torch_loss(torch_stack("lstm", P, torch.tensor(x))[0], torch.tensor(y))
    loss.backward()
    assert abs(total - loss.item()) < 1e-5
    for k, p in P.items():
        np.testing.assert_allclose(grads[k], p.grad.numpy(), rtol=1e-4, atol=1e-6, err_msg=k)


CAPTURE = net("""  ctx = mean(x, 1) -> linear(H, name="ctx")        # an outer tensor the step reads
  hs, hT = scan reader(x, ctx, H, name="rnn")
  logits = hs -> linear(V, name="head")
  output logits, hT
  loss ce = cross_entropy(logits, y)""").replace("network", """step reader(x_t: seq, ctx, H) {
  carry h = ctx -> linear(H, name="h0") -> tanh
  h = tanh(linear(x_t, H, name="W_xh") + linear(h, H, bias=false, name="W_hh") * ctx)
  emit h
}

network""")


def test_captured_tensors_and_initial_state_get_gradients(tmp_path):
    """The step reads `ctx` from outside (a capture, now an input of the scan) and the carry
    starts from a function of it: gradients reach both producers' parameters."""
    g = compile_text(tmp_path, CAPTURE)
    (scan,) = [n for n in g.nodes if n.op == "scan"]
    assert scan.attrs["captures"] == ["ctx"] and scan.inputs[-1] is next(
        n for n in g.nodes if n.path == "ctx").outputs[0]
    m = Model(g, dtype=np.float64)
    x, y = data()
    total, _, outs, grads = m.train_step({"x": x, "y": y})
    P = {k: torch.tensor(v, requires_grad=True) for k, v in m.host_params().items()}
    X = torch.tensor(x)
    ctx = X.mean(1) @ P["ctx.weight"].T + P["ctx.bias"]
    h = torch.tanh(ctx @ P["rnn.h0.weight"].T + P["rnn.h0.bias"])
    hs = []
    for t in range(x.shape[1]):
        h = torch.tanh(X[:, t] @ P["rnn.W_xh.weight"].T + P["rnn.W_xh.bias"] + (h @ P["rnn.W_hh.weight"].T) * ctx)
        hs.append(h)
    logits = torch.stack(hs, 1) @ P["head.weight"].T + P["head.bias"]
    loss = torch_loss(logits, torch.tensor(y))
    loss.backward()
    assert abs(total - loss.item()) < 1e-12
    np.testing.assert_allclose(outs["hT"], h.detach().numpy(), rtol=1e-10)
    for k, p in P.items():
        np.testing.assert_allclose(grads[k], p.grad.numpy(), rtol=1e-9, atol=1e-12, err_msg=k)


def test_gradients_match_finite_differences(tmp_path):
    g = compile_text(tmp_path, STACK.replace("{cell}", "gru"))
    m = Model(g, dtype=np.float64, seed=3)
    x, y = data(T=3)
    _, _, _, grads = m.train_step({"x": x, "y": y})
    grads = {k: np.array(v) for k, v in grads.items()}
    r = np.random.default_rng(0)
    for name in ("layer1.rnn.W_rz.weight", "layer2.rnn.W_hn.bias", "head.weight"):
        p = m.params[name]
        for _ in range(3):
            i = tuple(r.integers(0, s) for s in p.shape)
            old = p[i]
            p[i] = old + 1e-6
            up = m.train_step({"x": x, "y": y})[0]
            p[i] = old - 1e-6
            down = m.train_step({"x": x, "y": y})[0]
            p[i] = old
            assert abs((up - down) / 2e-6 - grads[name][i]) < 1e-7, name


def test_truncated_bptt_equals_a_torch_loop_that_detaches_the_state(tmp_path):
    """Chunks of a long sequence: each chunk starts from the previous chunk's final state
    (Model(carry=...)), and no gradient flows into the previous chunk."""
    g = compile_text(tmp_path, STACK.replace("{cell}", "lstm"))
    m = Model(g, dtype=np.float64, seed=4)
    x, y = data(T=8, seed=5)
    P = {k: torch.tensor(v, requires_grad=True) for k, v in m.host_params().items()}
    state, carry = None, None
    for c in range(2):
        sl = slice(4 * c, 4 * c + 4)
        total, _, _, grads = m.train_step({"x": x[:, sl], "y": y[:, sl]}, carry=carry)
        carry = {k: np.array(v) for k, v in m.carries.items()}
        for p in P.values():
            p.grad = None
        logits, finals = torch_stack("lstm", P, torch.tensor(x[:, sl]), states=state)
        loss = torch_loss(logits, torch.tensor(y[:, sl]))
        loss.backward()
        state = [tuple(s.detach() for s in f) for f in finals]
        assert abs(total - loss.item()) < 1e-12
        for k, p in P.items():
            np.testing.assert_allclose(grads[k], p.grad.numpy(), rtol=1e-9, atol=1e-12, err_msg=(c, k))
    assert set(carry) == {"layer1.rnn.h", "layer1.rnn.c", "layer2.rnn.h", "layer2.rnn.c"}
    np.testing.assert_allclose(carry["layer2.rnn.h"], state[1][0].numpy(), rtol=1e-10)


def test_one_chunk_of_truncated_bptt_equals_full_bptt(tmp_path):
    """Truncated BPTT with the chunk as long as the sequence is full BPTT: the same step."""
    g = compile_text(tmp_path, STACK.replace("{cell}", "rnn"))
    x, y = data(T=6)
    a = Model(g, dtype=np.float64, seed=6)
    zeros = {k: np.zeros((2, 5)) for k in ("layer1.rnn.h", "layer2.rnn.h")}
    ta, _, _, ga = a.train_step({"x": x, "y": y}, carry=zeros)
    b = Model(g, dtype=np.float64, seed=6)
    tb, _, _, gb = b.train_step({"x": x, "y": y})
    assert ta == tb
    for k in ga:
        assert np.array_equal(ga[k], gb[k]), k


def test_inference_carries_state_from_call_to_call(tmp_path):
    """Running T steps at once equals running them one at a time with the state fed back."""
    g = compile_text(tmp_path, STACK.replace("{cell}", "gru"))
    m = Model(g, dtype=np.float64)
    x, _ = data(T=5)
    whole = m.infer({"x": x})["logits"]
    carry, steps = None, []
    for t in range(5):
        steps.append(m.infer({"x": x[:, t:t + 1]}, carry=carry)["logits"])
        carry = m.carries
    np.testing.assert_allclose(np.concatenate(steps, 1), whole, rtol=1e-12)


def test_unknown_carry_name_is_a_clear_error(tmp_path):
    from netdsl.errors import NetdslError
    g = compile_text(tmp_path, STACK.replace("{cell}", "rnn"))
    with pytest.raises(NetdslError, match="no recurrent state named layer9.rnn.h; the network carries "
                                          "layer1.rnn.h, layer2.rnn.h"):
        Model(g).infer({"x": data(dtype=np.float32)[0]}, carry={"layer9.rnn.h": np.zeros((2, 5))})


DROPOUT = net("""  hs = scan noisy(x, H, name="rnn")
  logits = hs -> linear(V, name="head")
  output logits
  loss ce = cross_entropy(logits, y)""").replace("network", """step noisy(x_t: seq, H) {
  carry h = zeros([x_t.N, H])
  h = tanh(linear(concat(h, x_t), H, name="W")) -> dropout(0.5)
  emit h
}

network""")


def test_dropout_in_a_step_draws_a_new_mask_at_every_step(tmp_path):
    g = compile_text(tmp_path, DROPOUT)
    m = Model(g, dtype=np.float64)
    x = np.ones((4, 6, 3))
    m.train_step({"x": x, "y": np.zeros((4, 6), np.int64)})
    # the masks a step's backward used are those its forward drew: finite differences agree
    (scan,) = [n for n in g.nodes if n.op == "scan"]
    from netdsl.runtime.scan import StepState
    from netdsl.runtime.executor import RunState
    st = RunState({}, {}, True, seed=0)
    (drop,) = [n for n in scan.body.nodes if n.op == "dropout"]
    seeds = {StepState(st, t).seed_for(drop) for t in range(6)}
    assert len(seeds) == 6
    # and the emitted states differ in which units are zeroed from step to step
    hs_model = Model(compile_text(tmp_path, DROPOUT.replace("output logits", "output logits, hs"),
                                  name="d2.net"), dtype=np.float64)
    outs = hs_model.train_step({"x": x, "y": np.zeros((4, 6), np.int64)})[2]
    zero = outs["hs"] == 0
    assert 0.3 < zero.mean() < 0.7
    assert any(not np.array_equal(zero[:, 0], zero[:, t]) for t in range(1, 6))


def test_grad_flow_is_the_gradient_reaching_each_state_from_later_steps(tmp_path):
    """|dL/dh_t| through the recurrence only (what flows back from steps t+1..T-1), per
    layer, against torch: the state handed to the next step is a separate tensor."""
    g = compile_text(tmp_path, STACK.replace("{cell}", "rnn"))
    m = Model(g, dtype=np.float64, seed=9)
    x, y = data(T=6)
    m.train_step({"x": x, "y": y}, grad_flow=True)
    P = {k: torch.tensor(v, requires_grad=True) for k, v in m.host_params().items()}
    inp, passes = torch.tensor(x), {}
    for l in (1, 2):
        h, hs = torch.zeros(2, 5, dtype=torch.float64), []
        for t in range(6):
            (h,) = torch_cell("rnn", P, f"layer{l}.rnn", inp[:, t], (h,))
            hs.append(h)
            h = h + 0           # the state as the next step reads it
            h.retain_grad()
            passes[(l, t)] = h
        inp = torch.stack(hs, 1)
    torch_loss(inp @ P["head.weight"].T + P["head.bias"], torch.tensor(y)).backward()
    for l in (1, 2):
        want = [0.0 if passes[(l, t)].grad is None else passes[(l, t)].grad.norm().item() for t in range(6)]
        np.testing.assert_allclose(m.grad_flow[f"layer{l}.rnn.h"], want, rtol=1e-10, atol=1e-15)
    assert m.grad_flow["layer1.rnn.h"][5] == 0.0 and m.grad_flow["layer1.rnn.h"][0] > 0


def test_grad_flow_from_the_cli_writes_its_plot(tmp_path):
    from helpers import cli
    r = cli("run", SPECS / "rnn/vanilla_rnn.net", "--data", "synthetic:8", "--set", "T=7", "--epochs", "2",
            "--batch", "4", "--grad-flow", "--out", tmp_path, "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    import json
    rec = json.loads((tmp_path / "grad_flow.json").read_text())["epochs"]
    assert [e["epoch"] for e in rec] == [1, 2] and len(rec[1]["norms"]["rnn1.h"]) == 7
    assert (tmp_path / "grad_flow.png").read_bytes()[:4] == b"\x89PNG"
    r = cli("run", SPECS / "digits_cnn.net", "--epochs", "1", "--grad-flow", "--out", tmp_path / "cnn")
    assert r.returncode == 2 and "has no recurrent state" in r.stderr


def test_explain_shows_each_scan_as_a_loop_with_its_saved_values(capsys):
    """`netdsl compile --explain` reports the loop and what it keeps per step for the backward,
    and counts it in the peak; the JSON plan has the same figures."""
    import json
    from netdsl.cli import main
    from netdsl.autodiff import step_grad
    spec = SPECS / "rnn/charlm_gru.net"
    assert main(["compile", str(spec), "--explain", "--set", "T=10", "--batch", "4"]) == 0
    out = capsys.readouterr().out
    assert "loop         layer1.rnn: 10 steps of a" in out and "loop         layer2.rnn: 10 steps" in out
    assert "the loops keep for their backward" in out
    assert main(["compile", str(spec), "--explain", "--json", "--set", "T=10", "--batch", "4"]) == 0
    loops = json.loads(capsys.readouterr().out)["plan"]["loops"]
    g = compile_spec_rnn("charlm_gru", T=10)
    scan = next(n for n in g.nodes if n.op == "scan" and n.path == "layer1.rnn")
    per_step = sum(4 * int(np.prod([4 if not isinstance(d, int) else d for d in v.shape]))
                   for v in step_grad(scan).residuals)
    assert loops[0]["path"] == "layer1.rnn" and loops[0]["steps"] == 10
    assert loops[0]["saved_per_step"] == per_step and loops[0]["saved"] == 10 * per_step


def compile_spec_rnn(name, **kw):
    from helpers import compile_spec
    return compile_spec(f"rnn/{name}.net", **kw)


FUSED = net("""  hs = stacked(x, {cell}, H, 2, fused=true, name="")
  logits = hs -> linear(V, name="head")
  output logits
  loss ce = cross_entropy(logits, y)""")


@pytest.mark.parametrize("kind", ["rnn", "lstm", "gru"])
def test_fused_cell_stacks_match_torch_num_layers(tmp_path, kind):
    """The torch-layout cells in a 2-layer stack (input projections hoisted out of the time
    loop, runtime/scan.py) against torch.nn.RNN/LSTM/GRU(num_layers=2): outputs, final
    states and every gradient."""
    g = compile_text(tmp_path, FUSED.replace("{cell}", kind))
    m = Model(g, dtype=np.float64, seed=11)
    x, y = data(N=3, T=5)
    total, _, outs, grads = m.train_step({"x": x, "y": y})
    ref = {"rnn": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[kind](3, 5, num_layers=2,
                                                                               batch_first=True).double()
    P = m.host_params()
    with torch.no_grad():
        for l in range(2):
            for role in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                w = P[f"layer{l + 1}.rnn.cell.{role}"]
                if kind == "lstm":      # the notes' gate rows i, f, o, g -> torch's i, f, g, o
                    i, f, o, gg = np.split(w, 4)
                    w = np.concatenate([i, f, gg, o])
                getattr(ref, f"{role}_l{l}").copy_(torch.tensor(w))
    head_w = torch.tensor(P["head.weight"], requires_grad=True)
    head_b = torch.tensor(P["head.bias"], requires_grad=True)
    hs, finals = ref(torch.tensor(x))
    logits = hs @ head_w.T + head_b
    loss = torch_loss(logits, torch.tensor(y))
    loss.backward()
    assert abs(total - loss.item()) < 1e-12
    np.testing.assert_allclose(outs["logits"], logits.detach().numpy(), rtol=1e-10, atol=1e-12)
    hT = (finals[0] if kind == "lstm" else finals)[1].detach().numpy()
    np.testing.assert_allclose(m.carries["layer2.rnn.h"], hT, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(grads["head.weight"], head_w.grad.numpy(), rtol=1e-9)
    for l in range(2):
        for role in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            want = getattr(ref, f"{role}_l{l}").grad.numpy()
            if kind == "lstm":
                i, f, gg, o = np.split(want, 4)
                want = np.concatenate([i, f, o, gg])
            np.testing.assert_allclose(grads[f"layer{l + 1}.rnn.cell.{role}"], want, rtol=1e-9, atol=1e-12,
                                       err_msg=(l, role))


@pytest.mark.parametrize("spec", [FUSED.replace("{cell}", "lstm"), FUSED.replace("{cell}", "gru"),
                                  STACK.replace("{cell}", "gru")], ids=["fused-lstm", "fused-gru", "written-gru"])
def test_hoisted_projection_equals_the_cell_run_step_by_step(tmp_path, monkeypatch, spec):
    """The same step with the projection and the weight gradients hoisted out of the loop
    and without: equal."""
    from netdsl.runtime import scan as rscan
    g = compile_text(tmp_path, spec)
    x, y = data(N=2, T=4)
    a = Model(g, dtype=np.float64, seed=12).train_step({"x": x, "y": y})
    monkeypatch.setattr(rscan, "_hoists", lambda node, sg: [])
    g2 = compile_text(tmp_path, spec, name="u.net")
    b = Model(g2, dtype=np.float64, seed=12).train_step({"x": x, "y": y})
    assert abs(a[0] - b[0]) < 1e-13
    for k in a[3]:
        np.testing.assert_allclose(a[3][k], b[3][k], rtol=1e-11, atol=1e-14, err_msg=k)
