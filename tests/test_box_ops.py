"""The box operators on the CPU kernels (kernels/cpu/boxes.py), float32 and float64:

- anchors against torchvision's AnchorGenerator, default boxes against its
  DefaultBoxGenerator (SSD300: 8732), to the last bit (tests/tvref.py);
- box_encode / box_decode against its BoxCoder (weights, the dw/dh clamp, class-specific
  deltas against RoIs); iou against torchvision.ops.boxes.box_iou;
- nms, batched_nms and the `nms` operator (per image, per class, max_out, padding) against
  a float64 greedy reference written here with torchvision's C++ semantics (a stable sort
  by score, suppress IoU > threshold) on random boxes with many overlaps and tied scores;
- proposals on a hand-checked case (clipping, min size, pre_nms, NMS, padding);
- a graph with anchors, an RPN head, proposals, box coding, iou, nms and to_rois through
  netdsl.runtime.model.Model, inference and a training step.
(The CUDA twins are checked against these kernels in test_cuda_boxes.py.)"""
import math

import numpy as np
import pytest
import torch

import tvref
from helpers import ROOT, compile_text
from netdsl.errors import NetdslError
from netdsl.kernels import cpu as C
from netdsl.runtime.model import Model

TV = tvref.load()
needs_tv = pytest.mark.skipif(TV is None, reason=tvref.SKIP_REASON)
DTYPES = pytest.mark.parametrize("dt", [np.float32, np.float64], ids=["f32", "f64"])
TORCH = {np.float32: torch.float32, np.float64: torch.float64}
SSD_RATIOS = [[2], [2, 3], [2, 3], [2, 3], [2], [2]]
SSD_GRIDS = [(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)]


def image_list(N, H, W, dt=np.float32):
    from torchvision.models.detection.image_list import ImageList
    return ImageList(torch.zeros(N, 3, H, W, dtype=TORCH[dt]), [(H, W)] * N)


def random_boxes(rng, shape, span=60.0, size=(1.0, 30.0), grid=None):
    """Boxes [..., 4]; with grid, corners on multiples of it (exact arithmetic in float32)."""
    xy = rng.uniform(0, span, shape + (2,))
    wh = rng.uniform(*size, shape + (2,))
    b = np.concatenate([xy, xy + wh], -1)
    return np.round(b / grid) * grid if grid else b


# ---- anchors and default boxes

@needs_tv
@DTYPES
@pytest.mark.parametrize("sizes,ratios,stride,hw", [
    ((128.0, 256.0, 512.0), (0.5, 1.0, 2.0), 16, (4, 6)),        # Faster R-CNN's 9
    ((32.0, 45.0), (0.25, 1.0, 3.0), 8, (5, 3)),                # rounding of uneven sides
    ((16.0,), (1.0,), 4, (1, 1))])
def test_anchors_match_anchor_generator(sizes, ratios, stride, hw, dt):
    H, W = hw
    gen = TV.anchor_utils.AnchorGenerator((sizes,), (ratios,))
    want = gen(image_list(1, H * stride, W * stride, dt), [torch.zeros(1, 2, H, W, dtype=TORCH[dt])])[0]
    got = C.anchors(hw, sizes, ratios, stride, dt)
    assert got.dtype == dt and got.shape == (H * W * len(sizes) * len(ratios), 4)
    np.testing.assert_array_equal(got, want.numpy())


@needs_tv
@DTYPES
def test_ssd300_default_boxes_match_default_box_generator(dt):
    gen = TV.anchor_utils.DefaultBoxGenerator(SSD_RATIOS, min_ratio=0.2, max_ratio=0.9)
    maps = [torch.zeros(1, 1, *g, dtype=TORCH[dt]) for g in SSD_GRIDS]
    want = gen(image_list(1, 300, 300, dt), maps)[0].numpy()
    got = C.default_boxes(SSD_GRIDS, SSD_RATIOS, 0.2, 0.9, image=(300, 300), dtype=dt)
    assert got.shape == (8732, 4) and got.dtype == dt
    np.testing.assert_array_equal(got, want)
    # without an image size: the same boxes as fractions of the image
    frac = C.default_boxes(SSD_GRIDS, SSD_RATIOS, 0.2, 0.9, dtype=dt)
    np.testing.assert_allclose(frac * 300, want, rtol=1e-6, atol=1e-4)


