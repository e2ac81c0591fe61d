"""Recurrent cells, attention over locations, and the discrete choices of decoding.

The fused cells take one time step ([N, D] input, [N, H] state) and can be used inside
a `step` or on their own. Their parameters follow torch.nn.RNN/LSTM/GRU (weight_ih,
weight_hh, bias_ih, bias_hh) so counts and checkpoints map onto torch; the notes' one
matrix W over the stacked [h; x] is exactly [weight_hh | weight_ih] stored in two pieces.
Multiply-adds count the matrix products only, like `linear`.

Attention follows Xu et al. 2015, "Show, Attend and Tell" (the notes' captioning with
attention): scores over L locations from an additive MLP, soft attention is the
weighted average of the locations, hard attention samples one location.
"""
from __future__ import annotations

import math

from ..ir.dims import fmt_shape
from .registry import Attr, Ctx, defop, is_float, need_rank, nonneg, positive

# Kernels: kernels/{cpu,cuda}/recurrent.py, bound once in runtime/bindings.py. The cells,
# attention scores and the reads have dedicated gradient kernels (`<op>_grad`).
RNN = dict(kind="recurrent", vjp="kernel")

HIDDEN = Attr("hidden", "int", check=positive, doc="size of the hidden state H")
BIAS = Attr("bias", "bool", True)


def rnn_init(H: int) -> str:
    """torch's recurrent initialiser: every weight and bias ~ U(-1/sqrt(H), 1/sqrt(H))."""
    return f"uniform({1 / math.sqrt(H)!r})"


def _float(ctx: Ctx, *idx: int):
    for i in idx:
        if not is_float(ctx.inputs[i].dtype):
            ctx.fail(f"input '{ctx.op.inputs[i]}' needs a floating-point tensor, got {ctx.inputs[i].dtype}", i)


def _cell_inputs(ctx: Ctx, n_state: int):
    """x [N, D] and n_state states [N, hidden], all on the same batch."""
    x = ctx.x()
    need_rank(ctx, 0, 2)
    _float(ctx, *range(1 + n_state))
    N, D = x.shape
    if not isinstance(D, int):
        ctx.fail(f"the input feature axis must be a number, got {D}", 0,
                 hint="fix the dimension with --set")
    for i in range(1, 1 + n_state):
        s = ctx.inputs[i]
        want = (N, ctx.hidden)
        if tuple(s.shape) != want:
            ctx.fail(f"state '{ctx.op.inputs[i]}' must have shape {fmt_shape(want)} "
                     f"(batch of x, hidden={ctx.hidden}), got {fmt_shape(s.shape)}", 0, i)
    return [((N, ctx.hidden), x.dtype)] * n_state


def _cell_params(gates: int):
    """torch layout: weight_ih [G*H, D], weight_hh [G*H, H], bias_ih and bias_hh [G*H]."""
    def params(ctx: Ctx):
        H, D = ctx.hidden, ctx.x().shape[1]
        init = rnn_init(H)
        ps = {"weight_ih": ((gates * H, D), init, "weight"),
              "weight_hh": ((gates * H, H), init, "weight")}
        if ctx.bias:
            ps["bias_ih"] = ((gates * H,), init, "bias")
            ps["bias_hh"] = ((gates * H,), init, "bias")
        return ps
    return params


def _cell_macs(gates: int):
    def macs(ctx: Ctx):
        N, D = ctx.x().shape
        return N * gates * ctx.hidden * (D + ctx.hidden)
    return macs


@defop("rnn_cell", ["x", "h"], (HIDDEN, BIAS), params=_cell_params(1), inits=("uniform",), macs=_cell_macs(1), **RNN)
def rnn_cell(ctx: Ctx):
    """Vanilla (Elman) cell: h' = tanh(W_hh h + W_xh x + b), with W_xh = weight_ih."""
    return _cell_inputs(ctx, 1)


@defop("lstm_cell", ["x", "h", "c"],
       (HIDDEN, BIAS, Attr("order", "str", "ifog", choices=("ifog", "ifgo"),
                           doc="gate order of the stacked weight rows")),
       params=_cell_params(4), inits=("uniform",), macs=_cell_macs(4), outputs=("h", "c"), **RNN)
def lstm_cell(ctx: Ctx):
    """LSTM cell -> (h', c'). The 4H rows of [weight_hh | weight_ih] applied to [h; x] are the
    gates in the notes' order i, f, o, g by default (order="ifog"); order="ifgo" is torch's
    layout, for loading torch weights. i, f, o = sigmoid, g = tanh;
    c' = f*c + i*g; h' = o*tanh(c')."""
    return _cell_inputs(ctx, 2)


@defop("gru_cell", ["x", "h"], (HIDDEN, BIAS), params=_cell_params(3), inits=("uniform",), macs=_cell_macs(3), **RNN)
def gru_cell(ctx: Ctx):
    """GRU cell (Cho et al. 2014, torch's form), gate rows r, z, n:
    r = sigmoid(W_ir x + b_ir + W_hr h + b_hr); z likewise;
    n = tanh(W_in x + b_in + r*(W_hn h + b_hn)); h' = (1 - z)*n + z*h."""
    return _cell_inputs(ctx, 1)


# ---- attention over L locations of a feature grid [N, L, D]

