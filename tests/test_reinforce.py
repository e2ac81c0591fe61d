"""Hard attention trained by REINFORCE (ops/policy.py): the surrogate's value and every
gradient against torch autograd given the same sampled locations, the moving-average
baseline, and the captioning spec's hard-attention variant training from the CLI."""
import numpy as np
import torch

from helpers import SPECS, cli, compile_text
from netdsl.runtime.model import Model

SPEC = """
step glance(x_t: seq, feats, H, A) {
  carry h = zeros([x_t.N, H])
  alpha = attention_scores(feats, h, A, name="att")
  where = sample_categorical(alpha)
  z = gather_location(feats, where)
  logp = sum(one_hot(where, alpha.shape[1]) * log(alpha), 1)
  h = tanh(linear(concat(x_t, z), H, name="W"))
  emit h, where, logp
}

network n(H = 4, A = 5, V = 6) {
  input x: f32[N, T, 3]
  input feats: f32[N, 7, 2]
  input y: i64[N, T]
  hs, wheres, logps = scan glance(x, feats, H, A, name="rnn")
  logits = hs -> linear(V, name="head")
  output logits, wheres
  loss ce = cross_entropy(logits, y)
  loss rl = reinforce(logps, ce) phase train
}
"""


def torch_step(P, x, feats, y, wheres, baseline):
    N, T, _ = x.shape
    h = torch.zeros(N, 4, dtype=torch.float64)
    hs, logps = [], []
    for t in range(T):
        e = torch.tanh(feats @ P["rnn.att.weight_feat"].T + (h @ P["rnn.att.weight_query"].T)[:, None]
                       + P["rnn.att.bias"]) @ P["rnn.att.weight_score"].T
        alpha = torch.softmax(e[..., 0], 1)
        s = wheres[:, t]
        z = feats[torch.arange(N), s]
        logps.append(torch.log(alpha[torch.arange(N), s]))
        h = torch.tanh(torch.cat([x[:, t], z], 1) @ P["rnn.W.weight"].T + P["rnn.W.bias"])
        hs.append(h)
    logits = torch.stack(hs, 1) @ P["head.weight"].T + P["head.bias"]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 6), y.reshape(-1))
    R = -ce.detach()
    surrogate = -(R - baseline) * torch.stack(logps, 1).mean()
    return ce, surrogate, R.item()


def test_reinforce_gradients_match_torch_given_the_same_samples(tmp_path):
    g = compile_text(tmp_path, SPEC)
    m = Model(g, dtype=np.float64, seed=2)
    r = np.random.default_rng(3)
    x, feats, y = r.standard_normal((3, 4, 3)), r.standard_normal((3, 7, 2)), r.integers(0, 6, (3, 4))
    (bname,) = [k for k, p in g.params.items() if p.role == "buffer"]
    baseline = 0.0
    for step in range(2):
        total, losses, outs, grads = m.train_step({"x": x, "feats": feats, "y": y})
        P = {k: torch.tensor(v, requires_grad=True) for k, v in m.host_params().items() if k != bname}
        ce, sur, R = torch_step(P, torch.tensor(x), torch.tensor(feats), torch.tensor(y),
                                torch.tensor(outs["wheres"]), baseline)
        (ce + sur).backward()
        assert abs(losses["ce"] - ce.item()) < 1e-12 and abs(losses["rl"] - sur.item()) < 1e-12
        for k, p in P.items():
            np.testing.assert_allclose(grads[k], p.grad.numpy(), rtol=1e-9, atol=1e-12, err_msg=(step, k))
        assert np.abs(grads["rnn.att.weight_score"]).sum() > 0     # the attention learns through the samples
        baseline = 0.9 * baseline + 0.1 * R
        assert abs(m.params[bname][0] - baseline) < 1e-12
        for k in P:     # a plain SGD step, so the second step differs
            m.params[k] -= 0.1 * grads[k]
    # inference neither uses nor moves the baseline
    m.infer({"x": x, "feats": feats, "y": y})
    assert abs(m.params[bname][0] - baseline) < 1e-12


def test_hard_attention_captioning_trains_from_the_cli(tmp_path):
    r = cli("run", SPECS / "rnn/captioning_attention.net", "--set", "attention=hard", "--set", "vocab=20",
            "--set", "embed=8", "--set", "H=16", "--set", "A=8", "--set", "T=4", "--data", "synthetic:4",
            "--epochs", "1", "--batch", "2", "--out", tmp_path, "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "train_loss" in (tmp_path / "metrics.jsonl").read_text()
