"""The recurrent specs of the catalogue (specs/rnn/*.net): they compile, their parameter
counts match torch.nn modules of the same sizes (or, for the notes' written-out cells,
the notes' formulas), their outputs have each sequence kind's shape, their state is
exposed for truncated BPTT, and mistakes inside a step are reported at the step's line."""
import json

import pytest
import torch
from torch import nn

from helpers import SPECS, cli, compile_spec, compile_text
from netdsl.cli import main
from netdsl.errors import NetdslError
from netdsl.ir.dims import fmt_shape
from netdsl.ops import OPS

RNN_SPECS = sorted(p.name for p in (SPECS / "rnn").glob("*.net"))


def count(*modules) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


# ---------------------------------------------------------------- every spec compiles

def test_the_catalogue_is_covered():
    want = {"vanilla_rnn", "charlm_rnn", "charlm_lstm", "charlm_gru", "one_to_many", "many_to_one",
            "many_to_many", "seq2seq", "glimpses", "captioning", "captioning_greedy", "captioning_attention"}
    assert want <= {n[:-4] for n in RNN_SPECS}


def run_cli(capsys, *args):
    """The CLI's main() in this process (a subprocess per spec would cost seconds each)."""
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("spec", RNN_SPECS)
def test_compiles_via_cli_symbolic_and_with_dims_set(spec, capsys):
    rc, out, err = run_cli(capsys, "compile", SPECS / "rnn" / spec)
    assert rc == 0, err
    sets = ["--set", "N=4"] + (["--set", "T=20"] if "T" in compile_spec(f"rnn/{spec}").symbols else [])
    rc, out, err = run_cli(capsys, "compile", SPECS / "rnn" / spec, *sets, "--json")
    assert rc == 0, err
    rep = json.loads(out)
    for o in rep["outputs"].values():
        assert "N" not in o["shape"] and "T" not in o["shape"], o


@pytest.mark.parametrize("spec", RNN_SPECS)
def test_renders(spec, capsys, tmp_path):
    out = tmp_path / (spec[:-4] + ".dot")
    rc, _, err = run_cli(capsys, "render", SPECS / "rnn" / spec, "-o", out)
    assert rc == 0, err
    assert "digraph" in out.read_text()


# ---------------------------------------------------------------- parameter counts vs torch

SMALL = dict(vocab=50, embed=16, hidden=32, layers=3)
TORCH_RNN = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


@pytest.mark.parametrize("kind", ["rnn", "lstm", "gru"])
def test_charlm_fused_matches_torch(kind):
    """fused=true uses the torch-layout cells: Embedding + nn.RNN/LSTM/GRU(num_layers) + Linear."""
    g = compile_spec(f"rnn/charlm_{kind}.net", fused=True, **SMALL)
    V, E, H, L = SMALL["vocab"], SMALL["embed"], SMALL["hidden"], SMALL["layers"]
    rnn = TORCH_RNN[kind](E, H, num_layers=L, batch_first=True)
    assert g.param_count() == count(nn.Embedding(V, E), rnn, nn.Linear(H, V))
    # and tensor by tensor: layer l's cell holds torch's weight_ih_l{l-1}, ...
    for l in range(L):
        for role in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            ours = g.params[f"layer{l + 1}.rnn.cell.{role}"].shape
            assert ours == tuple(getattr(rnn, f"{role}_l{l}").shape)


# The notes' written-out cells, per layer with input size D and hidden size H:
#   vanilla RNN  h = tanh(W_hh h + W_xh x), no bias:                  H(H + D)
#   LSTM         one W [4H, H + D] over [h; x] plus one bias [4H]:     4H(H + D) + 4H
#   GRU (lib)    W_rz [2H, H + D] + bias, W_xn [H, D] + bias, W_hn [H, H] + bias:  3H(H + D) + 4H
NOTES_LAYER = {
    "rnn": lambda D, H: H * (H + D),
    "lstm": lambda D, H: 4 * H * (H + D) + 4 * H,
    "gru": lambda D, H: 3 * H * (H + D) + 4 * H,
}


@pytest.mark.parametrize("kind", ["rnn", "lstm", "gru"])
def test_charlm_written_out_matches_the_notes_formula(kind):
    g = compile_spec(f"rnn/charlm_{kind}.net", **SMALL)
    V, E, H, L = SMALL["vocab"], SMALL["embed"], SMALL["hidden"], SMALL["layers"]
    layers = NOTES_LAYER[kind](E, H) + (L - 1) * NOTES_LAYER[kind](H, H)
    assert g.param_count() == count(nn.Embedding(V, E), nn.Linear(H, V)) + layers


