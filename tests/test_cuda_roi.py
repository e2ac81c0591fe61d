"""The CUDA twins of the RoI operators (kernels/cuda/roi.py) without a GPU.

`sim`: under Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1, set before numba is
imported, hence a subprocess running this file as a script, as test_cuda_sim.py does),
every kernel forward and backward against its CPU twin (tests/test_roi_ops.py checks
those against torchvision and torch): RoIAlign settings (adaptive sampling too), RoIs
off the map, empty and padding RoIs, and one training step of a RoI head on
device="cuda" against the same step on the CPU, loss and every gradient to 1e-4.
`ptx`: each roi kernel compiled by NVVM for the signature its `kinds` declare (the
`ptx` extra); float32 ones must hold no float64 instruction, float64 ones must.
"""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import script_results

HERE = Path(__file__).resolve()
TOL = 1e-4


@pytest.fixture(scope="module")
def results():
    return script_results(HERE, {"sim": True, "ptx": False})


def test_every_roi_kernel_matches_cpu_under_the_simulator(results):
    errs = results["sim"]["errors"]
    bad = {k: v for k, v in errs.items() if not v <= TOL}
    assert not bad, bad
    assert len(errs) >= 31


def test_a_roi_of_a_missing_image_or_an_unknown_class_gives_nan_on_the_device(results):
    """A device kernel cannot raise: the runtime's non-finite check finds the NaN."""
    assert results["sim"]["missing_image"] == {"roi_align": True, "roi_pool": True, "select_class": True}


def test_roi_head_training_step_on_the_device_matches_cpu(results):
    r = results["sim"]["train"]
    assert r["grads"] and set(r["grads"]) == set(r["expect_grads"])
    assert r["loss"] <= TOL and r["y"] <= TOL, r
    worst = max(r["grads"], key=r["grads"].get)
    assert r["grads"][worst] <= TOL, (worst, r["grads"][worst])


def test_roi_kernels_compile_to_ptx_without_float64(results):
    r = results["ptx"]
    assert not r["errors"], r["errors"]
    assert len(r["float32"]) >= 10
    f64 = {k: v for k, v in r["float32"].items() if v}
    assert not f64, f64
    assert r["float64"] and all(r["float64"].values())      # the control: doubles are seen


# ---------------------------------------------------------------- the subprocess side

def rel(got, want):
    got = got.copy_to_host() if hasattr(got, "copy_to_host") else np.asarray(got)
    want = np.asarray(want)
    assert got.shape == want.shape, (got.shape, want.shape)
    if got.dtype.kind in "iub":
        return float(not np.array_equal(got, want))
    d = np.abs(got.astype(np.float64) - want)
    return float(d.max() / max(np.abs(want).max(), 1e-6)) if d.size else 0.0


ROIS = np.array([[0, 1.3, 2.2, 7.7, 8.1], [1, -6.5, -5.0, 9.0, 12.5], [1, -0.6, -0.4, 10.6, 8.6],
                 [0, 4.0, 4.0, 5.0, 5.0], [1, 3.0, 3.0, 3.0, 3.0], [0, 6.0, 5.0, 2.0, 1.0],
                 [0, -20.0, -15.0, 40.0, 30.0], [-1, 1.0, 1.0, 5.0, 5.0]], np.float32)


def _kernel_cases():
    """(name, cuda result, cpu result) of every roi kernel."""
    from netdsl.kernels import cpu as C, cuda as G
    rng = np.random.default_rng(0)
    r = lambda *s: rng.standard_normal(s).astype(np.float32)
    d = G.to_device
    x, rois = r(2, 3, 9, 11), ROIS
    out = []
    for tag, (aligned, sampling, scale, size) in {"legacy": (False, 2, 1.0, (3, 3)), "aligned": (True, 2, 0.5, (3, 4)),
                                                  "adaptive": (False, 0, 1.0, (2, 3)),
                                                  "adaptive_aligned": (True, -1, 0.5, 3)}.items():
        y = C.roi_align(x, rois, size, scale, sampling, aligned)
        gy = r(*y.shape)
        out += [(f"roi_align_{tag}", G.roi_align(d(x), d(rois), size, scale, sampling, aligned), y),
                (f"roi_align_{tag}_g", G.roi_align_backward(d(gy), d(rois), x.shape, scale, sampling, aligned),
                 C.roi_align_backward(gy, rois, x.shape, scale, sampling, aligned))]
    for tag, (size, scale) in {"7": (7, 1.0), "2x4": ((2, 4), 0.5), "coarse": (3, 1 / 16)}.items():
        y, arg = C.roi_pool(x, rois, size, scale)
        gy = r(*y.shape)
        gy_, garg = G.roi_pool(d(x), d(rois), size, scale)
        out += [(f"roi_pool_{tag}", gy_, y), (f"roi_pool_{tag}_argmax", garg, arg),
                (f"roi_pool_{tag}_g", G.roi_pool_backward(d(gy), garg, d(rois), x.shape),
                 C.roi_pool_backward(gy, arg, rois, x.shape))]
    y = C.crop_resize(x, rois, (5, 4))
    gy = r(*y.shape)
    out += [("crop_resize", G.crop_resize(d(x), d(rois), (5, 4)), y),
            ("crop_resize_g", G.crop_resize_backward(d(gy), d(rois), x.shape), C.crop_resize_backward(gy, rois, x.shape))]
    # l2norm: a zero vector, and more positions than a reduction block for the weight gradient
    for tag, shape in {"small": (2, 5, 3, 4), "wide": (2, 4, 10, 15)}.items():
        xs, w = r(*shape), np.abs(r(shape[1])) * 20
        xs[0, :, 0, 0] = 0
        gy = r(*shape)
        cg, gg = C.l2norm_backward(gy, xs, w, 1e-10), G.l2norm_backward(d(gy), d(xs), d(w), 1e-10)
        out += [(f"l2norm_{tag}", G.l2norm(d(xs), d(w), 1e-10), C.l2norm(xs, w, 1e-10)),
                (f"l2norm_{tag}_gx", gg[0], cg[0]), (f"l2norm_{tag}_gw", gg[1], cg[1]),
                (f"l2norm_{tag}_gw_only", G.l2norm_backward(d(gy), d(xs), d(w), 1e-10, need_gx=False)[1], cg[1])]
    for tag, shape in {"deltas": (5, 4, 4), "masks": (5, 3, 6, 6)}.items():
        xs, lab = r(*shape), np.array([1, -1, 0, shape[1] - 1, 2])
        gy = r(shape[0], *shape[2:])
        out += [(f"select_class_{tag}", G.select_class(d(xs), d(lab)), C.select_class(xs, lab)),
                (f"select_class_{tag}_g", G.select_class_backward(d(gy), d(lab), shape[1]),
                 C.select_class_backward(gy, lab, shape[1]))]
    return out


