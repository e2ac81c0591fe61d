"""netdsl on CUDA vs PyTorch eager on the same GPU: one fp32 SGD training step.

    scripts/gpu-check            (runs this after the CUDA tests; see docs/cuda.md)
    python benchmarks/bench_gpu.py [--tiny]

ResNet-18 at 32x32 batch 64 and ResNet-50 at 224x224 batch 32, 1000 classes; the
step is forward, cross-entropy, backward and an SGD (momentum 0.9, weight decay 1e-4)
update. TF32 is off in torch (`allow_tf32 = False` for matmul and cuDNN), so both
sides compute in full fp32. Prints images/s (median of STEPS timed steps after
warm-up), the netdsl/torch ratio, peak device memory, and netdsl's time per operator
family (one extra step with NETDSL_PROFILE=1: the executor synchronises around
every step, so the families add up to a little more than a plain step).

Each framework runs in its own process so one's allocator cannot hold memory for the
other. netdsl's peak is the device's used memory sampled after every step and after every
op of the profiled step, minus what was in use before the model was built (Numba frees
lazily, so this is an upper bound; sampled after steps alone it missed the activations),
beside `runtime.cuda.device_memory`, the planner's figure. torch's is
`max_memory_allocated`. --tiny: small sizes, torch on the CPU (a dry run under the
CUDA simulator, NUMBA_ENABLE_CUDASIM=1).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "--tiny" in sys.argv
STEPS = int(os.environ.get("BENCH_STEPS", 2 if TINY else 5))
# name: (blocks, per-stage counts, image size, batch); tiny: 1 block per stage, 8x8, batch 2
MODELS = {"resnet18": ("basic", [2, 2, 2, 2], 32, 64), "resnet50": ("bottleneck", [3, 4, 6, 3], 224, 32)}
CLASSES = 10 if TINY else 1000
FAMILIES = {"conv": ("conv", "conv_transpose"), "batch norm": ("bn",), "pooling": ("maxpool", "avgpool",
            "global_avgpool", "adaptive_avgpool"), "linear": ("linear",), "loss": ("cross_entropy", "fill"),
            "elementwise (generated)": ("elementwise",), "data movement": ("reshape", "flatten", "sum_to", "zeros")}


def geometry(name):
    block, counts, size, batch = MODELS[name]
    return (block, [1, 1, 1, 1], 8, 2) if TINY else (block, counts, size, batch)


def spec(name) -> str:
    block, counts, size, _ = geometry(name)
    lib = os.path.join(ROOT, "specs", "lib", "resnet.net")
    return f'''
import "{lib}"
network {name}(classes = {CLASSES}) {{
  input image: f32[N, 3, {size}, {size}]
  input label: i64[N]
  logits = resnet(image, {block}, {counts}, classes, name="")
  output logits
  loss ce = cross_entropy(logits, label)
}}'''


def family(op: str) -> str:
    base = op[:-5] if op.endswith("_grad") else op
    return next((f for f, ops in FAMILIES.items() if base in ops), "other")


def run_netdsl(name) -> dict:
    import numpy as np
    from numba import cuda
    from netdsl.lang.elaborate import elaborate
    from netdsl.runtime import make_optimizer
    from netdsl.runtime.cuda import DeviceOptimizer, device_memory
    from netdsl.runtime.model import Model
    _, _, size, batch = geometry(name)
    ctx = cuda.current_context()
    free0, total = ctx.get_memory_info()
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, f"{name}.net")
        with open(p, "w") as f:
            f.write(spec(name))
        g, _ = elaborate(p)
    m = Model(g, seed=0, device="cuda")
    opt = DeviceOptimizer(make_optimizer("sgd", m.trainable(), lr=0.01, momentum=0.9, weight_decay=1e-4),
                          m.trainable(), m.flat)      # one update launch for all parameters
    rng = np.random.default_rng(0)
    feeds = {"image": rng.standard_normal((batch, 3, size, size)).astype(np.float32),
             "label": rng.integers(0, CLASSES, batch)}
    used = []

    def step():
        total_loss, _, _, grads = m.train_step(feeds)     # the loss comes down: a synchronisation
        opt.step(grads)
        cuda.synchronize()
        used.append(total - ctx.get_memory_info()[0])
        return total_loss
    t = time.perf_counter()
    first_loss = step()                                   # compiles (or loads cached) kernels
    first = time.perf_counter() - t
    if not TINY:
        step()                                            # a second warm-up: allocator, caches
    times = []
    for _ in range(STEPS):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    prog = next(iter(m._programs.values()))
    prog.profile = {}
    sync = prog.target.sync

    def sync_and_sample():      # the profiled step syncs around every op: sample there too
        sync()
        used.append(total - ctx.get_memory_info()[0])
    prog.target.sync = sync_and_sample
    step()
    prog.target.sync = sync
    fams: dict[str, float] = {}
    for op, sec in prog.profile.items():
        fams[family(op)] = fams.get(family(op), 0.0) + sec
    return {"sec": sorted(times)[len(times) // 2], "first_step": first, "loss0": first_loss,
            "peak": max(used) - (total - free0), "planned": device_memory(g, {"N": batch})["total"],
            "families": fams}


def run_torch(name) -> dict:
    import torch
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from reference.resnet import BasicBlock, Bottleneck, ResNet
    dev = "cpu" if TINY else "cuda"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    block, counts, size, batch = geometry(name)
    torch.manual_seed(0)
    net = ResNet(BasicBlock if block == "basic" else Bottleneck, counts, CLASSES).to(dev)
    x = torch.randn(batch, 3, size, size, device=dev)
    y = torch.randint(0, CLASSES, (batch,), device=dev)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        sync()
    step()
    step()
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(STEPS):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() if dev == "cuda" else 0
    return {"sec": sorted(times)[len(times) // 2], "peak": peak, "torch": torch.__version__}


def sub(*args) -> dict:
    timeout = float(os.environ.get("BENCH_TIMEOUT", 300))
    try:
        out = subprocess.run([sys.executable, os.path.abspath(__file__), *args, *(["--tiny"] if TINY else [])],
                             capture_output=True, text=True, cwd=ROOT, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s (BENCH_TIMEOUT)"}
    if out.returncode:
        return {"error": (out.stderr or out.stdout)[-2000:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    mib = lambda b: b / 2**20
    for name in MODELS:
        _, _, size, batch = geometry(name)
        nd, tr = sub("netdsl", name), sub("torch", name)
        print(f"{name} {size}x{size} batch {batch}, one fp32 SGD training step (median of {STEPS}):")
        for who, r in (("netdsl", nd), ("torch", tr)):
            if "error" in r:
                print(f"  {who} FAILED:\n    " + r["error"].replace("\n", "\n    "))
        if "error" in nd or "error" in tr:
            continue
        ips = lambda r: batch / r["sec"]
        print(f"  netdsl  {ips(nd):9.1f} images/s   first step {nd['first_step']:.1f} s (compile or cache load), "
              f"loss {nd['loss0']:.4f}")
        print(f"  torch   {ips(tr):9.1f} images/s   (torch {tr['torch']}, eager, TF32 off)")
        print(f"  ratio   netdsl/torch = {ips(nd) / ips(tr):.3f}x")
        print(f"  peak device memory: netdsl {mib(nd['peak']):.0f} MiB (planned {mib(nd['planned']):.0f} MiB), "
              f"torch {mib(tr['peak']):.0f} MiB")
        tot = sum(nd["families"].values())
        print("  netdsl time by operator family (forward + backward, profiled step):")
        for f, s in sorted(nd["families"].items(), key=lambda kv: -kv[1]):
            print(f"    {f:26s} {1e3 * s:9.2f} ms  {100 * s / tot:5.1f}%")
        sys.stdout.flush()


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--tiny"]
    if args:
        fn = {"netdsl": run_netdsl, "torch": run_torch}[args[0]]
        print(json.dumps(fn(args[1])))
    else:
        main()
