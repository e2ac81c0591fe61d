"""The CUDA twins of the target operators (kernels/cuda/targets.py) without a GPU.

`sim`: under Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1, set before numba is
imported, hence a subprocess running this file as a script, as test_cuda_roi.py does),
every operator against its CPU twin (tests/test_target_ops.py checks those against
torchvision and the paper): matching with anchors and with RoIs, exact thresholds and ties,
padding gt; the host-side sampling and hard negatives; the gathers with padding and
background RoIs; YOLO's grid (both ways of choosing the responsible predictor) and decoding.
Bad indices raise the CPU's IndexError on the device too, and the YOLO loss block and an
RPN labelling graph give the CPU's losses and outputs on device="cuda".
`ptx`: each targets kernel compiled by NVVM for the signature its `kinds` declare (the
`ptx` extra); float32 ones must hold no float64 instruction, float64 ones must.
"""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import script_results

HERE = Path(__file__).resolve()
TOL = 1e-5


@pytest.fixture(scope="module")
def results():
    return script_results(HERE, {"sim": True, "ptx": False})


def test_every_target_operator_matches_cpu_under_the_simulator(results):
    errs = results["sim"]["errors"]
    bad = {k: v for k, v in errs.items() if not v <= TOL}
    assert not bad, bad
    assert len(errs) >= 30


def test_a_bad_index_raises_on_the_device_as_on_the_cpu(results):
    assert results["sim"]["raises"] == {"match_gather": True, "mask_targets": True, "keypoint_targets": True,
                                        "yolo_targets": True}


def test_graphs_with_targets_on_the_device_match_cpu(results):
    assert results["sim"]["graphs"]["rpn"]["sampled"] == 2 * 32
    for name, r in results["sim"]["graphs"].items():
        assert r["loss"] <= TOL, (name, r)
        assert all(v <= TOL for v in r["outputs"].values()), (name, r)


def test_target_kernels_compile_to_ptx_without_float64(results):
    r = results["ptx"]
    assert not r["errors"], r["errors"]
    assert len(r["float32"]) >= 9
    f64 = {k: v for k, v in r["float32"].items() if v}
    assert not f64, f64
    assert r["float64"] and all(r["float64"].values())      # the control: doubles are seen


# ---------------------------------------------------------------- the subprocess side

def rel(got, want):
    got = got.copy_to_host() if hasattr(got, "copy_to_host") else np.asarray(got)
    want = np.asarray(want)
    if got.shape != want.shape:
        return float("inf")
    if got.dtype.kind in "iub":
        return float(not np.array_equal(got, want))
    d = np.where(got == want, 0, np.abs(got.astype(np.float64) - want))      # (-inf marks non-negatives)
    return float(d.max() / max(np.abs(want[np.isfinite(want)]).max(initial=0), 1e-6)) if d.size else 0.0