def test_written_out_lstm_is_torch_lstm_less_one_bias():
    """Like with like: torch's LSTM has bias_ih and bias_hh; the notes' single W has one bias."""
    g = compile_spec("rnn/charlm_lstm.net", **SMALL)
    V, E, H, L = SMALL["vocab"], SMALL["embed"], SMALL["hidden"], SMALL["layers"]
    torch_lstm = nn.LSTM(E, H, num_layers=L)
    assert g.param_count() == count(nn.Embedding(V, E), torch_lstm, nn.Linear(H, V)) - L * 4 * H
    assert g.params["layer2.rnn.W.weight"].shape == (4 * H, H + H)


def test_vanilla_rnn_is_the_notes_equation():
    g = compile_spec("rnn/vanilla_rnn.net", D=10, H=20, out=5)
    # W_hh, W_xh without bias (torch.nn.RNN(bias=False)), and W_hy
    assert g.param_count() == count(nn.RNN(10, 20, bias=False), nn.Linear(20, 5, bias=False))
    assert {n: p.shape for n, p in g.params.items()} == {
        "rnn1.W_hh.weight": (20, 20), "rnn1.W_xh.weight": (20, 10), "W_hy.weight": (5, 20)}
    # one scan node: the weights live in its step body, once, shared by every step
    scans = [n for n in g.nodes if n.op == "scan"]
    assert len(scans) == 1 and {n.path for n in scans[0].body.nodes if n.params} == {"rnn1.W_hh", "rnn1.W_xh"}


def test_sequence_kinds_param_counts():
    g = compile_spec("rnn/many_to_one.net", vocab=100, embed=8, H=16, layers=2, classes=3)
    assert g.param_count() == (count(nn.Embedding(100, 8), nn.Linear(16, 3))
                               + NOTES_LAYER["lstm"](8, 16) + NOTES_LAYER["lstm"](16, 16))
    g = compile_spec("rnn/many_to_many.net", vocab=100, embed=8, H=16, layers=1, tags=5)
    assert g.param_count() == count(nn.Embedding(100, 8), nn.Linear(16, 5)) + NOTES_LAYER["gru"](8, 16)
    g = compile_spec("rnn/seq2seq.net", src_vocab=30, tgt_vocab=40, embed=8, H=16)
    assert g.param_count() == (count(nn.Embedding(30, 8), nn.Embedding(40, 8), nn.Linear(16, 40))
                               + 2 * NOTES_LAYER["lstm"](8, 16))
    g = compile_spec("rnn/one_to_many.net", features=12, vocab=30, embed=8, H=16)
    assert g.param_count() == count(nn.Linear(12, 16), nn.Embedding(30, 8), nn.RNNCell(8, 16), nn.Linear(16, 30))


def vgg_trunk(widths, cin=3):
    layers = []
    for c in widths:
        layers += [nn.Conv2d(cin, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)]
        cin = c
    return nn.Sequential(*layers)


def additive_attention(D, Q, A):
    """Xu et al.'s f_att: W_feat f (no bias), W_query q + b, then w_score . tanh(...) (no bias)."""
    return nn.ModuleList([nn.Linear(D, A, bias=False), nn.Linear(Q, A), nn.Linear(A, 1, bias=False)])


def test_captioning_param_count_and_greedy_shares_every_parameter():
    sizes = dict(vocab=100, embed=8, H=16)
    g = compile_spec("rnn/captioning.net", **sizes)
    expect = count(vgg_trunk([64, 128, 256, 512, 512]), nn.Linear(512, 16), nn.Embedding(100, 8),
                   nn.LSTMCell(8, 16), nn.Linear(16, 100))
    assert g.param_count() == expect
    greedy = compile_spec("rnn/captioning_greedy.net", **sizes)
    assert {n: p.shape for n, p in greedy.params.items()} == {n: p.shape for n, p in g.params.items()}


def test_captioning_attention_param_count():
    g = compile_spec("rnn/captioning_attention.net", vocab=100, embed=8, H=16, A=12)
    expect = count(nn.Linear(512, 16), nn.Linear(512, 16), additive_attention(512, 16, 12),
                   nn.Embedding(100, 8), nn.LSTMCell(8 + 512, 16), nn.Linear(16, 100))
    assert g.param_count() == expect
    hard = compile_spec("rnn/captioning_attention.net", vocab=100, embed=8, H=16, A=12, attention="hard")
    assert hard.param_count() == expect       # hard attention reads a location: no weights of its own


