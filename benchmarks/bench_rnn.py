"""Recurrent training steps, netdsl vs PyTorch 2.13 on the CPU, side by side in one run.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_rnn.py [CELL ...]

For each cell (lstm, gru, rnn; default all three): a character-level language model
(embedding 64 -> one recurrent layer of hidden H -> linear over the vocabulary), batch
N, sequence T, one training step (forward, backward, Adam) on random characters.
netdsl runs specs/rnn/charlm_<cell>.net twice: with the torch-layout fused cell
(`fused=true`) and with the notes' written-out equations (`fused=false`; an LSTM either
way, and a fused vanilla RNN, run as the CPU's layer kernel: docs/language.md); torch runs
nn.Embedding + nn.LSTM/GRU/RNN + nn.Linear. Each framework runs in its own
subprocess; BENCH_ROUNDS interleaved rounds of the median of BENCH_STEPS steps.
Prints training tokens/s (N*T per step) and the ratio to torch.
Sizes: BENCH_H (512), BENCH_N (64), BENCH_T (100), BENCH_V (100).
`bench_rnn.py gemm` times the LSTM step's two GEMMs alone, one thread, in CPU time (so a
busy machine still gives figures): h @ W_hh^T [N, H] x [H, 4H] (forward) and
g @ W_hh [N, 4H] x [4H, H] (backward), netdsl's (scipy's OpenBLAS through Numba) against
torch's, and netdsl's whole step (GEMM and gates).
`bench_rnn.py profile [CELL ...]` splits one training step by phase (the layer kernel
each way (lstm, rnn), or the input projection, the T steps forward and backward, the
weight-gradient GEMMs and scan's copies of the per-step path; Python, head and loss, Adam), one thread, in CPU time, netdsl's fused cell beside torch's
(BENCH_PROFILE_THREADS=2: two threads, in wall time).
BENCH_DEVICE=cuda runs both on the GPU (torch's nn.LSTM is cuDNN's there; netdsl's
parameters, gradients and Adam state stay on the device); scripts/gpu-check does.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THREADS = int(os.environ.get("BENCH_THREADS", os.cpu_count() or 2))
STEPS = int(os.environ.get("BENCH_STEPS", 5))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", 3))
H = int(os.environ.get("BENCH_H", 512))
N = int(os.environ.get("BENCH_N", 64))
T = int(os.environ.get("BENCH_T", 100))
V = int(os.environ.get("BENCH_V", 100))
E = 64
DEVICE = os.environ.get("BENCH_DEVICE", "cpu")
# `profile` at more than one thread times wall clock (CPU time would add the threads up)
PROFILE_THREADS = int(os.environ.get("BENCH_PROFILE_THREADS", 1))
_clock = time.process_time if PROFILE_THREADS == 1 else time.perf_counter


def data(seed=0):
    import numpy as np
    r = np.random.default_rng(seed)
    x = r.integers(0, V, (N, T + 1))
    return x[:, :-1], x[:, 1:]


def run_netdsl(cell: str, fused: bool) -> list[float]:
    sys.path.insert(0, ROOT)
    from netdsl.kernels import native
    native.set_num_threads(THREADS)
    from netdsl.lang.elaborate import elaborate
    from netdsl.runtime import clip_grad_norm, make_optimizer
    from netdsl.runtime.model import Model
    g, _ = elaborate(os.path.join(ROOT, "specs", "rnn", f"charlm_{cell}.net"), None,
                     {"vocab": V, "embed": E, "hidden": H, "layers": 1, "fused": fused})
    m = Model(g, device=DEVICE)
    opt, clip, sync = make_optimizer("adam", m.trainable(), lr=2e-3), clip_grad_norm, lambda: None
    if DEVICE == "cuda":
        from netdsl.runtime import cuda
        opt, clip, sync = cuda.DeviceOptimizer(opt, m.trainable()), cuda.clip_grad_norm, cuda.synchronize
    x, y = data()
    times = []
    for i in range(STEPS + 1):
        t0 = time.perf_counter()
        _, _, _, grads = m.train_step({"chars": x, "next": y})
        clip(grads, 5.0)
        opt.step(grads)
        sync()
        times.append(time.perf_counter() - t0)
    return times[1:]


def run_torch(cell: str) -> list[float]:
    import torch
    torch.set_num_threads(THREADS)
    rnn = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[cell](E, H, batch_first=True)
    emb, head = torch.nn.Embedding(V, E), torch.nn.Linear(H, V)
    if DEVICE == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        rnn, emb, head = rnn.cuda(), emb.cuda(), head.cuda()
    params = [*emb.parameters(), *rnn.parameters(), *head.parameters()]
    opt = torch.optim.Adam(params, lr=2e-3)
    x, y = (torch.tensor(a, device=DEVICE) for a in data())
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)
    times = []
    for i in range(STEPS + 1):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        hs, _ = rnn(emb(x))
        loss = torch.nn.functional.cross_entropy(head(hs).reshape(-1, V), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        opt.step()
        sync()
        times.append(time.perf_counter() - t0)
    return times[1:]


def child(which: str, cell: str) -> float:
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS=str(THREADS))
    r = subprocess.run([sys.executable, __file__, "--child", which, cell], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(r.stderr[-3000:])
    return statistics.median(json.loads(r.stdout.strip().splitlines()[-1]))


def main(cells):
    print(f"# {time.strftime('%Y-%m-%d')}  {platform.processor() or platform.machine()}  "
          f"{_cpu_model()}  device={DEVICE}  threads={THREADS}  H={H} N={N} T={T} V={V} E={E}  "
          f"rounds={ROUNDS} steps={STEPS}")
    for cell in cells:
        best: dict[str, list[float]] = {"netdsl fused": [], "netdsl written-out": [], "torch": []}
        for _ in range(ROUNDS):
            best["torch"].append(child("torch", cell))
            best["netdsl fused"].append(child("fused", cell))
            best["netdsl written-out"].append(child("written", cell))
        tok = {k: N * T / statistics.median(v) for k, v in best.items()}
        print(f"{cell}: " + "  ".join(f"{k} {v:,.0f} tok/s" for k, v in tok.items())
              + f"  | fused/torch {tok['netdsl fused'] / tok['torch']:.2f}x"
              + f"  written-out/torch {tok['netdsl written-out'] / tok['torch']:.2f}x", flush=True)


def _cpu_seconds(f, budget=1.0) -> float:
    f()
    t0, n = time.process_time(), 0
    while time.process_time() - t0 < budget:
        f()
        n += 1
    return (time.process_time() - t0) / n


def gemms():
    """The LSTM step's GEMMs, one thread, CPU time: GFLOP/s of netdsl's and torch's."""
    import numpy as np
    import torch
    from netdsl.kernels import native
    native.set_num_threads(1)
    torch.set_num_threads(1)
    from netdsl.kernels.cpu import recurrent as R
    r = np.random.default_rng(0)
    h, c = r.random((N, H), np.float32), r.random((N, H), np.float32)
    w, xp, g = r.random((4 * H, H), np.float32), r.random((N, 4 * H), np.float32), r.random((N, 4 * H), np.float32)
    th, tw, tg = torch.from_numpy(h), torch.from_numpy(w), torch.from_numpy(g)
    wt = np.ascontiguousarray(w.T)
    flop = 2 * N * H * 4 * H
    print(f"# {time.strftime('%Y-%m-%d')}  {_cpu_model()}  one thread, CPU time  N={N} H={H}")
    for name, f in [("netdsl h @ W_hh^T (matmul_rows)", lambda: R.matmul_rows(h, wt)),
                    ("torch  h @ W_hh^T", lambda: th @ tw.T),
                    ("netdsl g @ W_hh (matmul_rows)", lambda: R.matmul_rows(g, w)),
                    ("torch  g @ W_hh", lambda: tg @ tw),
                    ("netdsl lstm step: GEMM + gates (cell_step)", lambda: R.cell_step("lstm", xp, h, c, w))]:
        dt = _cpu_seconds(f)
        print(f"{name:44s} {dt * 1e3:7.3f} ms  {flop / dt / 1e9:6.1f} GFLOP/s of the GEMM", flush=True)