@needs_tv
def test_default_boxes_with_scales_and_steps_match_torchvision_ssd300():
    """torchvision's ssd300_vgg16 configuration: its own scales and steps, a 300x400 image."""
    scales = [0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05]
    steps = [8, 16, 32, 64, 100, 300]
    gen = TV.anchor_utils.DefaultBoxGenerator(SSD_RATIOS, scales=scales, steps=steps)
    grids = [(38, 50), (19, 25), (10, 13), (5, 7), (3, 4), (1, 2)]
    want = gen(image_list(1, 300, 400), [torch.zeros(1, 1, *g) for g in grids])[0].numpy()
    got = C.default_boxes(grids, SSD_RATIOS, 0.2, 0.9, image=(300, 400), scales=scales, steps=steps)
    np.testing.assert_array_equal(got, want)


def test_ssd300_spec_declares_8732_default_boxes():
    from helpers import compile_spec
    g = compile_spec("det/ssd300.net")
    (n,) = [n for n in g.nodes if n.op == "default_boxes"]
    assert n.outputs[0].shape == (8732, 4)
    assert [tuple(v.shape[2:]) for v in n.inputs] == SSD_GRIDS


# ---- box coding and IoU

WEIGHTS = [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)]
TOL = {np.float32: 2e-6, np.float64: 1e-14}


def rel(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


@needs_tv
@DTYPES
@pytest.mark.parametrize("weights", WEIGHTS, ids=["w1", "w10_5"])
def test_box_coder_matches_torchvision(weights, dt):
    rng = np.random.default_rng(0)
    anchors = random_boxes(rng, (40,)).astype(dt)
    boxes = random_boxes(rng, (3, 40)).astype(dt)              # [N, K, 4] against K anchors
    coder = TV.det_utils.BoxCoder(weights)
    t = lambda a: torch.tensor(a)
    want = np.stack([coder.encode_single(t(b), t(anchors)).numpy() for b in boxes])
    got = C.box_encode(boxes, anchors, weights)
    assert got.dtype == dt and rel(got, want) < 4 * TOL[dt]
    # decode: deltas wide enough to reach the clamp of dw, dh at log(1000/16)
    deltas = (rng.standard_normal((3, 40, 4)) * 3).astype(dt)
    deltas[0, :5, 2:] = 50.0
    want = np.stack([coder.decode_single(t(d), t(anchors)).numpy() for d in deltas])
    got = C.box_decode(deltas, anchors, weights)
    assert got.dtype == dt and rel(got, want) < 4 * TOL[dt]
    clamped = math.exp(math.log(1000.0 / 16))
    w = anchors[:5, 2] - anchors[:5, 0]
    np.testing.assert_allclose(got[0, :5, 2] - got[0, :5, 0], clamped * w, rtol=1e-5)
    # round trip
    assert rel(C.box_decode(C.box_encode(boxes, anchors, weights), anchors, weights), boxes) < 10 * TOL[dt]


@needs_tv
@DTYPES
def test_class_specific_deltas_decode_against_their_roi(dt):
    """[R, classes, 4] deltas with RoIs [R, 5] (the detect block): each class's box from its
    RoI, the index column skipped (torchvision decodes [R, classes*4] codes alike)."""
    rng = np.random.default_rng(1)
    R, classes = 7, 3
    rois = np.concatenate([rng.integers(0, 2, (R, 1)), random_boxes(rng, (R,))], 1).astype(dt)
    deltas = rng.standard_normal((R, classes, 4)).astype(dt)
    coder = TV.det_utils.BoxCoder((10.0, 10.0, 5.0, 5.0))
    want = coder.decode_single(torch.tensor(deltas.reshape(R, -1)), torch.tensor(rois[:, 1:])).numpy()
    got = C.box_decode(deltas, rois, (10.0, 10.0, 5.0, 5.0))
    assert got.shape == (R, classes, 4) and rel(got.reshape(R, -1), want) < 4 * TOL[dt]
    matched = random_boxes(rng, (R,)).astype(dt)                  # [R, 4] targets against RoIs
    want = coder.encode_single(torch.tensor(matched), torch.tensor(rois[:, 1:])).numpy()
    assert rel(C.box_encode(matched, rois, (10.0, 10.0, 5.0, 5.0)), want) < 4 * TOL[dt]


def test_empty_boxes_encode_to_zero_deltas_and_decode_to_empty_boxes():
    """Padding (a zero gt box, a padding RoI) gives finite zeros, never log(0)."""
    anchors = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 0, 0]], np.float32)
    boxes = np.array([[0, 0, 0, 0], [2, 2, 2, 8], [1, 1, 5, 5]], np.float32)
    np.testing.assert_array_equal(C.box_encode(boxes, anchors), np.zeros((3, 4)))
    rois = np.array([[-1, 0, 0, 0, 0]], np.float32)
    d = C.box_decode(np.ones((1, 3, 4), np.float32), rois)
    np.testing.assert_array_equal(d, np.zeros((1, 3, 4)))