def test_glimpses_param_count():
    g = compile_spec("rnn/glimpses.net", classes=7, H=16, A=12)
    assert g.param_count() == count(vgg_trunk([32, 64, 128]), additive_attention(128, 16, 12),
                                    nn.GRUCell(128, 16), nn.Linear(16, 7))


# ---------------------------------------------------------------- shapes of each sequence kind

def shapes(g):
    return {k: fmt_shape(v.shape) for k, v in g.outputs.items()}


@pytest.mark.parametrize("spec, sets, expect", [
    ("vanilla_rnn.net", dict(T=7), {"y": "[N, 7, 10]"}),
    ("one_to_many.net", dict(T=9), {"logits": "[N, 9, 1000]"}),
    ("many_to_one.net", dict(T=30), {"logits": "[N, 2]"}),
    ("many_to_many.net", dict(T=30), {"logits": "[N, 30, 17]"}),
    ("seq2seq.net", dict(S=11, T=8), {"logits": "[N, 7, 8000]"}),       # teacher forcing: T - 1 steps
    ("seq2seq.net", {}, {"logits": "[N, T - 1, 8000]"}),
    ("glimpses.net", dict(steps=4), {"logits": "[N, 10]", "where": "[N, 4, 64]"}),
    ("captioning.net", dict(T=17), {"logits": "[N, 16, 10000]"}),
    ("captioning_greedy.net", dict(max_len=12), {"words": "[N, 12]"}),
    ("captioning_attention.net", dict(T=17), {"logits": "[N, 16, 10000]", "alphas": "[N, 16, 49]"}),
    ("charlm_gru.net", dict(T=100, vocab=65), {"logits": "[N, 100, 65]", "sampled": "[N]"}),
])
def test_output_shapes(spec, sets, expect):
    assert shapes(compile_spec(f"rnn/{spec}", **sets)) == expect


def test_greedy_decoding_outputs_word_ids():
    assert compile_spec("rnn/captioning_greedy.net").outputs["words"].dtype == "i64"


# ---------------------------------------------------------------- recurrent state and BPTT

def test_carried_state_is_exposed_per_layer():
    g = compile_spec("rnn/charlm_lstm.net", layers=3)
    assert [c.name for c in g.carries] == [f"layer{l}.rnn.{s}" for l in (1, 2, 3) for s in "hc"]
    for c in g.carries:
        assert c.init.shape == c.step_in.shape == c.step_out.shape == c.final.shape
        assert fmt_shape(c.final.shape) == "[N, 256]"


def test_seq2seq_decoder_starts_from_encoder_final_state():
    g = compile_spec("rnn/seq2seq.net")
    c = {c.name: c for c in g.carries}
    assert set(c) == {"encoder.h", "encoder.c", "decoder.h", "decoder.c"}
    assert c["decoder.h"].init is c["encoder.h"].final
    assert c["decoder.c"].init is c["encoder.c"].final


def test_bptt_truncated_by_default_full_by_flag():
    g = compile_spec("rnn/charlm_rnn.net", chunk=25)
    assert g.train["bptt"].name == "truncated" and g.train["bptt"].kwargs == {"chunk": 25}
    assert g.train["clip"] == 5.0 and g.train["optimizer"].name == "adam"
    assert g.train["data"].name == "text"
    assert compile_spec("rnn/charlm_rnn.net", full_bptt=True).train["bptt"].name == "full"


# ---------------------------------------------------------------- differentiability

def test_sampling_and_argmax_are_not_differentiable():
    assert OPS["sample_categorical"].differentiable is False
    assert OPS["argmax"].differentiable is False
    for op in ("rnn_cell", "lstm_cell", "gru_cell", "attention_scores", "weighted_sum", "gather_location"):
        assert OPS[op].differentiable is True


def test_hard_attention_samples_soft_attention_averages(capsys):
    def ops(attention):
        g = compile_spec("rnn/captioning_attention.net", attention=attention)
        scan = next(n for n in g.nodes if n.op == "scan")
        return {n.op for n in scan.body.nodes}
    soft, hard = ops("soft"), ops("hard")
    assert "weighted_sum" in soft and "sample_categorical" not in soft
    assert {"sample_categorical", "gather_location"} <= hard and "weighted_sum" not in hard
    rc, out, _ = run_cli(capsys, "compile", SPECS / "rnn" / "captioning_attention.net", "--set", "attention=hard", "--json")
    rows = {row["op"]: row for row in json.loads(out)["nodes"]}
    assert rows["sample_categorical"]["differentiable"] is False
    assert rows["gather_location"]["differentiable"] is True