def _cases():
    """(name, cuda result, cpu result) of every operator."""
    sys.path.insert(0, str(HERE.parent))
    from test_target_ops import boxes, proposals_for, yolo_scene
    from netdsl.kernels import cpu as C, cuda as G
    d = G.to_device
    rng = np.random.default_rng(0)
    out = []
    anchors = boxes(rng, 120)
    anchors[100:] = anchors[:20]                                  # ties
    anchors[0] = [0, 0, 10, 20]                                   # IoU 0.5 with gt (0, 0, 10, 10)
    anchors[1] = [0, 0, 10, 40]                                   # IoU 0.25
    gb = np.zeros((2, 4, 4), np.float32)
    gl = np.full((2, 4), -1)
    gb[0, [0, 2, 3]], gl[0, [0, 2, 3]] = np.concatenate([[[0, 0, 10, 10]], boxes(rng, 2, 8, 56)]), [3, 1, 2]
    gb[1, 0], gl[1, 0] = boxes(rng, 1, 8, 56)[0], 2
    gb[0, 1] = [5, 5, 20, 20]                                     # padding with a box
    for tag, (fg, bg, binary) in {"rpn": (0.7, 0.3, True), "exact": (0.5, 0.25, False)}.items():
        got = G.assign_targets(d(anchors), d(gb), d(gl), fg, bg, binary)
        want = C.assign_targets(anchors, gb, gl, fg, bg, binary)
        out += [(f"assign_{tag}_labels", got[0], want[0]), (f"assign_{tag}_boxes", got[1], want[1])]
    rois = np.concatenate([np.repeat([[0.0], [1.0], [-1.0]], 40, 0), anchors], 1).astype(np.float32)
    got = G.assign_targets(d(rois), d(gb), d(gl), 0.5, 0.3, False)
    want = C.assign_targets(rois, gb, gl, 0.5, 0.3, False)
    out += [("assign_rois_labels", got[0], want[0]), ("assign_rois_boxes", got[1], want[1])]
    empty = np.full((2, 4), -1)
    out.append(("assign_no_gt", G.assign_targets(d(anchors), d(gb), d(empty), 0.7, 0.3, True)[0],
                C.assign_targets(anchors, gb, empty, 0.7, 0.3, True)[0]))
    a64 = anchors.astype(np.float64)
    out.append(("assign_f64_boxes", G.assign_targets(d(a64), d(gb.astype(np.float64)), d(gl), 0.7, 0.3, False)[1],
                C.assign_targets(a64, gb.astype(np.float64), gl, 0.7, 0.3, False)[1]))

    labels = C.assign_targets(anchors, gb, gl, 0.5, 0.3, True)[0]
    out.append(("sample_anchors", G.sample_anchors(d(labels), 16, 0.5, 7), C.sample_anchors(labels, 16, 0.5, 7)))
    props = proposals_for(rng, gb, gl, 30)
    got = G.sample_rois(d(props), d(gb), d(gl), 16, 0.25, 0.5, 0.5, 0.1, 5)
    want = C.sample_rois(props, gb, gl, 16, 0.25, 0.5, 0.5, 0.1, 5)
    out += [(f"sample_rois_{i}", g, w) for i, (g, w) in enumerate(zip(got, want))]

    logits = rng.standard_normal((2, 120, 4)).astype(np.float32) * 2
    lab = np.where(rng.random((2, 120)) < 0.1, 2, np.where(rng.random((2, 120)) < 0.1, -1, 0))
    out += [("negative_loss", G.negative_loss(d(logits), d(lab)), C.negative_loss(logits, lab)),
            ("hard_negatives", G.hard_negatives(d(logits), d(lab), 3), C.hard_negatives(logits, lab, 3)),
            ("positive", G.positive(d(lab)), C.positive(lab)),
            ("positive_f64", G.positive(d(lab), np.float64), C.positive(lab, np.float64))]

    s_rois, _, _, matched = want
    caps = rng.integers(0, 50, (2, 4, 6))
    feats = rng.standard_normal((2, 4, 2, 3)).astype(np.float32)
    masks = (rng.random((2, 4, 40, 48)) < 0.4).astype(np.float32)
    kp = np.concatenate([rng.uniform(-5, 70, (2, 4, 5, 2)), rng.integers(0, 3, (2, 4, 5, 1))], 3).astype(np.float32)
    kp[0, 0, 0, :2] = s_rois[np.argmax(matched == 0), 3:5]         # a keypoint on a RoI's edges
    kp[0, 0, 0, 2] = 1
    out += [("match_gather_i64", G.match_gather(d(caps), d(s_rois), d(matched), -1),
             C.match_gather(caps, s_rois, matched, -1)),
            ("match_gather_f32", G.match_gather(d(feats), d(s_rois), d(matched), 0),
             C.match_gather(feats, s_rois, matched, 0)),
            ("mask_targets", G.mask_targets(d(masks), d(s_rois), d(matched), 7),
             C.mask_targets(masks, s_rois, matched, 7)),
            ("keypoint_targets", G.keypoint_targets(d(kp), d(s_rois), d(matched), 14),
             C.keypoint_targets(kp, s_rois, matched, 14))]

    for seed in (0, 3):
        pred, yb, yl = yolo_scene(seed)
        if seed == 3:
            pred[..., 0:2], pred[..., 5:7] = -3, -2
        got = G.yolo_targets(d(pred), d(yb), d(yl), 2, 3, (96, 100))
        want = C.yolo_targets(pred, yb, yl, 2, 3, (96, 100))
        out += [(f"yolo_targets_{seed}_{i}", g, w) for i, (g, w) in enumerate(zip(got, want))]
    for dt in (np.float32, np.float64):
        p = pred.astype(dt)
        got, want = G.yolo_decode(d(p), 2, 3, (96, 100)), C.yolo_decode(p, 2, 3, (96, 100))
        out += [(f"yolo_decode_{np.dtype(dt).name}_{i}", g, w) for i, (g, w) in enumerate(zip(got, want))]
    return out


