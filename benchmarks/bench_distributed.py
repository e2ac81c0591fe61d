"""Data-parallel training over MPI on this machine: images/s of one training epoch of a
small CNN (28x28 inputs, ~0.8 M parameters, SGD with momentum) at a global batch of 64,

    python benchmarks/bench_distributed.py          (prints a report; ~2 minutes on 2 cores)

  1 rank  x 1 thread     (no MPI)
  1 rank  x 2 threads    (no MPI, Numba's parallel kernels)
  2 ranks x 1 thread     (mpirun -n 2 --distributed: batch 32 each), gradients' Iallreduce
                         started from the backward pass (the default)
  2 ranks x 1 thread     the same with every bucket started after the backward pass
                         (NETDSL_DIST_OVERLAP=0)

Each configuration runs in fresh processes, trains one warm-up epoch of synthetic data
(kernels compiled or linked, buffers allocated), then times BENCH_EPOCHS epochs through
Trainer.train_epoch, the code `netdsl run` runs. The 2-rank runs also report the bytes
one step allreduces, the buckets, and the time per step a rank spends waiting for the
allreduce to finish after its backward pass (the communication not hidden behind it).
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGES = int(os.environ.get("BENCH_IMAGES", 4096))
EPOCHS = int(os.environ.get("BENCH_EPOCHS", 2))
BATCH = 64      # global

SPEC = """
network small_cnn(classes = 10) {
  input image: f32[N, 1, 28, 28]
  input label: i64[N]
  logits = image -> conv(32, k=3, p=1) -> relu -> maxpool(k=2)
                 -> conv(64, k=3, p=1) -> relu -> maxpool(k=2)
                 -> flatten -> linear(256) -> relu -> linear(classes)
  output logits
  loss ce = cross_entropy(logits, label)
  train { optimizer = sgd(lr = 0.01, momentum = 0.9)  epochs = 1  batch = 64  data = synthetic(size = 4096) }
}
"""


def worker(spec_path: str, distributed: bool):
    """One rank (or the one process): train, time, print rank 0's JSON."""
    from netdsl.kernels import native
    from netdsl.lang.elaborate import elaborate
    from netdsl.lang.training import TrainCall
    from netdsl.runtime.train import Trainer
    threads = int(os.environ["BENCH_WORKER_THREADS"])
    native.set_num_threads(threads)
    g, _ = elaborate(spec_path, None, {})
    cfg = dict(g.train)
    cfg["data"] = TrainCall("synthetic", {"size": IMAGES})
    dist = None
    if distributed:
        from netdsl.runtime.distributed import connect
        dist = connect()
    cfg["batch"] = BATCH // (dist.size if dist else 1)
    out = tempfile.mkdtemp(prefix="bench-dist-")
    t = Trainer(g, cfg, out, open(spec_path).read(), log=lambda s: None, dist=dist)
    waited = [0.0, 0, 0]     # seconds waiting, steps, buckets started before the backward ended
    if dist is not None:
        dist.start(t)
        r = dist.reducer
        finish = r.finish

        def timed(*a):      # the wait after the backward: what overlap did not hide
            waited[2] += r.next
            t0 = time.perf_counter()
            res = finish(*a)
            waited[0] += time.perf_counter() - t0
            waited[1] += 1
            return res
        r.finish = timed
    t.train_epoch(progress=False)       # warm-up: compilation, allocation
    if dist is not None:
        dist.comm.Barrier()
    waited[:] = [0.0, 0, 0]
    t0 = time.perf_counter()
    for _ in range(EPOCHS):
        t.train_epoch(progress=False)
    if dist is not None:
        dist.comm.Barrier()
    seconds = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    if dist is None or dist.root:
        rec = {"images_per_s": EPOCHS * IMAGES / seconds, "seconds": seconds,
               "steps": EPOCHS * len(t.train_loader)}
        if dist is not None:
            rec.update(allreduce_bytes=r.bytes, buckets=[int(b.nbytes) for b in r.buffers],
                       wait_ms_per_step=1e3 * waited[0] / max(waited[1], 1), overlap=r.overlap,
                       buckets_started_in_backward_per_step=waited[2] / max(waited[1], 1))
        print(json.dumps(rec), flush=True)


def run(config: str, spec_path: str) -> dict:
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    py = [sys.executable, os.path.abspath(__file__), "--worker", spec_path]
    if config.startswith("2x1"):
        mpirun = os.path.join(os.path.dirname(sys.executable), "mpirun")
        mpirun = mpirun if os.path.exists(mpirun) else shutil.which("mpirun")
        env.update(NUMBA_NUM_THREADS="1", BENCH_WORKER_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1",
                   OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", NETDSL_DIST_OVERLAP="0" if "after" in config else "1")
        cmd = [mpirun, "--oversubscribe", "--bind-to", "none", "-n", "2", *py, "--distributed"]
    else:
        threads = config.split("x")[1]
        env.update(NUMBA_NUM_THREADS=threads, BENCH_WORKER_THREADS=threads)
        cmd = py
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=1200)
    if r.returncode:
        raise SystemExit(f"{config} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    d = tempfile.mkdtemp(prefix="bench-dist-spec-")
    spec = os.path.join(d, "small_cnn.net")
    with open(spec, "w") as f:
        f.write(SPEC)
    load0 = os.getloadavg()
    results = {}
    for config in ("1x1", "1x2", "2x1 overlapped", "2x1 after backward"):
        results[config] = run(config, spec)
        print(f"{config:>20}: {results[config]['images_per_s']:8.1f} images/s  "
              + json.dumps({k: v for k, v in results[config].items() if k != "images_per_s"}), flush=True)
    load1 = os.getloadavg()
    base = results["1x1"]["images_per_s"]
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}  {platform.machine()}  {os.cpu_count()} cores  "
          f"load {load0[0]:.2f} before, {load1[0]:.2f} after; global batch {BATCH}, {IMAGES} images x {EPOCHS} "
          f"epochs timed")
    for config, rec in results.items():
        print(f"{config:>20}: {rec['images_per_s']:8.1f} images/s  ({rec['images_per_s'] / base:.2f}x 1x1)")
    shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], "--distributed" in sys.argv)
    else:
        main()