PHASES = [("layer kernel forward (projection in its GEMMs)", ("K.layer_forward",)),  # labels, or prefixes
          ("layer kernel backward (weight gradients in it)", ("K.layer_backward",)),  # ending in . or :
          ("input projection (before the loop)", ("K.project",)),
          ("T steps forward (GEMM + gates)", ("K.cell_step",)),
          ("T steps backward (gates + GEMM)", ("K.cell_step_grads",)),
          ("weight-gradient and gx GEMMs (after the loop)", ("K.weight_grad", "K.matmul_rows", "K.project_backward")),
          ("scan copies and buffers", ("scan.",)),
          ("scan, step programs, bindings (Python)", tuple(f"op:{o}{g}" for o in ("scan", "lstm_cell", "gru_cell",
                                                                                   "rnn_cell", "zeros", "fill")
                                                           for g in ("", "_grad"))),
          ("embedding, head, loss", ("op:",)),
          ("clip + Adam", ("opt",))]


def _in(label, keys):
    return any(label == k or (k[-1] in ".:" and label.startswith(k)) for k in keys)


def profile(cell: str):
    """One training step split by phase, one thread, process CPU time (best of 4 steps):
    netdsl's fused cell (each phase's own time, nested calls apart) and torch's."""
    import collections
    from netdsl.kernels import native
    native.set_num_threads(PROFILE_THREADS)
    from netdsl.kernels import cpu as K
    from netdsl.kernels.cpu import recurrent as R
    from netdsl.runtime import clip_grad_norm, cpu as table, make_optimizer, scan
    from netdsl.runtime.model import Model
    from netdsl.lang.elaborate import elaborate
    own, stack, inside = collections.defaultdict(float), [], [0]

    def timed(fn, label):
        is_kernel = label.startswith("K.")

        def run(*a, **k):
            if is_kernel and inside[0]:     # a kernel called by another: counted as the outer one's
                return fn(*a, **k)
            inside[0] += is_kernel
            t0 = _clock()
            stack.append(0.0)
            try:
                return fn(*a, **k)
            finally:
                dt, inner = _clock() - t0, stack.pop()
                own[label] += dt - inner
                inside[0] -= is_kernel
                if stack:
                    stack[-1] += dt
        return run

    class Op:
        def __init__(self, b, label):
            self.b, self.run = b, timed(b, label)

        def __call__(self, *a, **k):
            return self.run(*a, **k)

        def __getattr__(self, name):
            return getattr(self.b, name)

    g, _ = elaborate(os.path.join(ROOT, "specs", "rnn", f"charlm_{cell}.net"), None,
                     {"vocab": V, "embed": E, "hidden": H, "layers": 1, "fused": True})
    m = Model(g)
    opt = make_optimizer("adam", m.trainable(), lr=2e-3)
    x, y = data()

    def step(clip=clip_grad_norm, update=opt.step):
        _, _, _, grads = m.train_step({"chars": x, "next": y})
        clip(grads, 5.0)
        update(grads)
    step(), step()
    for op, b in list(table.KERNELS.items()):
        table.KERNELS[op] = Op(b, "op:" + op)
    for name in ("cell_step", "cell_step_grads", "project", "project_backward", "weight_grad", "matmul_rows",
                 "layer_forward", "layer_backward"):
        if hasattr(K, name):        # (so that an older tree profiles too)
            setattr(K, name, timed(getattr(K, name), "K." + name))
    for name in ("matmul_rows", "weight_grad", "_recurrent_grad"):
        if hasattr(R, name):        # (so that an older tree profiles too)
            setattr(R, name, timed(getattr(R, name), "K." + name))
    for name in ("take", "view", "put", "add", "zeros", "empty"):
        if hasattr(scan.CpuArrays, name):
            setattr(scan.CpuArrays, name, staticmethod(timed(getattr(scan.CpuArrays, name), "scan." + name)))
    scan._Deferred.keep = staticmethod(timed(scan._Deferred.keep, "scan.keep"))
    if "keep" in vars(scan._Cell):      # (a newer tree: a cell keeps h and x side by side)
        scan._Cell.keep = timed(scan._Cell.keep, "scan.keep")
    best = None
    for _ in range(4):
        own.clear()
        t0 = _clock()
        step(timed(clip_grad_norm, "opt"), timed(opt.step, "opt"))
        total = _clock() - t0
        if best is None or total < best[0]:
            best = (total, dict(own))
    total, own = best
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}  {_cpu_model()}  {PROFILE_THREADS} thread(s), {'CPU' if PROFILE_THREADS == 1 else 'wall'} time, "
          f"best of 4 steps  "
          f"{cell} H={H} N={N} T={T}  load {os.getloadavg()[0]:.1f}")
    print(f"netdsl {cell} fused: {total * 1e3:.0f} ms a step ({N * T / total:,.0f} tok/s)")
    left = dict(own)
    for name, keys in PHASES:
        ms = sum(left.pop(k) for k in [k for k in left if _in(k, keys)]) * 1e3
        if ms:
            print(f"  {name:50s} {ms:7.1f} ms")
    print(f"  {'rest (train_step, executor)':50s} {(total - sum(own.values()) + sum(left.values())) * 1e3:7.1f} ms")
    torch_phases(cell)


