"""netdsl on CUDA vs PyTorch eager on the same GPU: one fp32 SGD training step.

    scripts/gpu-check            (runs this after the CUDA tests; see docs/cuda.md)
    python benchmarks/bench_gpu.py [--tiny]

ResNet-18 at 32x32 batch 64 and ResNet-50 at 224x224 batch 32, 1000 classes; the
step is forward, cross-entropy, backward and an SGD (momentum 0.9, weight decay 1e-4)
update. TF32 is off in torch (`allow_tf32 = False` for matmul and cuDNN), so both
sides compute in full fp32. netdsl runs in up to four ways, each in its own process:
`graph` (the step captured as one CUDA graph and replayed, runtime/cuda_graph.py),
`records` (NETDSL_CUDA_GRAPHS=0: the eager step replayed from launch records over one
device arena, runtime/cuda_arena.py), `eager` (NETDSL_CUDA_ARENA=0 as well: kernel by
kernel through the bindings; all three with netdsl's caching allocator,
runtime/cuda_pool.py), `eager-numba-alloc` (NETDSL_CUDA_POOL=0 as well: numba's
allocator, what netdsl did before) and, where CuPy is installed, `graph-cublas`
(NETDSL_CUDA_BLAS=1: the GEMMs through cuBLAS, fp32 without TF32, runtime/cuda_blas.py);
`records-config` (the records calling numba's configured launcher) and `records-packed`
(arguments packed once, cuda.core's launch) on request.
BENCH_MODES picks them (default: all that can run but those two).
`python benchmarks/bench_gpu.py arena`: ResNet-18 only, records (the three launch paths)
against eager, for scripts/gpu-check's arena section. `NUMBA_ENABLE_CUDASIM=1 python
benchmarks/bench_gpu.py host`: without a GPU, the host time of a step outside the kernels,
eager against records (every kernel a no-op under the simulator).

Per way: images/s (median of STEPS timed steps after warm-up), milliseconds a step,
host CPU time a step (the process's CPU time across the step, time.process_time: it
includes any time the driver spins waiting for the device in a synchronisation, for
torch as for netdsl), device memory allocations made during the timed steps (the pool
counts them; 0 means a steady state), and peak device memory: with netdsl's pool its
peak of bytes handed out ("alloc", comparable to torch's max_memory_allocated) and
held from the device ("reserved", torch's max_memory_reserved); with numba's allocator
the device's used memory sampled after every step, minus what was used before the model
was built (an upper bound). Also netdsl's time per operator family (one extra eager step
with NETDSL_PROFILE=1: the executor synchronises around every step, so the families add
up to a little more than a plain step) and the planner's figure (runtime.cuda.device_memory).
--tiny: small sizes, torch on the CPU (a dry run under the CUDA simulator, NUMBA_ENABLE_CUDASIM=1).
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


MODES = {"graph": {"NETDSL_CUDA_GRAPHS": "1"},
         "records": {"NETDSL_CUDA_GRAPHS": "0", "NETDSL_CUDA_ARENA": "1"},
         "eager": {"NETDSL_CUDA_GRAPHS": "0", "NETDSL_CUDA_ARENA": "0"},
         "eager-numba-alloc": {"NETDSL_CUDA_GRAPHS": "0", "NETDSL_CUDA_POOL": "0", "NETDSL_CUDA_ARENA": "0"},
         "graph-cublas": {"NETDSL_CUDA_GRAPHS": "1", "NETDSL_CUDA_BLAS": "1"},
         "records-config": {"NETDSL_CUDA_GRAPHS": "0", "NETDSL_CUDA_ARENA": "config"},
         "records-packed": {"NETDSL_CUDA_GRAPHS": "0", "NETDSL_CUDA_ARENA": "packed"}}
# `arena`: the eager step replayed from launch records (runtime/cuda_arena.py) against the eager step
ARENA_MODES = ("eager", "records", "records-config", "records-packed")


def run_netdsl(name) -> dict:
    import netdsl.runtime.cuda as RC  # (first: it sets the stream mode and the allocator before numba.cuda)
    import numpy as np
    from numba import cuda
    from netdsl.lang.elaborate import elaborate
    from netdsl.runtime import cuda_pool, make_optimizer
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
    pool = cuda_pool.pool()
    used = []

    def step():
        total_loss, _, _, grads = m.train_step(feeds)     # the loss comes down: a synchronisation
        opt.step(grads)
        cuda.synchronize()
        if pool is None:
            used.append(total - ctx.get_memory_info()[0])
        return total_loss
    t = time.perf_counter()
    first_loss = step()                                   # compiles (or loads cached) kernels
    first = time.perf_counter() - t
    step()                                                # second: captured as a graph (graph mode)
    if not TINY:
        step()                                            # a third warm-up: allocator, caches
    allocs0 = pool.device_allocs if pool is not None else 0
    times, cpu = [], []
    for _ in range(STEPS):
        t, c = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    out = {"sec": sorted(times)[len(times) // 2], "cpu": sorted(cpu)[len(cpu) // 2], "first_step": first,
           "loss0": first_loss, "planned": device_memory(g, {"N": batch})["total"],
           "graph": "; ".join(m.graph_status.values()) or "-",
           "arena": "; ".join(m._graphs.arena.status.values()) if m._graphs is not None else "-",
           "allocs": (pool.device_allocs - allocs0) if pool is not None else None}
    if os.environ.get("NETDSL_CUDA_BLAS") == "1":
        from netdsl.runtime import cuda_blas
        out["graph"] += f"; cuBLAS: {RC.BLAS or 'on'}, products {cuda_blas.stats}"
    if os.environ.get("NETDSL_CUDA_GRAPHS") == "0" and os.environ.get("BENCH_FAMILIES", "1") != "0":
        # the eager ways: time per operator family (a profiled step runs eagerly, not from records)
        prog = next(iter(m._programs.values()))
        prog.profile = {}
        sync = prog.target.sync

        def sync_and_sample():      # the profiled step syncs around every op: sample there too
            sync()
            if pool is None:
                used.append(total - ctx.get_memory_info()[0])
        prog.target.sync = sync_and_sample
        step()
        prog.target.sync = sync
        fams: dict[str, float] = {}
        for op, sec in prog.profile.items():
            fams[family(op)] = fams.get(family(op), 0.0) + sec
        out["families"] = fams
    if pool is not None:
        st = pool.stats()
        out["peak"], out["reserved"] = st["peak_allocated"], st["peak_reserved"]
    else:
        out["peak"], out["reserved"] = max(used) - (total - free0), None
    return out


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
    times, cpu = [], []
    for _ in range(STEPS):
        t, c = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    peak = torch.cuda.max_memory_allocated() if dev == "cuda" else 0
    reserved = torch.cuda.max_memory_reserved() if dev == "cuda" else 0
    return {"sec": sorted(times)[len(times) // 2], "cpu": sorted(cpu)[len(cpu) // 2], "peak": peak,
            "reserved": reserved, "torch": torch.__version__}


def sub(*args, env=None) -> dict:
    timeout = float(os.environ.get("BENCH_TIMEOUT", 300))
    try:
        out = subprocess.run([sys.executable, os.path.abspath(__file__), *args, *(["--tiny"] if TINY else [])],
                             capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                             env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s (BENCH_TIMEOUT)"}
    if out.returncode:
        return {"error": (out.stderr or out.stdout)[-2000:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    mib = lambda b: f"{b / 2**20:.0f}" if b is not None else "-"
    import importlib.util
    default = [w for w in MODES if w not in ("records-config", "records-packed")
               and (w != "graph-cublas" or importlib.util.find_spec("cupy") is not None)]
    modes = [w for w in os.environ.get("BENCH_MODES", ",".join(default)).split(",") if w]
    for name in MODELS:
        _, _, size, batch = geometry(name)
        runs = {f"netdsl {w}": sub("netdsl", name, env=MODES[w]) for w in modes}
        runs["torch eager"] = sub("torch", name)
        print(f"{name} {size}x{size} batch {batch}, one fp32 SGD training step (median of {STEPS}):")
        print(f"  {'':26s} {'images/s':>9s} {'ms/step':>8s} {'host CPU ms':>11s} {'x torch':>7s} "
              f"{'peak MiB alloc/reserved':>24s} {'device allocs':>13s}")
        tr = runs["torch eager"]
        for who, r in runs.items():
            if "error" in r:
                print(f"  {who} FAILED:\n    " + r["error"].replace("\n", "\n    "))
                continue
            ratio = f"{r['sec'] and tr['sec'] / r['sec']:.3f}" if "error" not in tr else "-"
            allocs = "-" if r.get("allocs") is None else str(r["allocs"])
            print(f"  {who:26s} {batch / r['sec']:9.1f} {1e3 * r['sec']:8.2f} {1e3 * r['cpu']:11.2f} {ratio:>7s} "
                  f"{mib(r['peak']) + ' / ' + mib(r['reserved']):>24s} {allocs:>13s}")
        for who, r in runs.items():
            if who.startswith("netdsl") and "error" not in r:
                print(f"  {who}: first step {r['first_step']:.1f} s (compile or cache load), loss {r['loss0']:.4f}, "
                      f"CUDA graph: {r['graph']}; eager steps: {r['arena']}")
        if "error" not in tr:
            print(f"  torch {tr['torch']}, eager, TF32 off; planned device memory (netdsl): "
                  + next((mib(r["planned"]) + " MiB" for r in runs.values() if "planned" in r), "-"))
        fam = next((r["families"] for r in runs.values() if "families" in r), None)
        if fam:
            tot = sum(fam.values())
            print("  netdsl eager time by operator family (forward + backward, profiled step):")
            for f, sec in sorted(fam.items(), key=lambda kv: -kv[1]):
                print(f"    {f:26s} {1e3 * sec:9.2f} ms  {100 * sec / tot:5.1f}%")
        sys.stdout.flush()


def arena():
    """ResNet-18 (32x32, batch 64) eager steps replayed from launch records, through the compiled
    kernel, numba's configured launcher and packed arguments, against the eager step (graphs off, each
    way in its own process, eager first; no profiled step; each row printed when its run ends,
    so a time limit keeps the rows done): images/s, ms and host CPU ms a step, speed-up over
    eager, device allocations in the timed steps, the records' status (launches a step)."""
    name = "resnet18"
    _, _, size, batch = geometry(name)
    print(f"{name} {size}x{size} batch {batch}, eager steps, graphs off (median of {STEPS}; each row as it ends):")
    print(f"  {'':16s} {'images/s':>9s} {'ms/step':>8s} {'host CPU ms':>11s} {'x eager':>7s} {'device allocs':>13s}")
    sys.stdout.flush()
    base = None
    for who in ARENA_MODES:     # eager first: the rows after it are measured against it
        r = sub("netdsl", name, env={**MODES[who], "BENCH_FAMILIES": "0"})
        if "error" in r:
            print(f"  {who} FAILED:\n    " + r["error"].replace("\n", "\n    "))
        else:
            base = base or r
            print(f"  {who:16s} {batch / r['sec']:9.1f} {1e3 * r['sec']:8.2f} {1e3 * r['cpu']:11.2f} "
                  f"{base['sec'] / r['sec']:7.2f} {'-' if r.get('allocs') is None else r['allocs']:>13}   {r['arena']}")
        sys.stdout.flush()