def test_charlm_samples_the_next_character_with_temperature():
    g = compile_spec("rnn/charlm_rnn.net", T=1, temperature=0.5)
    sampled = g.outputs["sampled"]
    assert sampled.dtype == "i64" and sampled.producer.op == "sample_categorical"
    scale = next(n for n in g.nodes if n.op == "scale")       # logits / temperature
    assert scale.attrs["factor"] == 2.0
    with pytest.raises(NetdslError, match="temperature must be positive"):
        compile_spec("rnn/charlm_rnn.net", temperature=0)


def test_attention_must_be_soft_or_hard():
    with pytest.raises(NetdslError, match="soft or hard"):
        compile_spec("rnn/captioning_attention.net", attention="cold")


# ---------------------------------------------------------------- errors inside a step

STEP = """\
step grow(x_t: seq, H) {
  carry h = zeros([x_t.N, H])
  h = linear(concat(h, x_t), {out})
  emit h
}
network t(H = 8) {
  input x: f32[N, T, 4]
  hs = scan grow(x, H)
  output hs
}
"""


def test_carry_that_changes_shape_points_at_the_carry(tmp_path):
    with pytest.raises(NetdslError) as e:
        compile_text(tmp_path, STEP.replace("{out}", "2 * H"))
    assert "carry 'h' must keep its shape" in e.value.message
    assert "[N, 8]" in e.value.message and "[N, 16]" in e.value.message
    assert (e.value.pos.file.endswith("t.net"), e.value.pos.line) == (True, 2)
    assert [n.pos.line for n in e.value.notes] == [3]     # and at the line that changed it
    compile_text(tmp_path, STEP.replace("{out}", "H"))          # the same step with the right size compiles


def test_cell_state_mismatch_points_at_the_cell_line_via_cli(tmp_path):
    p = tmp_path / "bad.net"
    p.write_text("""\
step cell(x_t: seq, H) {
  carry h = zeros([x_t.N, H]), c = zeros([x_t.N, 2 * H])
  h, c = lstm_cell(x_t, h, c, H)
  emit h
}
network t() {
  input x: f32[N, T, 4]
  hs = scan cell(x, 8)
  output hs
}
""")
    r = cli("compile", p)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "bad.net:3:" in r.stderr
    assert "state 'c' must have shape [N, 8]" in r.stderr


@pytest.mark.parametrize("line, message", [
    ("a = weighted_sum(f, zeros([f.N, 5]))", "'weights' must be [N, 49]"),
    ("a = gather_location(f, zeros([f.N]))", "'index' must be i64[N]"),
    ("a = attention_scores(f, zeros([f.N, 7, 7]))", "must have rank 2"),
    ("a = lstm_cell(zeros([f.N, 3]), zeros([f.N, 4]), zeros([f.N, 4]), 4, order=\"gifo\")", "one of ifog, ifgo"),
])
def test_attention_op_errors(tmp_path, line, message):
    text = f"network t() {{\n  input f: f32[N, 49, 16]\n  {line}\n  output a\n}}\n"
    with pytest.raises(NetdslError) as e:
        compile_text(tmp_path, text)
    assert message in e.value.message and e.value.pos.line == 3


def test_attention_hidden_defaults_to_feature_size(tmp_path):
    g = compile_text(tmp_path, "network t() {\n  input f: f32[N, 49, 16]\n  input q: f32[N, 8]\n"
                               "  a = attention_scores(f, q)\n  output a\n}\n")
    assert fmt_shape(g.outputs["a"].shape) == "[N, 49]"
    assert g.params["attention_scores1.weight_feat"].shape == (16, 16)
    assert g.param_count() == count(additive_attention(16, 8, 16))


def test_fused_cells_initialise_like_torch():
    """torch draws every recurrent weight and bias from U(-1/sqrt(H), 1/sqrt(H))."""
    from netdsl.runtime.init import init_params
    H = SMALL["hidden"]
    g = compile_spec("rnn/charlm_lstm.net", fused=True, **SMALL)
    ours = init_params(g, 0)
    theirs = dict(nn.LSTM(SMALL["embed"], H, num_layers=SMALL["layers"]).named_parameters())
    for role in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        a, b = abs(ours[f"layer1.rnn.cell.{role}"]).max(), theirs[f"{role}_l0"].abs().max().item()
        assert 0.9 / H ** 0.5 < a <= 1 / H ** 0.5 and 0.9 / H ** 0.5 < b <= 1 / H ** 0.5
