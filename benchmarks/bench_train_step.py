"""netdsl vs PyTorch 2.13 on the CPU, side by side in one run, same thread count.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_train_step.py

Prints, for ResNet-18 at 32x32, batch 64, one SGD (momentum) training step:
  images/s of netdsl, PyTorch NCHW and PyTorch channels_last, and their ratios;
  peak memory of the training step: the peak RSS over the batch-64 steps (Linux's VmHWM,
  reset just before them) minus the RSS before them, each framework in its own process,
  after a warm-up step at batch 2 (code loaded, optimiser state allocated) and with that
  step's gradients alive in both; so it counts activations, workspace and gradients, and
  for netdsl the parallel variants of its kernels, which Numba loads on the first input
  big enough for them (~2 MiB of code);
and the start-up of ResNet-50 with a warm kernel cache: process start to the end of
its first training step (batch 1, 224x224, forward and backward), with a breakdown,
beside PyTorch's for the same path.
Each measurement runs in a fresh subprocess so that one framework's allocator and
threads do not disturb the other's; BENCH_ROUNDS (5; this machine's slow spells made
3 too few) interleaved rounds of the three, each the median of BENCH_STEPS (9) steps,
give a median and a best per framework.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THREADS = int(os.environ.get("BENCH_THREADS", os.cpu_count() or 2))
STEPS = int(os.environ.get("BENCH_STEPS", 9))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", 5))


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """The peak RSS since the last reset_peak() (Linux's VmHWM)."""
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) * 1024


def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def resnet18_spec(batch_note=""):
    lib = os.path.join(ROOT, "specs", "lib", "resnet.net")
    return f'''
import "{lib}"
network resnet18_32(classes = 1000) {{
  input image: f32[N, 3, 32, 32]
  input label: i64[N]
  logits = resnet(image, basic, [2, 2, 2, 2], classes, name="")
  output logits
  loss ce = cross_entropy(logits, label)
}}'''