def torch_phases(cell: str):
    import torch
    torch.set_num_threads(PROFILE_THREADS)
    rnn = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[cell](E, H, batch_first=True)
    emb, head = torch.nn.Embedding(V, E), torch.nn.Linear(H, V)
    params = [*emb.parameters(), *rnn.parameters(), *head.parameters()]
    opt = torch.optim.Adam(params, lr=2e-3)
    x, y = (torch.tensor(a) for a in data())
    pt = _clock

    def step():
        mark = {}
        t0 = pt()
        opt.zero_grad(set_to_none=True)
        e = emb(x)
        t1 = pt()
        hs, _ = rnn(e)
        t2 = pt()
        hs.register_hook(lambda g: mark.setdefault("hs", pt()) and None)
        e.register_hook(lambda g: mark.setdefault("e", pt()) and None)
        loss = torch.nn.functional.cross_entropy(head(hs).reshape(-1, V), y.reshape(-1))
        loss.backward()
        t4 = pt()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        opt.step()
        t5 = pt()
        return {"total": t5 - t0, f"nn.{cell.upper()} forward (projection, T steps)": t2 - t1,
                f"nn.{cell.upper()} backward (T steps, weight gradients)": mark["e"] - mark["hs"],
                "embedding, head, loss": (t1 - t0) + (mark["hs"] - t2) + (t4 - mark["e"]), "clip + Adam": t5 - t4}
    step(), step()
    best = min((step() for _ in range(4)), key=lambda d: d["total"])
    print(f"torch {cell}: {best.pop('total') * 1e3:.0f} ms a step")
    for k, v in best.items():
        print(f"  {k:50s} {v * 1e3:7.1f} ms")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        return "?"


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        which, cell = sys.argv[2], sys.argv[3]
        times = run_torch(cell) if which == "torch" else run_netdsl(cell, which == "fused")
        print(json.dumps(times))
    elif sys.argv[1:2] == ["profile"]:
        os.environ["OPENBLAS_NUM_THREADS"] = "1"
        for c in sys.argv[2:] or ["lstm"]:
            profile(c)
    elif sys.argv[1:] == ["gemm"]:
        os.environ["OPENBLAS_NUM_THREADS"] = "1"
        gemms()
    else:
        main(sys.argv[1:] or ["lstm", "gru", "rnn"])
