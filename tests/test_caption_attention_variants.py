"""The options of captioning_attention.net's `attend` step against a decoder written in
torch here, weights copied, float64: where the attention's query comes from (Xu et al.'s
h_{t-1}, or h_t after the word with the context fed back at the next step, Luong et al.'s
input feeding), Xu et al.'s gating scalar beta, the context kept out of the LSTM, the deep
output over [h; z], and Xu et al.'s doubly stochastic penalty (eq. 14) as a weighted loss.
Loss, logits, attention weights and every parameter's gradient."""
import numpy as np
import pytest
import torch

from helpers import compile_spec
from netdsl.runtime.model import Model

N, T, V, E, H, A, D, L = 2, 5, 11, 5, 6, 4, 512, 49
PAD = 0


def torch_decoder(p, feats, caps, query, gate, context_in, deep_output, coverage):
    """Loss (ce + coverage * eq. 14), logits and weights of the decoder, written out."""
    a = feats.reshape(N, D, L).transpose(1, 2)                   # locations [N, L, D]
    lin = lambda x, k: x @ p[f"decoder.{k}.weight"].T + p[f"decoder.{k}.bias"]
    h = torch.tanh(lin(a.mean(1), "init_h"))
    c = torch.tanh(lin(a.mean(1), "init_c"))
    z = torch.zeros(N, D, dtype=torch.float64)

    def cell(x, h, c):          # the notes' gate order i, f, o, g
        i, f, o, g = (x @ p["decoder.cell.weight_ih"].T + p["decoder.cell.bias_ih"]
                      + h @ p["decoder.cell.weight_hh"].T + p["decoder.cell.bias_hh"]).chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c

    def attend(h):
        u = torch.tanh(a @ p["decoder.att.weight_feat"].T + (h @ p["decoder.att.weight_query"].T
                                                             + p["decoder.att.bias"])[:, None])
        alpha = torch.softmax((u @ p["decoder.att.weight_score"].T)[..., 0], 1)
        z = (alpha[..., None] * a).sum(1)
        return alpha, (torch.sigmoid(lin(h, "f_beta")) * z if gate else z)

    logits, alphas = [], []
    for t in range(T - 1):
        x = p["decoder.embed.weight"][caps[:, t]]
        if query == "current":
            h, c = cell(torch.cat([x, z], 1) if context_in else x, h, c)
        alpha, z = attend(h)
        if query == "previous":
            h, c = cell(torch.cat([x, z], 1) if context_in else x, h, c)
        logits.append(lin(torch.cat([h, z], 1) if deep_output else h, "head"))
        alphas.append(alpha)
    logits, alphas = torch.stack(logits, 1), torch.stack(alphas, 1)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), caps[:, 1:].reshape(-1), ignore_index=PAD)
    words = (caps[:, 1:] != PAD).to(torch.float64)[..., None]
    loss = loss + coverage * ((1 - (alphas * words).sum(1)) ** 2).sum(1).mean()
    return loss, logits, alphas


@pytest.mark.parametrize("opts", [
    dict(query="current", gate=True, context_in=True, deep_output=True, coverage=0.5),
    dict(query="previous", gate=True, context_in=False, deep_output=True, coverage=0.0),
    dict(query="current", gate=False, context_in=False, deep_output=False, coverage=2.0),
], ids=["input_feeding_gate_coverage", "previous_context_out", "current_context_out"])
def test_attend_options_match_torch(opts):
    g = compile_spec("rnn/captioning_attention.net", vocab=V, embed=E, H=H, A=A, **opts)
    rng = np.random.default_rng(3)
    params = {n: rng.uniform(-0.3, 0.3, tuple(v.shape)) for n, v in g.params.items()}
    feats = rng.standard_normal((N, D, 7, 7))
    caps = np.array([[1, 4, 5, 7, 2], [1, 4, 6, 2, PAD]], np.int64)
    m = Model(g, params=params, dtype=np.float64)
    loss, _, outs, grads = m.train_step({"feats": feats, "captions": caps})

    tp = {n: torch.tensor(v, requires_grad=True) for n, v in params.items()}
    want, logits, alphas = torch_decoder(tp, torch.tensor(feats), torch.tensor(caps), **opts)
    want.backward()
    assert abs(loss - want.item()) <= 1e-10 * abs(want.item())
    np.testing.assert_allclose(outs["logits"], logits.detach().numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(outs["alphas"], alphas.detach().numpy(), rtol=1e-9, atol=1e-12)
    assert set(grads) == set(params)
    for n, t in tp.items():
        np.testing.assert_allclose(grads[n], t.grad.numpy(), rtol=1e-8, atol=1e-11, err_msg=n)