def run_netdsl(batch: int) -> dict:
    import numba
    import numpy as np
    numba.set_num_threads(THREADS)
    import tempfile
    from netdsl.lang.elaborate import elaborate
    from netdsl.runtime import make_optimizer
    from netdsl.runtime.model import Model
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "r18.net")
        with open(p, "w") as f:
            f.write(resnet18_spec())
        g, _ = elaborate(p)
    m = Model(g, seed=0)
    opt = make_optimizer("sgd", m.trainable(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 1000, batch)
    _, _, _, grads = m.train_step({"image": x[:2], "label": y[:2]})   # load kernels at batch 2
    opt.step(grads)
    reset_peak()
    base = rss_now()     # with that step's gradients alive, as torch's .grad are at this point
    times = []
    for _ in range(STEPS):
        t = time.perf_counter()
        del grads       # torch's zero_grad(set_to_none=True) frees its .grad before a step
        _, _, _, grads = m.train_step({"image": x, "label": y})
        opt.step(grads)
        times.append(time.perf_counter() - t)
    plan = next(p for k, p in m._programs.items() if dict(k[1]).get("N") == batch).plan
    return {"sec": sorted(times)[len(times) // 2], "peak_growth": peak_rss() - base,
            "planned_peak": plan.peak_planned, "unplanned_peak": plan.peak_naive}


def run_torch(batch: int, channels_last: bool) -> dict:
    import torch
    torch.set_num_threads(THREADS)
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from reference.resnet import BasicBlock, ResNet
    torch.manual_seed(0)
    net = ResNet(BasicBlock, [2, 2, 2, 2], 1000)
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 1000, (batch,))
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

    def step(x=x, y=y):
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    step(x[:2], y[:2])                 # warm up at batch 2, as netdsl does
    reset_peak()
    base = rss_now()
    times = []
    for _ in range(STEPS):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return {"sec": sorted(times)[len(times) // 2], "peak_growth": peak_rss() - base}


def run_startup() -> dict:
    """Called in a fresh process: ResNet-50 from spec text to the end of its first step.

    Wall-clock slices of that one path: python_numpy (interpreter start, numpy), import
    (netdsl's front end and Model), elaborate, init_autodiff (Model: the weights are drawn
    on a helper thread from here on; the training graph), first_step (plan; importing
    the kernels and linking them from the native store, or Numba on a miss; waiting for the weights; the
    compute). next_step is a second step, not part of the total: the compute alone."""
    t0 = float(os.environ["BENCH_T0"])
    import numpy as np
    t_numpy = time.time()
    from netdsl.lang.elaborate import elaborate
    from netdsl.runtime.model import Model
    t_import = time.time()
    g, _ = elaborate(os.path.join(ROOT, "specs", "resnet50.net"))
    t_elab = time.time()
    m = Model(g, seed=0)
    m.training_graph
    t_build = time.time()
    feeds = {"image": np.zeros((1, 3, 224, 224), np.float32), "label": np.zeros(1, np.int64)}
    m.train_step(feeds)
    t_step = time.time()
    m.train_step(feeds)
    t_next = time.time()
    return {"python_numpy": t_numpy - t0, "import": t_import - t_numpy, "elaborate": t_elab - t_import,
            "init_autodiff": t_build - t_elab, "first_step": t_step - t_build, "total": t_step - t0,
            "next_step": t_next - t_step}


def run_startup_torch() -> dict:
    """The same path in PyTorch, for comparison: import, the reference ResNet-50 (weights
    drawn by its initialisers), one forward and backward at batch 1."""
    t0 = float(os.environ["BENCH_T0"])
    import torch
    t_import = time.time()
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from reference.resnet import Bottleneck, ResNet
    net = ResNet(Bottleneck, [3, 4, 6, 3], 1000)
    t_build = time.time()
    x, y = torch.zeros(1, 3, 224, 224), torch.zeros(1, dtype=torch.int64)
    torch.nn.functional.cross_entropy(net(x), y).backward()
    t_step = time.time()
    torch.nn.functional.cross_entropy(net(x), y).backward()
    t_next = time.time()
    return {"import": t_import - t0, "build": t_build - t_import, "first_step": t_step - t_build,
            "total": t_step - t0, "next_step": t_next - t_step}


def sub(mode: str, *args) -> dict:
    env = dict(os.environ, BENCH_T0=repr(time.time()))
    out = subprocess.run([sys.executable, __file__, mode, *map(str, args)], capture_output=True, text=True,
                         env=env, cwd=ROOT)
    if out.returncode:
        raise SystemExit(f"{mode} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine() -> str:
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores, {THREADS} threads"


def main():
    batch = 64
    print(f"# {time.strftime('%Y-%m-%d')} {machine()}; torch {__import__('torch').__version__}")
    print(f"# OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE')} OPENBLAS_L2_SIZE={os.environ.get('OPENBLAS_L2_SIZE')}")
    # Rounds interleave the three so that a slow spell of the machine (two shared cores:
    # single runs of either framework moved by +-20%) hits each alike; each round is a
    # fresh process per framework, its figure the median of STEPS steps.
    runs = {"netdsl": [], "torch NCHW": [], "torch channels_last": []}
    for _ in range(ROUNDS):
        runs["netdsl"].append(sub("netdsl", batch))
        runs["torch NCHW"].append(sub("torch", batch, 0))
        runs["torch channels_last"].append(sub("torch", batch, 1))
    ips = {k: sorted(batch / r["sec"] for r in v) for k, v in runs.items()}
    med = lambda xs: xs[len(xs) // 2]
    print(f"ResNet-18 32x32 batch {batch}, one SGD step ({ROUNDS} interleaved rounds, median of {STEPS} steps each):")
    print(f"  {'':20s} {'median':>8s} {'best':>8s} images/s   rounds")
    for k, v in ips.items():
        ratio = "" if k == "netdsl" else \
            f"   netdsl/torch = {med(ips['netdsl']) / med(v):.2f}x median, {ips['netdsl'][-1] / v[-1]:.2f}x best"
        print(f"  {k:20s} {med(v):8.1f} {v[-1]:8.1f}   " + " ".join(f"{x:.0f}" for x in v) + ratio)
    mib = lambda b: b / 2**20
    peak = {k: sorted(mib(r["peak_growth"]) for r in v) for k, v in runs.items()}
    nd = runs["netdsl"][0]
    print("peak memory of the training step (peak RSS over the batch-64 steps minus the RSS before them, after a "
          "batch-2 warm-up), median and range of the rounds:")
    for k, v in peak.items():
        print(f"  {k:20s} {med(v):7.1f} MiB ({v[0]:.1f}-{v[-1]:.1f})")
    print(f"  netdsl's planner: {mib(nd['planned_peak']):.1f} MiB of activations and gradients planned, "
          f"{mib(nd['unplanned_peak']):.1f} MiB if every intermediate were kept")
    sub("startup")                       # warm the kernel cache
    print(f"ResNet-50 start-up with a warm kernel cache (process start -> first training step done, batch 1; "
          f"the median of {ROUNDS} interleaved runs):")
    runs = {"netdsl": [], "torch": []}
    for _ in range(ROUNDS):
        runs["netdsl"].append(sub("startup"))
        runs["torch"].append(sub("startup_torch"))
    for k, v in runs.items():
        st = sorted(v, key=lambda r: r["total"])[ROUNDS // 2]
        print(f"  {k:7s} " + ", ".join(f"{k} {v:.2f} s" for k, v in st.items()))


if __name__ == "__main__":
    if len(sys.argv) > 1:
        mode = sys.argv[1]
        res = {"netdsl": lambda: run_netdsl(int(sys.argv[2])),
               "torch": lambda: run_torch(int(sys.argv[2]), sys.argv[3] == "1"),
               "startup": run_startup, "startup_torch": run_startup_torch}[mode]()
        print(json.dumps(res))
    else:
        main()