def _missing_image():
    from netdsl.kernels import cuda as G
    d = G.to_device
    x = np.ones((1, 2, 4, 4), np.float32)
    rois = d(np.array([[0, 0, 0, 2, 2], [1, 0, 0, 2, 2]], np.float32))
    align = G.roi_align(d(x), rois, 2, 1.0, 2, False).copy_to_host()
    pool = G.roi_pool(d(x), rois, 2, 1.0)[0].copy_to_host()
    sel = G.select_class(d(np.ones((2, 3, 4), np.float32)), d(np.array([0, 3]))).copy_to_host()
    ok = lambda a: bool(np.isfinite(a[0]).all() and np.isnan(a[1]).all())
    return {"roi_align": ok(align), "roi_pool": ok(pool), "select_class": ok(sel)}


def _train():
    """One step of tests/test_roi_ops.py's RoI head on both targets."""
    import tempfile
    sys.path.insert(0, str(HERE.parent))
    from test_roi_ops import HEAD
    from netdsl.lang.elaborate import elaborate
    from netdsl.runtime.model import Model
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "head.net"
        p.write_text(HEAD)
        g, _ = elaborate(str(p), None, {})
    cpu_m = Model(g, seed=3)
    gpu_m = Model(g, params={k: v.copy() for k, v in cpu_m.params.items()}, device="cuda")
    rng = np.random.default_rng(9)
    feeds = {"image": rng.standard_normal((2, 3, 12, 10)).astype(np.float32),
             "rois": np.array([[0, 1, 2, 9, 11], [1, -3, 0, 6, 8], [1, 4, 4, 4, 4], [0, 0, 0, 10, 12],
                               [1, 2.5, 3.5, 7.5, 9.5]], np.float32),
             "labels": np.array([2, 0, 1, 2, 1]), "target": rng.standard_normal((5, 4)).astype(np.float32)}
    tc, _, oc, gc = cpu_m.train_step(feeds)
    tg, _, og, gg = gpu_m.train_step(feeds)
    return {"loss": abs(tg - tc) / abs(tc), "y": rel(og["y"], oc["y"]),
            "grads": {k: rel(gg[k], gc[k]) for k in gc}, "expect_grads": sorted(cpu_m.trainable())}


def main_sim():
    return {"errors": {name: rel(got, want) for name, got, want in _kernel_cases()},
            "missing_image": _missing_image(), "train": _train()}


def _f64(ptx):
    return sorted({line.split()[0] for line in ptx.splitlines()
                   if ".f64" in line and not line.strip().startswith(".reg")})


def main_ptx():
    from numba import cuda
    from netdsl.kernels import cuda as K
    out = {"float32": {}, "float64": {}, "errors": {}}
    for name, disp, kinds in K.REGISTRY:
        if not name.startswith("roi."):
            continue
        for dt in (np.float32, np.float64):
            try:
                ptx, _ = cuda.compile_ptx(disp.py_func, K.signature(kinds, dt), cc=(8, 0))
            except Exception as e:  # report every failure
                out["errors"][f"{np.dtype(dt).name}:{name}"] = f"{type(e).__name__}: {str(e)[:400]}"
                continue
            out[np.dtype(dt).name][name] = _f64(ptx) if dt == np.float32 else bool(_f64(ptx))
    return out


if __name__ == "__main__":
    import warnings
    warnings.simplefilter("ignore")
    print(json.dumps({"sim": main_sim, "ptx": main_ptx}[sys.argv[1]]()))