def _feats(ctx: Ctx, i: int = 0):
    f = ctx.inputs[i]
    if f.rank != 3:
        ctx.fail(f"'{ctx.op.inputs[i]}' must be locations [N, L, D], got rank {f.rank}", i,
                 hint="a feature map [N, C, H, W] becomes [N, H*W, C] by reshape and transpose")
    _float(ctx, i)
    return f.shape


def _score_dims(ctx: Ctx):
    """(N, L, D, Q, A): batch, locations, feature size, query size, attention MLP size."""
    N, L, D = ctx.inputs[0].shape
    Q = ctx.inputs[1].shape[1]
    return N, L, D, Q, ctx.hidden or D


def _score_params(ctx: Ctx):
    _, _, D, Q, A = _score_dims(ctx)
    return {"weight_feat": ((A, D), "kaiming_uniform", "weight"),
            "weight_query": ((A, Q), "kaiming_uniform", "weight"),
            "bias": ((A,), "zeros", "bias"),
            "weight_score": ((1, A), "kaiming_uniform", "weight")}


def _score_macs(ctx: Ctx):
    N, L, D, Q, A = _score_dims(ctx)
    return N * A * (L * D + Q + L)      # W_feat f_l for every l, W_query q once, w_score per l


@defop("attention_scores", ["feats", "query"],
       (Attr("hidden", "int", 0, check=nonneg, doc="size of the attention MLP; 0 means the feature size D"),),
       params=_score_params, inits=("kaiming_uniform", "zeros"), macs=_score_macs, **RNN)
def attention_scores(ctx: Ctx):
    """Additive attention (Bahdanau; Xu et al.'s f_att): e_l = w_score . tanh(W_feat f_l + W_query q + b),
    weights = softmax over the L locations. feats [N, L, D], query [N, Q] -> weights [N, L]."""
    N, L, D = _feats(ctx)
    q = ctx.inputs[1]
    need_rank(ctx, 1, 2)
    _float(ctx, 1)
    if q.shape[0] != N:
        ctx.fail(f"feats and query disagree on the batch ({N} vs {q.shape[0]})", 0, 1)
    for what, d in (("feature size D", D), ("query size", q.shape[1])):
        if not isinstance(d, int):
            ctx.fail(f"the {what} must be a number, got {d}", 0, 1)
    return [((N, L), ctx.inputs[0].dtype)]


def _weights(ctx: Ctx, i: int, N, L=None):
    w = ctx.inputs[i]
    if w.rank != 2 or w.shape[0] != N or (L is not None and w.shape[1] != L):
        want = fmt_shape((N, L if L is not None else "L"))
        ctx.fail(f"'{ctx.op.inputs[i]}' must be {want}, one weight per location, got {fmt_shape(w.shape)}",
                 *((0, i) if L is not None else (i,)))
    _float(ctx, i)
    return w.shape


@defop("weighted_sum", ["feats", "weights"], macs=lambda ctx: _prod3(ctx.inputs[0].shape), **RNN)
def weighted_sum(ctx: Ctx):
    """Soft attention: sum_l weights[n, l] * feats[n, l, :]. feats [N, L, D], weights [N, L] -> [N, D]."""
    N, L, D = _feats(ctx)
    _weights(ctx, 1, N, L)
    return [((N, D), ctx.inputs[0].dtype)]


def _prod3(shape):
    N, L, D = shape
    return N * L * D


@defop("sample_categorical", ["weights"], kind="recurrent", differentiable=False)
def sample_categorical(ctx: Ctx):
    """Draw one index per row from the categorical distribution weights [N, L] (rows sum to 1,
    e.g. a softmax): hard attention's location, or the next token when sampling text.
    No gradient flows through a sample (Xu et al. train hard attention with REINFORCE).
    Seeded like dropout (run seed, step and node): a run repeats exactly, and the CPU and
    CUDA draw the same indices for a seed. Entries that are not positive are never drawn."""
    N, _ = _weights(ctx, 0, ctx.x().shape[0])
    return [((N,), "i64")]


@defop("gather_location", ["feats", "index"], grad_wrt=(0,), **RNN)
def gather_location(ctx: Ctx):
    """Hard attention's read: feats[n, index[n], :]. feats [N, L, D], index i64[N] -> [N, D].
    Differentiable in feats (the gradient goes to the chosen location), not in the index."""
    N, L, D = _feats(ctx)
    ix = ctx.inputs[1]
    if ix.dtype != "i64" or tuple(ix.shape) != (N,):
        ctx.fail(f"'index' must be i64[{N}], one location per example, got {ix!r}", 0, 1,
                 hint="sample_categorical(weights) or argmax(weights) gives such an index")
    return [((N, D), ctx.inputs[0].dtype)]


@defop("argmax", ["x"], (Attr("axis", "int", -1),), kind="structural", differentiable=False)
def argmax(ctx: Ctx):
    """Index of the largest entry along an axis (removed): greedy decoding's next token.
    The first of equal largest entries; a NaN counts as the largest (as in numpy and torch)."""
    x = ctx.x()
    a = ctx.axis + x.rank if ctx.axis < 0 else ctx.axis
    if not 0 <= a < x.rank:
        ctx.fail(f"axis {ctx.axis} is out of range for a tensor of rank {x.rank}", 0)
    return [((*x.shape[:a], *x.shape[a + 1:]), "i64")]
