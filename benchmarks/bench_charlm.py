"""The char-LSTM of specs/rnn/charlm_lstm.net trained for a wall-clock budget, netdsl
beside PyTorch 2.13 on the same data, batches, optimiser and threads.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_charlm.py [SECONDS]

Both read the default corpus (the running Python's pydoc_data/topics.py text, the last
10% held out) as 64 parallel streams in chunks of 100 characters with the state carried
from chunk to chunk (truncated BPTT), Adam lr 2e-3, gradient norm clipped at 5, for
SECONDS (default 900: the issue's 15 minutes) each, one after the other in separate
processes. netdsl runs the spec's own defaults (the notes' written-out LSTM, 2 layers
of 256, embedding 64; BENCH_FUSED=1 for the torch-layout cells); torch runs
nn.Embedding + nn.LSTM(num_layers=2) + nn.Linear (one more bias per layer than the
notes' single W). Printed per framework: the validation loss in nats per character
after each pass over the training text and at the end of the budget, tokens/s and
characters seen. Reference points on this text: ln V (about 4.6) at the start, the
bigram model 2.32, min-char-rnn's vanilla RNN 1.85.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THREADS = int(os.environ.get("BENCH_THREADS", os.cpu_count() or 2))
N, T = 64, 100


def streams():
    sys.path.insert(0, ROOT)
    from netdsl.runtime.loader import StreamLoader
    from netdsl.runtime.text import load_text
    ds = load_text(seq=T)
    return ds, StreamLoader.of(ds, "train", N), StreamLoader.of(ds, "test", N)


def run_netdsl(budget: float) -> dict:
    from netdsl.kernels import native
    native.set_num_threads(THREADS)
    import numpy as np
    from netdsl.lang.elaborate import elaborate
    from netdsl.runtime import clip_grad_norm, make_optimizer
    from netdsl.runtime.model import Model
    ds, train, test = streams()
    g, _ = elaborate(os.path.join(ROOT, "specs", "rnn", "charlm_lstm.net"), None,
                     {"vocab": len(ds.vocab), "fused": os.environ.get("BENCH_FUSED") == "1"})
    m = Model(g)
    opt = make_optimizer("adam", m.trainable(), lr=2e-3)

    def validate():
        tot, carry = 0.0, None
        for b in test:
            tot += float(m.infer({"chars": b["chars"], "next": b["next"]}, want=["ce"], carry=carry)["ce"])
            carry = m.carries
        return tot / len(test)

    def step(b, carry):
        _, losses, _, grads = m.train_step({"chars": b["chars"], "next": b["next"]}, carry=carry)
        clip_grad_norm(grads, 5.0)
        opt.step(grads)
        return m.carries
    return loop(step, validate, train, budget)


def run_torch(budget: float) -> dict:
    import torch
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    ds, train, test = streams()
    V = len(ds.vocab)
    emb, rnn, head = torch.nn.Embedding(V, 64), torch.nn.LSTM(64, 256, num_layers=2, batch_first=True), \
        torch.nn.Linear(256, V)
    params = [*emb.parameters(), *rnn.parameters(), *head.parameters()]
    opt = torch.optim.Adam(params, lr=2e-3)
    ce = torch.nn.functional.cross_entropy

    def forward(b, state):
        hs, state = rnn(emb(torch.from_numpy(b["chars"])), state)
        return ce(head(hs).reshape(-1, V), torch.from_numpy(b["next"]).reshape(-1)), state

    def validate():
        tot, state = 0.0, None
        with torch.no_grad():
            for b in test:
                loss, state = forward(b, state)
                tot += loss.item()
        return tot / len(test)

    def step(b, state):
        opt.zero_grad(set_to_none=True)
        loss, state = forward(b, state)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        opt.step()
        return tuple(s.detach() for s in state)
    return loop(step, validate, train, budget)


def loop(step, validate, train, budget: float) -> dict:
    start = time.perf_counter()
    seen, curve, carry, passes = 0, [], None, 0
    while time.perf_counter() - start < budget:
        carry = None        # each pass over the text starts from the initial state
        for b in train:
            carry = step(b, carry)
            seen += b["chars"].size
            if time.perf_counter() - start >= budget:
                break
        else:
            passes += 1
            curve.append(round(validate(), 4))
    took = time.perf_counter() - start
    return {"val_loss": round(validate(), 4), "per_pass": curve, "tokens": seen, "tok_s": round(seen / took),
            "seconds": round(took)}


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        which, budget = sys.argv[2], float(sys.argv[3])
        print(json.dumps((run_torch if which == "torch" else run_netdsl)(budget)))
        sys.exit(0)
    budget = float(sys.argv[1]) if len(sys.argv) > 1 else 900.0
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS=str(THREADS))
    print(f"# {time.strftime('%Y-%m-%d')}  threads={THREADS}  budget {budget:.0f} s each  batch {N} x seq {T}"
          f"  netdsl {'fused' if os.environ.get('BENCH_FUSED') == '1' else 'written-out'} cells", flush=True)
    for which in ("netdsl", "torch"):
        r = subprocess.run([sys.executable, __file__, "--child", which, str(budget)], capture_output=True,
                           text=True, env=env)
        if r.returncode != 0:
            raise SystemExit(r.stderr[-3000:])
        print(f"{which}: {r.stdout.strip().splitlines()[-1]}", flush=True)
