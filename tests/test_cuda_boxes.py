"""The CUDA box kernels (kernels/cuda/boxes.py) against their CPU twins (kernels/cpu/boxes.py,
themselves checked against torchvision in test_box_ops.py), as test_cuda_sim.py and
test_cuda_ptx.py check the other kernels:

- under Numba's CUDA simulator (a subprocess with NUMBA_ENABLE_CUDASIM=1): anchors,
  default boxes, box coding, IoU, nms, batched_nms, the `nms` operator and proposals on
  crowded boxes with tied scores, with a chunk size cut down so that the bitmask NMS walks
  several chunks (candidates kept by an earlier chunk suppressing later ones, and max_out
  reached mid-chunk), and a graph of these operators through Model on the CUDA target;
- compiled to PTX by NVVM (a subprocess without the simulator): every box kernel for the
  float32 signature it is launched with, and no float64 instruction in it.

Run as a script (`python tests/test_cuda_boxes.py sim|ptx|device`) to print the findings
as JSON; `device` runs the comparisons on a real GPU.
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


@pytest.fixture(scope="module")
def sim(results):
    return results["sim"]


@pytest.fixture(scope="module")
def ptx(results):
    return results["ptx"]


def test_every_box_kernel_matches_cpu(sim):
    errs = sim["errors"]
    bad = {k: v for k, v in errs.items() if not v <= TOL}
    assert not bad, bad
    assert len(errs) >= 40


def test_nms_walks_several_chunks(sim):
    """The cases run with CH = 128 candidates a chunk; these had several chunks, and kept
    boxes from all of them."""
    assert sim["chunks"]["nms"] > 2 and sim["chunks"]["kept_past_first"] > 0


def test_the_comparison_sees_a_wrong_result(sim):
    assert sim["control"] > 1e-2 and sim["control_ids"] == 1.0


def test_box_kernels_compile_to_ptx_without_float64(ptx):
    assert not ptx["errors"], ptx["errors"]
    assert len(ptx["float32"]) >= 15
    f64 = {k: v for k, v in ptx["float32"].items() if v}
    assert not f64, f64
    assert ptx["float64_control"], "the float64 signature of boxes._mask shows no double arithmetic"


# ---------------------------------------------------------------- the subprocess side

def rel(got, want):
    got = got.copy_to_host() if hasattr(got, "copy_to_host") else np.asarray(got)
    want = np.asarray(want)
    assert got.shape == want.shape, (got.shape, want.shape)
    if got.dtype.kind in "iub" or want.dtype.kind in "iub":
        return float(not np.array_equal(got, want))
    d = np.abs(got.astype(np.float64) - want)
    return float(d.max() / max(np.abs(want).max(), 1e-6)) if d.size else 0.0


def boxes_on_grid(rng, shape, span=40.0, size=(4.0, 25.0), step=0.5):
    """Corners on multiples of step: the IoUs are exact on both sides, and so the NMS."""
    xy = rng.uniform(0, span, shape + (2,))
    wh = rng.uniform(*size, shape + (2,))
    return np.round(np.concatenate([xy, xy + wh], -1) / step) * step


def _cases():
    from netdsl.kernels import cpu as C, cuda as G
    from netdsl.kernels.cuda import boxes as GB
    d = G.to_device
    rng = np.random.default_rng(0)
    out = []
    # anchors and default boxes
    for dt in (np.float32, np.float64):
        out.append(("anchors", G.anchors((3, 5), (32.0, 64.0, 90.0), (0.5, 1.0, 2.0), 8, dt),
                    C.anchors((3, 5), (32.0, 64.0, 90.0), (0.5, 1.0, 2.0), 8, dt)))
        grids, ratios = [(5, 5), (3, 3), (1, 1)], [[2], [2, 3], [2]]
        out.append(("default_boxes", G.default_boxes(grids, ratios, 0.2, 0.9, (60, 60), dtype=dt),
                    C.default_boxes(grids, ratios, 0.2, 0.9, (60, 60), dtype=dt)))
    # box coding: per image [N, K, 4], RoIs [K, 5] with class-specific deltas [K, C, 4], empty boxes
    for dt in (np.float32, np.float64):
        a = boxes_on_grid(rng, (30,), step=0.25).astype(dt)
        b = boxes_on_grid(rng, (2, 30), step=0.25).astype(dt)
        b[0, :3] = 0
        w = (10.0, 10.0, 5.0, 5.0)
        out.append((f"encode_{np.dtype(dt).name}", G.box_encode(d(b), d(a), w), C.box_encode(b, a, w)))
        dl = (rng.standard_normal((2, 30, 4)) * 2).astype(dt)
        dl[0, 0, 2:] = 60.0
        out.append((f"decode_{np.dtype(dt).name}", G.box_decode(d(dl), d(a), w), C.box_decode(dl, a, w)))
        rois = np.concatenate([rng.integers(-1, 2, (30, 1)), a], 1).astype(dt)
        cd = rng.standard_normal((30, 3, 4)).astype(dt)
        out.append((f"decode_roi_classes_{np.dtype(dt).name}", G.box_decode(d(cd), d(rois), w),
                    C.box_decode(cd, rois, w)))
        out.append((f"encode_rois_{np.dtype(dt).name}", G.box_encode(d(b[1]), d(rois), w), C.box_encode(b[1], rois, w)))
        out.append((f"iou_{np.dtype(dt).name}", G.box_iou(d(a), d(b)), C.box_iou(a, b)))
        out.append((f"iou_flat_{np.dtype(dt).name}", G.box_iou(d(b[0]), d(a)), C.box_iou(b[0], a)))
    # nms and batched_nms: crowded boxes, duplicates, tied scores
    for seed, dt in ((1, np.float32), (2, np.float64)):
        r = np.random.default_rng(seed)
        bx = boxes_on_grid(r, (90,)).astype(dt)
        bx[45:50] = bx[:5]
        sc = np.round(r.random(90), 1).astype(dt)
        idx = r.integers(0, 3, 90)
        for thr in (0.0, 0.3, 0.7):
            out.append((f"nms_{seed}_{thr}", G.nms(d(bx), d(sc), thr), C.nms(bx, sc, thr)))
            out.append((f"batched_nms_{seed}_{thr}", G.batched_nms(d(bx), d(sc), d(idx), thr),
                        C.batched_nms(bx, sc, idx, thr)))
    # the nms operator: shared and class-specific boxes, background, max_out, empty boxes, an empty image
    N, K, Cn = 3, 40, 4
    for shared in (True, False):
        bx = boxes_on_grid(rng, (N, K) if shared else (N, K, Cn)).astype(np.float32)
        bx[1, :4] = 0
        sc = np.round(rng.random((N, K, Cn)), 1).astype(np.float32)
        sc[2] = 0
        for bg, M in ((-1, 25), (0, 8), (3, 200)):
            g, c = G.detect_nms(d(bx), d(sc), 0.45, M, 0.05, bg), C.detect_nms(bx, sc, 0.45, M, 0.05, bg)
            out += [(f"detect_{shared}_{bg}_{M}_{k}", g[i], c[i]) for i, k in enumerate(("boxes", "scores", "labels"))]
    sc1 = np.round(rng.random((2, K)), 1).astype(np.float32)
    bx1 = boxes_on_grid(rng, (2, K)).astype(np.float32)
    g, c = G.detect_nms(d(bx1), d(sc1), 0.5, 30, 0.2), C.detect_nms(bx1, sc1, 0.5, 30, 0.2)
    out += [(f"detect_one_class_{i}", g[i], c[i]) for i in range(3)]
    # proposals: [N, K] logits and [N, K, 2] pairs, clipping, min_size, pre_nms below the survivors
    a = boxes_on_grid(rng, (60,), span=70.0).astype(np.float32)
    a[:5] -= 20.0                                               # partly off the image
    dl = np.zeros((2, 60, 4), np.float32)
    dl[..., :2] = np.round(rng.standard_normal((2, 60, 2)) * 4) / 16     # dyadic shifts: exact decoding
    obj = np.round(rng.standard_normal((2, 60, 2)), 1).astype(np.float32)
    for pair, pre, post, img, ms in ((True, 30, 12, (64, 80), 3.0), (False, 60, 40, (0, 0), 0.0),
                                     (True, 5, 8, (64, 80), 0.0)):
        s = obj if pair else obj[..., 1].copy()
        out.append((f"proposals_{pair}_{pre}_{post}", G.proposals(d(s), d(dl), d(a), pre, post, 0.6, ms, img),
                    C.proposals(s, dl, a, pre, post, 0.6, ms, img)))
    dn = (rng.standard_normal((2, 60, 4)) * 0.3).astype(np.float32)     # general deltas (exp): to rounding
    out.append(("proposals_general", G.proposals(d(obj), d(dn), d(a), 40, 10, 0.7, 1.0, (64, 80)),
                C.proposals(obj, dn, a, 40, 10, 0.7, 1.0, (64, 80))))
    z = np.concatenate([bx1, np.zeros((2, 3, 4), np.float32)], 1)
    out.append(("to_rois", G.to_rois(d(z)), C.to_rois(z)))
    return out, GB


def _chunked_cases(GB):
    """The same kernels with 128 candidates a chunk: several chunks, the later ones pruned by
    the boxes kept before them, max_out reached mid-chunk."""
    from netdsl.kernels import cpu as C, cuda as G
    d = G.to_device
    GB.CH = 128
    rng = np.random.default_rng(9)
    out = []
    bx = boxes_on_grid(rng, (420,), span=120.0, size=(4.0, 30.0)).astype(np.float32)
    sc = np.round(rng.random(420), 2).astype(np.float32)
    idx = rng.integers(0, 3, 420)
    keep = C.nms(bx, sc, 0.5)
    out.append(("chunked_nms", G.nms(d(bx), d(sc), 0.5), keep))
    out.append(("chunked_batched_nms", G.batched_nms(d(bx), d(sc), d(idx), 0.5), C.batched_nms(bx, sc, idx, 0.5)))
    b3, s3 = bx.reshape(2, 210, 4), np.round(rng.random((2, 210, 2)), 2).astype(np.float32)
    for M in (150, 7):
        g, c = G.detect_nms(d(b3), d(s3), 0.5, M, 0.05, -1), C.detect_nms(b3, s3, 0.5, M, 0.05, -1)
        out += [(f"chunked_detect_{M}_{i}", g[i], c[i]) for i in range(3)]
    a = bx[:300]
    dl = np.zeros((1, 300, 4), np.float32)
    obj = np.round(rng.standard_normal((1, 300)), 2).astype(np.float32)
    out.append(("chunked_proposals", G.proposals(d(obj), d(dl), d(a), 280, 200, 0.5, 0.0, (0, 0)),
                C.proposals(obj, dl, a, 280, 200, 0.5, 0.0, (0, 0))))
    order = np.argsort(-sc, kind="stable")
    position = {int(i): p for p, i in enumerate(order)}
    chunks = {"nms": -(-len(bx) // GB.CH), "kept_past_first": sum(position[int(i)] >= GB.CH for i in keep)}
    return out, chunks


GRAPH = """
network boxes_net() {
  input f: f32[2, 4, 3, 4]
  input scores: f32[2, 72, 2]
  input deltas: f32[2, 72, 4]
  anchors = anchors(f, sizes=[16.0, 32.0], ratios=[0.5, 1.0, 2.0], stride=16)
  rois = proposals(scores, deltas, anchors, pre_nms=40, post_nms=10, iou=0.7, min_size=2.0, image=[48, 64])
  boxes = box_decode(deltas, anchors)
  targets = box_encode(boxes, anchors)
  overlap = iou(anchors, boxes)
  det_boxes, det_scores, det_labels = nms(boxes, scores, iou=0.5, max_out=12, score_thresh=0.3, background=0)
  det_rois = to_rois(det_boxes)
  output anchors, rois, boxes, targets, overlap, det_boxes, det_scores, det_labels, det_rois
}
"""


def _graph_cases(tmp):
    """The box operators through Model on the CUDA target against the CPU target."""
    sys.path.insert(0, str(HERE.parent))
    from helpers import compile_text
    from netdsl.runtime.model import Model
    g = compile_text(tmp, GRAPH)
    rng = np.random.default_rng(3)
    feeds = {"f": rng.standard_normal((2, 4, 3, 4)).astype(np.float32),
             "scores": np.round(rng.random((2, 72, 2)), 2).astype(np.float32),
             "deltas": (np.round(rng.standard_normal((2, 72, 4)) * 4) / 16).astype(np.float32)}
    feeds["deltas"][..., 2:] = 0
    cpu, gpu = Model(g).infer(feeds), Model(g, device="cuda").infer(feeds)
    return [(f"graph_{k}", gpu[k], cpu[k]) for k in cpu]


def main_sim():
    import tempfile
    from netdsl.kernels.cuda import boxes as GB
    cases, _ = _cases()
    chunked, chunks = _chunked_cases(GB)
    GB.CH = GB.NB * GB.NB
    with tempfile.TemporaryDirectory() as tmp:
        cases += chunked + _graph_cases(tmp)
    errors = {name: rel(got, want) for name, got, want in cases}
    nms = next(c for n, g_, c in cases if n == "chunked_nms")
    return {"errors": errors, "chunks": chunks,
            "control": rel(np.asarray(cases[0][2]) * 1.05 + 1, cases[0][2]),
            "control_ids": rel(nms[::-1].copy(), nms)}


def main_ptx():
    from numba import cuda
    from netdsl.kernels import cuda as K
    out = {"float32": {}, "errors": {}}
    ptx_of = lambda fn, kinds, dt: cuda.compile_ptx(fn.py_func, K.signature(kinds, dt), cc=(8, 0))[0]
    f64 = lambda ptx: sorted({line.split()[0] for line in ptx.splitlines()
                              if ".f64" in line and not line.strip().startswith(".reg")})
    for name, disp, kinds in K.REGISTRY:
        if not name.startswith("boxes."):
            continue
        try:
            out["float32"][name] = f64(ptx_of(disp, kinds, np.float32))
        except Exception as e:      # report every failure, not just the first
            out["errors"][name] = f"{type(e).__name__}: {str(e)[:400]}"
    mask = next((d, k) for n, d, k in K.REGISTRY if n == "boxes._mask")
    out["float64_control"] = bool(f64(ptx_of(*mask, np.float64)))
    return out


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else "sim"
    print(json.dumps(main_ptx() if mode == "ptx" else main_sim()))