def _raises():
    from netdsl.kernels import cuda as G
    d = G.to_device
    rois = d(np.array([[0, 0, 0, 4, 4], [0, 1, 1, 5, 5]], np.float32))
    bad = d(np.array([0, 3]))
    out = {}
    for name, call in {"match_gather": lambda: G.match_gather(d(np.zeros((1, 3, 2), np.float32)), rois, bad, 0),
                       "mask_targets": lambda: G.mask_targets(d(np.zeros((1, 3, 8, 8), np.float32)), rois, bad, 4),
                       "keypoint_targets": lambda: G.keypoint_targets(d(np.zeros((1, 3, 2, 3), np.float32)), rois,
                                                                      bad, 4),
                       "yolo_targets": lambda: G.yolo_targets(d(np.zeros((1, 2, 2, 13), np.float32)),
                                                              d(np.ones((1, 1, 4), np.float32)), d(np.array([[4]])),
                                                              2, 3, 8)}.items():
        try:
            call()
            out[name] = False
        except IndexError:
            out[name] = True
    return out


def _graphs():
    """The YOLO loss block and the RPN labelling graph of test_target_ops.py on both targets."""
    import tempfile
    sys.path.insert(0, str(HERE.parent))
    from test_target_ops import RPN, YOLO, boxes, yolo_scene
    from netdsl.lang.elaborate import elaborate
    from netdsl.runtime.model import Model
    rng = np.random.default_rng(9)
    _, gb, gl = yolo_scene(15, S=3)
    anchors = boxes(rng, 40)
    feeds = {"yolo": {"x": rng.standard_normal((2, 6)).astype(np.float32), "gt_boxes": gb, "gt_labels": gl},
             "rpn": {"x": rng.standard_normal((2, 4)).astype(np.float32), "anchors": anchors,
                     "gt_boxes": np.stack([anchors[[3, 30]] + 1, anchors[[7, 9]] - 1]),
                     "gt_labels": np.array([[1, 1], [1, -1]])}}
    out = {}
    # small (the simulator runs a block's threads as Python threads): a 3x3 grid, 40 anchors
    for name, text, sizes in (("yolo", YOLO, {"S": 3}), ("rpn", RPN, {"K": 40})):
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / "t.net"
            p.write_text(text)
            g, _ = elaborate(str(p), None, sizes)
        cpu_m = Model(g, seed=3)
        gpu_m = Model(g, params={k: v.copy() for k, v in cpu_m.params.items()}, seed=3, device="cuda")
        tc, _, oc, _ = cpu_m.train_step(feeds[name])
        tg, _, og, _ = gpu_m.train_step(feeds[name])
        out[name] = {"loss": abs(tg - tc) / abs(tc), "outputs": {k: rel(og[k], oc[k]) for k in oc},
                     "sampled": int((oc["labels"] >= 0).sum()) if "labels" in oc else None}
    return out


def main_sim():
    return {"errors": {name: rel(got, want) for name, got, want in _cases()}, "raises": _raises(),
            "graphs": _graphs()}


def _f64(ptx):
    return sorted({line.split()[0] for line in ptx.splitlines()
                   if ".f64" in line and not line.strip().startswith(".reg")})


def main_ptx():
    from numba import cuda
    from netdsl.kernels import cuda as K
    out = {"float32": {}, "float64": {}, "errors": {}}
    for name, disp, kinds in K.REGISTRY:
        if not name.startswith("targets."):
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