@needs_tv
@DTYPES
def test_iou_matches_box_iou(dt):
    rng = np.random.default_rng(2)
    a = random_boxes(rng, (13,)).astype(dt)
    b = random_boxes(rng, (2, 17)).astype(dt)
    want = np.stack([TV.boxes.box_iou(torch.tensor(a), torch.tensor(x)).numpy() for x in b])
    got = C.box_iou(a, b)
    assert got.shape == (2, 13, 17) and got.dtype == dt
    assert np.abs(got - want).max() <= 2 * np.finfo(dt).eps
    np.testing.assert_array_equal(C.box_iou(a, b[0]), got[0])
    # an empty union (two empty boxes) is 0 where torchvision divides 0 by 0
    z = np.zeros((1, 4), dt)
    assert C.box_iou(z, z)[0, 0] == 0 and np.isnan(TV.boxes.box_iou(torch.tensor(z), torch.tensor(z)).numpy()[0, 0])


# ---- NMS against a float64 greedy reference (torchvision's C++ semantics)

def ref_nms(boxes, scores, thr):
    """torchvision/csrc/ops/cpu/nms_kernel.cpp in float64: a stable sort by decreasing
    score, then each kept box suppresses the later ones with IoU > thr."""
    b = np.asarray(boxes, np.float64)
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    gone = np.zeros(len(b), bool)
    keep = []
    for a, i in enumerate(order):
        if gone[i]:
            continue
        keep.append(i)
        for j in order[a + 1:]:
            if gone[j]:
                continue
            w = max(0.0, min(b[i, 2], b[j, 2]) - max(b[i, 0], b[j, 0]))
            h = max(0.0, min(b[i, 3], b[j, 3]) - max(b[i, 1], b[j, 1]))
            inter = w * h
            if inter / (area[i] + area[j] - inter) > thr:
                gone[j] = True
    return np.array(keep, np.int64)


def ref_batched_nms(boxes, scores, idxs, thr):
    """NMS per class, the kept of all classes by decreasing score, ties by index."""
    keep = np.concatenate([np.flatnonzero(idxs == c)[ref_nms(boxes[idxs == c], scores[idxs == c], thr)]
                           for c in np.unique(idxs)] + [np.zeros(0, np.int64)])
    return keep[np.lexsort((keep, -np.asarray(scores, np.float64)[keep]))]


