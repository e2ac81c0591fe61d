"""netdsl conv2d forward+backward vs torch on ResNet-18-at-32x32 layer shapes.

Run: env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_conv.py [--batch 64] [--reps 5]
Both sides use the same number of threads (numba's prange threads vs torch.set_num_threads).

--clock cpu: one thread each, timed by process CPU time. On a machine shared with
other jobs the wall-clock minimum still moves by 2x between runs; CPU time of one
thread moves much less, and `--batch 32 --clock cpu` is one thread's share of a
2-thread batch-64 step (our threads split the batch with no other synchronisation).
"""
import netdsl.kernels.cpu as K  # first: sets OPENBLAS_NUM_THREADS=1 before numpy loads BLAS

import argparse  # noqa: E402
import datetime  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import numba  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

F = torch.nn.functional

# name, Cin, Cout, kernel, stride, input H=W
LAYERS = [
    ("conv1 3->64 3x3", 3, 64, 3, 1, 32),
    ("64->64 3x3 @32", 64, 64, 3, 1, 32),
    ("64->128 3x3 s2 @32", 64, 128, 3, 2, 32),
    ("64->128 1x1 s2 @32", 64, 128, 1, 2, 32),
    ("128->128 3x3 @16", 128, 128, 3, 1, 16),
    ("128->256 3x3 s2 @16", 128, 256, 3, 2, 16),
    ("128->256 1x1 s2 @16", 128, 256, 1, 2, 16),
    ("256->256 3x3 @8", 256, 256, 3, 1, 8),
    ("256->512 3x3 s2 @8", 256, 512, 3, 2, 8),
    ("256->512 1x1 s2 @8", 256, 512, 1, 2, 8),
    ("512->512 3x3 @4", 512, 512, 3, 1, 4),
]


def best_of(fns, reps, clock=time.perf_counter):
    """Min time of each fn; reps interleaved so both sides see the same machine load."""
    for f in fns:
        f()  # warm-up (and compilation)
    best = [float("inf")] * len(fns)
    for _ in range(reps):
        for i, f in enumerate(fns):
            t0 = clock()
            f()
            best[i] = min(best[i], clock() - t0)
    return best


def loadavg():
    try:
        with open("/proc/loadavg") as f:
            return f.read().strip()
    except OSError:
        return "?"


def cpu_model():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    a = ap.parse_args()
    clock = time.perf_counter
    if a.clock == "cpu":
        numba.set_num_threads(1)
        clock = time.process_time
    threads = numba.get_num_threads()
    torch.set_num_threads(threads)
    print(f"# {datetime.date.today()}  {cpu_model()}, {os.cpu_count()} CPUs, {threads} threads each")
    print(f"# numba {numba.__version__}, numpy {np.__version__}, torch {torch.__version__}, batch {a.batch}")
    print(f"# OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}  "
          f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE')}  "
          f"OPENBLAS_L2_SIZE={os.environ.get('OPENBLAS_L2_SIZE')}")
    print(f"# clock {a.clock}; loadavg at start: {loadavg()}")
    print("# fwd = forward; bwd = gx+gw+gb (first layer: gw+gb only); times in ms, best of "
          f"{a.reps}; ratio = netdsl / torch (<1: netdsl faster); GF/s = fwd+bwd FLOPs / time")
    print(f"{'layer':22s} {'nd fwd':>8s} {'th fwd':>8s} {'ratio':>6s} {'nd bwd':>8s} {'th bwd':>8s} "
          f"{'ratio':>6s} {'nd tot':>8s} {'th tot':>8s} {'ratio':>6s} {'GF/s nd':>8s} {'GF/s th':>8s}")
    rng = np.random.default_rng(0)
    tot = np.zeros(4)
    for name, cin, cout, k, s, hw in LAYERS:
        p = k // 2
        x = rng.standard_normal((a.batch, cin, hw, hw), dtype=np.float32)
        w = rng.standard_normal((cout, cin, k, k), dtype=np.float32) * 0.05
        b = np.zeros(cout, np.float32)
        need_gx = cin != 3
        y = K.conv2d(x, w, b, s, p)
        gy = rng.standard_normal(y.shape, dtype=np.float32)
        tx = torch.tensor(x, requires_grad=need_gx)
        tw = torch.tensor(w, requires_grad=True)
        tb = torch.tensor(b, requires_grad=True)
        tgy = torch.tensor(gy)
        ty = F.conv2d(tx, tw, tb, s, p)
        np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-3, atol=1e-3)

        def th_bwd():
            tw.grad = tb.grad = tx.grad = None
            torch.autograd.backward(F.conv2d(tx, tw, tb, s, p), tgy)

        def th_fwd():
            with torch.no_grad():
                F.conv2d(tx, tw, tb, s, p)

        nd_f, th_f = best_of([lambda: K.conv2d(x, w, b, s, p), th_fwd], a.reps, clock)
        nd_b, th_fb = best_of([lambda: K.conv2d_backward(x, w, gy, s, p, need_gx=need_gx), th_bwd], a.reps, clock)
        th_b = max(th_fb - th_f, 1e-9)  # autograd step = forward + backward
        flops = 2.0 * a.batch * cout * y.shape[2] * y.shape[3] * cin * k * k * (3 if need_gx else 2)
        r = [nd_f, th_f, nd_b, th_b]
        tot += r
        print(f"{name:22s} {nd_f*1e3:8.2f} {th_f*1e3:8.2f} {nd_f/th_f:6.2f} {nd_b*1e3:8.2f} {th_b*1e3:8.2f} "
              f"{nd_b/th_b:6.2f} {(nd_f+nd_b)*1e3:8.2f} {(th_f+th_b)*1e3:8.2f} {(nd_f+nd_b)/(th_f+th_b):6.2f} "
              f"{flops/(nd_f+nd_b)/1e9:8.1f} {flops/(th_f+th_b)/1e9:8.1f}")
    print(f"{'total':22s} {tot[0]*1e3:8.2f} {tot[1]*1e3:8.2f} {tot[0]/tot[1]:6.2f} {tot[2]*1e3:8.2f} "
          f"{tot[3]*1e3:8.2f} {tot[2]/tot[3]:6.2f} {(tot[0]+tot[2])*1e3:8.2f} {(tot[1]+tot[3])*1e3:8.2f} "
          f"{(tot[0]+tot[2])/(tot[1]+tot[3]):6.2f}")
    print(f"# loadavg at end: {loadavg()}")


if __name__ == "__main__":
    main()