def host():
    """Without a GPU (NUMBA_ENABLE_CUDASIM=1, every kernel a no-op, values garbage): host CPU
    time of a ResNet-18 32x32 batch-64 training step outside the kernels, eager
    (Program.run: the bindings, their arrays and allocations, the launches) against the
    records' replay. The simulator's launch is not numba's (no typing, no argument packing):
    a lower bound of what the records save, and a check that they save it."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
        sys.exit("bench_gpu.py host: run under NUMBA_ENABLE_CUDASIM=1")
    from numba.cuda.simulator.kernel import FakeCUDAKernel
    call = FakeCUDAKernel.__call__
    FakeCUDAKernel.__call__ = lambda self, *a: call(self, *a) if self._device else None
    import numpy as np
    from netdsl.lang.elaborate import elaborate
    from netdsl.runtime import cuda_arena
    from netdsl.runtime.model import Model
    name, batch, reps = "resnet18", 64, 5
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, f"{name}.net")
        with open(p, "w") as f:
            f.write(spec(name))
        g, _ = elaborate(p)
    m = Model(g, seed=0, device="cuda")
    rng = np.random.default_rng(0)
    feeds = {"image": rng.standard_normal((batch, 3, 32, 32)).astype(np.float32),
             "label": rng.integers(0, CLASSES, batch)}
    dims, fv = m.bind(feeds, upload=False)
    prog = m._program(True, dims, ())

    def state():
        st = m._state(dims, True, None)
        st.grad_buffers = m.flat.bind(m.training_graph.grads)
        return st
    inputs = {k: m.target.upload(a) for k, a in fv.items()}

    def median(f):
        t = []
        for _ in range(reps):
            c = time.process_time()
            f()
            t.append(time.process_time() - c)
        return sorted(t)[reps // 2]
    prog.run(state(), inputs)       # builds the generated kernels
    eager = median(lambda: prog.run(state(), inputs))
    r, _ = cuda_arena.record(prog, state(), dict(inputs), tuple(state().params.values()), "kernel")
    if isinstance(r, str):
        sys.exit(f"not recorded: {r}")
    replay = median(lambda: r.replay(fv))
    n = sum(ln.grid is not None for ln in r.launches)
    print(f"{name} 32x32 batch {batch} training step under the simulator, kernels no-ops: host CPU ms a step "
          f"(median of {reps}) eager {1e3 * eager:.1f}, records {1e3 * replay:.2f} ({eager / replay:.1f}x); "
          f"{n} launches for {len(prog.plan.steps)} plan steps ({1e6 * eager / n:.0f} vs {1e6 * replay / n:.1f} us "
          f"a launch); arena {r.size / 2**20:.1f} MiB")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--tiny"]
    if args == ["arena"]:
        arena()
    elif args == ["host"]:
        host()
    elif args:
        fn = {"netdsl": run_netdsl, "torch": run_torch}[args[0]]
        print(json.dumps(fn(args[1])))
    else:
        main()