def crowded(seed, K, dt, grid=None):
    """K boxes in a small field (many overlaps, duplicates among them) with scores on a
    coarse grid (many ties)."""
    rng = np.random.default_rng(seed)
    b = random_boxes(rng, (K,), span=40.0, size=(4.0, 25.0), grid=grid)
    b[K // 2:K // 2 + 5] = b[:5]                                    # exact duplicates
    s = np.round(rng.random(K), 1)
    return b.astype(dt), s.astype(dt), rng


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("thr", [0.0, 0.3, 0.5, 0.7])
def test_nms_matches_the_greedy_reference(seed, thr):
    b, s, _ = crowded(seed, 120, np.float64)
    np.testing.assert_array_equal(C.nms(b, s, thr), ref_nms(b, s, thr))
    # float32 with corners on a half-pixel grid: both sides compute the same IoUs
    b, s, _ = crowded(seed, 120, np.float32, grid=0.5)
    keep = C.nms(b, s, thr)
    assert keep.dtype == np.int64
    np.testing.assert_array_equal(keep, ref_nms(b, s, thr))


@needs_tv
@pytest.mark.parametrize("seed", range(4))
def test_batched_nms_matches_per_class_reference(seed):
    b, s, rng = crowded(seed, 150, np.float64)
    idxs = rng.integers(0, 4, len(b))
    want = ref_batched_nms(b, s, idxs, 0.5)
    got = C.batched_nms(b, s, idxs, 0.5)
    np.testing.assert_array_equal(got, want)
    # torchvision's own batched_nms (per-class loop and coordinate trick) with the reference
    # standing in for its C++ nms: the same set, in the same score order
    ops = TV.boxes
    saved = ops.nms
    ops.nms = lambda bb, ss, t: torch.from_numpy(ref_nms(bb.numpy(), ss.numpy(), t))
    try:
        for fn in (ops._batched_nms_vanilla, ops._batched_nms_coordinate_trick):
            tv = fn(torch.tensor(b), torch.tensor(s), torch.tensor(idxs), 0.5).numpy()
            assert set(tv) == set(got) and np.array_equal(s[tv], s[got])
    finally:
        ops.nms = saved


def ref_detect(boxes, scores, thr, M, sthr, bg):
    """The `nms` operator for one image: boxes [K, 4] or [K, C, 4], scores [K, C]."""
    K, Cn = scores.shape
    bx = boxes if boxes.ndim == 3 else np.repeat(boxes[:, None], Cn, 1)
    flat_b, flat_s = bx.reshape(-1, 4), scores.reshape(-1)
    q = np.arange(K * Cn)
    ok = (q % Cn != bg) & (flat_s > sthr) & (flat_b[:, 2] > flat_b[:, 0]) & (flat_b[:, 3] > flat_b[:, 1])
    q = q[ok]
    kept = q[ref_batched_nms(flat_b[q], flat_s[q], q % Cn, thr)][:M]
    out_b, out_s, out_l = np.zeros((M, 4)), np.zeros(M), np.full(M, -1)
    out_b[:len(kept)], out_s[:len(kept)], out_l[:len(kept)] = flat_b[kept], flat_s[kept], kept % Cn
    return out_b, out_s, out_l


@pytest.mark.parametrize("shared", [True, False], ids=["shared_boxes", "class_boxes"])
@pytest.mark.parametrize("bg,M", [(-1, 40), (0, 10), (2, 300)])
def test_nms_operator_per_image_and_class(shared, bg, M):
    rng = np.random.default_rng(5)
    N, K, Cn = 3, 60, 4
    boxes = random_boxes(rng, (N, K) if shared else (N, K, Cn), span=40.0, size=(4.0, 25.0))
    boxes[1, :3] = 0.0                                       # empty boxes (padding) never reported
    scores = np.round(rng.random((N, K, Cn)), 1)
    scores[2] = 0.0                                          # an image with nothing above the threshold
    ob, os, ol = C.detect_nms(boxes, scores, 0.45, M, 0.05, bg)
    assert ob.shape == (N, M, 4) and os.shape == (N, M) and ol.dtype == np.int64
    for n in range(N):
        wb, ws, wl = ref_detect(boxes[n], scores[n], 0.45, M, 0.05, bg)
        np.testing.assert_array_equal(ol[n], wl)
        np.testing.assert_array_equal(os[n], ws)
        np.testing.assert_array_equal(ob[n], wb)
    assert (ol[2] == -1).all() and (ob[2] == 0).all()
    assert not (ol == bg).any() or bg == -1


def test_nms_operator_with_one_score_per_box():
    """scores [N, K]: one class, labelled 0."""
    b, s, _ = crowded(3, 50, np.float64)
    ob, os, ol = C.detect_nms(b[None], s[None], 0.5, 100, 0.0)
    keep = ref_nms(b[s > 0], s[s > 0], 0.5)
    k = len(keep)
    np.testing.assert_array_equal(ob[0, :k], b[s > 0][keep])
    assert (ol[0, :k] == 0).all() and (ol[0, k:] == -1).all() and (os[0, k:] == 0).all()


# ---- proposals, checked by hand

# Anchors of one image (100x100) and their objectness: the deltas are 0 but for anchor 5.
ANCHORS = np.array([[10, 10, 50, 50],      # 0: score 5, kept first
                    [12, 12, 52, 52],      # 1: score 4, IoU 0.82 with 0: suppressed
                    [60, 60, 120, 120],    # 2: score 3, clipped to (60, 60, 100, 100): kept
                    [0, 0, 5, 5],          # 3: score 6, a side of 5 < min_size 8: dropped
                    [-30, -30, -10, -10],  # 4: score 7, clipped to an empty box: dropped
                    [20, 60, 40, 90],      # 5: score 2, moved by dx = 0.5 (10 px): kept
                    [70, 10, 90, 30]],     # 6: score 1, past pre_nms = 4: dropped
                   np.float64)
OBJ = np.array([5.0, 4.0, 3.0, 6.0, 7.0, 2.0, 1.0])
EXPECT = [[10, 10, 50, 50], [60, 60, 100, 100], [30, 60, 50, 90]]


@DTYPES
@pytest.mark.parametrize("pair", [False, True], ids=["logit", "bg_obj"])
def test_proposals_hand_checked(pair, dt):
    deltas = np.zeros((2, 7, 4))
    deltas[:, 5, 0] = 0.5
    obj = np.stack([OBJ, -OBJ])           # image 1: the order reversed
    scores = np.stack([np.zeros_like(obj), obj], -1) if pair else obj
    rois = C.proposals(scores.astype(dt), deltas.astype(dt), ANCHORS.astype(dt), pre_nms=4, post_nms=5, iou=0.7,
                       min_size=8.0, image=(100, 100))
    assert rois.shape == (10, 5) and rois.dtype == dt
    np.testing.assert_array_equal(rois[:3], [[0] + b for b in EXPECT])
    np.testing.assert_array_equal(rois[3:5], [[-1, 0, 0, 0, 0]] * 2)
    # image 1 ranks 6, 5, 2, 1 (0, 3 and 4 are past pre_nms or dropped): 6, 5, 2 and 1 kept
    np.testing.assert_array_equal(rois[5:9], [[1, 70, 10, 90, 30], [1, 30, 60, 50, 90], [1, 60, 60, 100, 100],
                                              [1, 12, 12, 52, 52]])
    np.testing.assert_array_equal(rois[9], [-1, 0, 0, 0, 0])


def test_proposals_without_clipping_keep_boxes_off_the_image():
    deltas = np.zeros((1, 7, 4))
    rois = C.proposals(OBJ[None], deltas, ANCHORS, pre_nms=7, post_nms=7, iou=0.7)
    # no clipping, min_size 0: anchor 4 (score 7) and 3 now lead; 1 is still suppressed by 0
    np.testing.assert_array_equal(rois[:, 1:][rois[:, 0] == 0], ANCHORS[[4, 3, 0, 2, 5, 6]])
    assert (rois[6] == [-1, 0, 0, 0, 0]).all()


def test_to_rois_marks_empty_boxes_as_padding():
    b = np.zeros((2, 3, 4), np.float32)
    b[0, 0] = [1, 2, 3, 4]
    b[1, 1] = [5, 6, 7, 8]
    b[1, 2] = [5, 6, 5, 8]           # empty (x2 = x1)
    np.testing.assert_array_equal(C.to_rois(b), [[0, 1, 2, 3, 4], [-1, 0, 0, 0, 0], [-1, 0, 0, 0, 0],
                                                 [-1, 0, 0, 0, 0], [1, 5, 6, 7, 8], [-1, 0, 0, 0, 0]])


# ---- through a graph

GRAPH = f"""
import "{ROOT / 'specs' / 'lib' / 'det.net'}"

network rpn_net() {{
  input image: f32[2, 3, 32, 48]
  input labels: i64[2, 36]
  f = image -> conv(8, k=16, s=16, name="trunk") -> relu         # stride 16: 2 x 3 cells
  anchors = anchors(f, sizes=[16.0, 32.0], ratios=[0.5, 1.0, 2.0], stride=16)
  scores, deltas = rpn(f, 6, mid=8, name="rpn")                  # faster_rcnn.net's RPN head
  rois = proposals(scores, deltas, anchors, pre_nms=20, post_nms=8, iou=0.7, min_size=2.0,
                   image=[image.H, image.W])
  boxes = box_decode(deltas, anchors)
  targets = box_encode(boxes, anchors)
  overlap = iou(anchors, boxes)
  probs = softmax(scores)
  det_boxes, det_scores, det_labels = nms(boxes, probs, iou=0.5, max_out=12, score_thresh=0.3, background=0)
  det_rois = to_rois(det_boxes)
  output scores, deltas, anchors, rois, boxes, targets, overlap, probs, det_boxes, det_scores, det_labels,
         det_rois
  loss objectness = cross_entropy(scores, labels)
}}
"""


@needs_tv
@DTYPES
def test_rpn_graph_runs_through_model(tmp_path, dt):
    g = compile_text(tmp_path, GRAPH)
    rng = np.random.default_rng(7)
    feeds = {"image": rng.standard_normal((2, 3, 32, 48)).astype(dt), "labels": rng.integers(0, 2, (2, 36))}
    m = Model(g, seed=1, dtype=dt)
    out = m.infer(feeds)
    gen = TV.anchor_utils.AnchorGenerator(((16.0, 32.0),), ((0.5, 1.0, 2.0),))
    want = gen(image_list(1, 32, 48, dt), [torch.zeros(1, 8, 2, 3, dtype=TORCH[dt])])[0].numpy()
    np.testing.assert_array_equal(out["anchors"], want)
    sc, de, an = out["scores"], out["deltas"], out["anchors"]
    assert sc.dtype == dt and sc.shape == (2, 36, 2) and out["rois"].shape == (16, 5)
    np.testing.assert_array_equal(out["rois"], C.proposals(sc, de, an, 20, 8, 0.7, 2.0, (32, 48)))
    np.testing.assert_array_equal(out["boxes"], C.box_decode(de, an))
    np.testing.assert_array_equal(out["targets"], C.box_encode(out["boxes"], an))
    assert rel(out["targets"], np.minimum(de, math.log(1000 / 16))) < 1e-4
    np.testing.assert_array_equal(out["overlap"], C.box_iou(an, out["boxes"]))
    ob, os, ol = C.detect_nms(out["boxes"], out["probs"], 0.5, 12, 0.3, 0)
    for got, want in zip((out["det_boxes"], out["det_scores"], out["det_labels"]), (ob, os, ol)):
        np.testing.assert_array_equal(got, want)
    assert (ol >= 0).any()
    np.testing.assert_array_equal(out["det_rois"], C.to_rois(out["det_boxes"]))
    valid = out["rois"][:, 0] >= 0
    assert valid.any() and (out["rois"][~valid] == [-1, 0, 0, 0, 0]).all()
    # training: the loss reaches the trunk and the RPN head; nothing flows through the boxes
    total, _, _, grads = m.train_step(feeds)
    assert np.isfinite(total)
    assert {"trunk.weight", "rpn.conv.weight", "rpn.cls_logits.weight"} <= set(grads)
    assert np.abs(grads["trunk.weight"]).sum() > 0


def test_nms_background_must_be_a_class(tmp_path):
    with pytest.raises(NetdslError, match=r"background=0 leaves no class of the scores \[N, 5\] to report") as e:
        compile_text(tmp_path, """network m() {
  input boxes: f32[N, 5, 4]
  input scores: f32[N, 5]
  b, s, l = nms(boxes, scores, background=0)
  output b, s, l
}""")
    assert e.value.pos.line == 4


def test_default_boxes_steps_need_the_image(tmp_path):
    with pytest.raises(NetdslError, match="steps must hold one number per map"):
        compile_text(tmp_path, """network m() {
  input x: f32[N, 3, 4, 4]
  output d = default_boxes([x], ratios=[[2]], steps=[8.0])
}""")


@needs_tv
def test_default_boxes_run_through_model(tmp_path):
    g = compile_text(tmp_path, """network priors() {
  input image: f32[N, 3, 64, 64]
  a = image -> conv(4, k=8, s=8, name="a")
  b = a -> conv(4, k=2, s=2, name="b")
  output d = default_boxes([a, b], ratios=[[2], [2, 3]], smin=0.3, smax=0.8, image=[image.H, image.W])
}""")
    d = Model(g, seed=0).infer({"image": np.zeros((2, 3, 64, 64), np.float32)})["d"]
    gen = TV.anchor_utils.DefaultBoxGenerator([[2], [2, 3]], min_ratio=0.3, max_ratio=0.8)
    want = gen(image_list(1, 64, 64), [torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 4, 4)])[0].numpy()
    assert d.shape == (8 * 8 * 4 + 4 * 4 * 6, 4)
    np.testing.assert_array_equal(d, want)
