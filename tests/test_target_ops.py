"""The detectors' target operators on the CPU kernels (kernels/cpu/targets.py):

- assign_targets against torchvision's Matcher(allow_low_quality_matches=True) as its RPN
  labels anchors (ties, exact thresholds, padding gt in the middle, an image without gt);
- sample_anchors against BalancedPositiveNegativeSampler: the same counts and fractions,
  a uniform draw, determinism for a seed;
- sample_rois against torchvision's RoIHeads.select_training_samples: the same RoIs, labels
  and matches when nothing is dropped, the sampler's counts when it samples;
- hard_negatives against torchvision's SSD.compute_loss (its classification loss);
- mask_targets and keypoint_targets against roi_heads' project_masks_on_boxes and
  keypoints_to_heatmap (pure Python, via tests/tvref.py); match_gather and positive
  against numpy;
- yolo_targets and yolo_decode against a float64 reference written from the paper;
  the YOLO loss block of specs/det/yolo_v1.net through Model against the paper's loss;
- a two-image batch with different object counts gives the same targets (and losses) as
  the two images one by one.
(The CUDA twins are checked against these kernels in test_cuda_targets.py.)"""
import math

import numpy as np
import pytest
import torch

import tvref
from helpers import SPECS, compile_text
from netdsl.errors import NetdslError
from netdsl.kernels import cpu as C
from netdsl.runtime.model import Model

TV = tvref.load()
needs_tv = pytest.mark.skipif(TV is None, reason=tvref.SKIP_REASON)
DTYPES = pytest.mark.parametrize("dt", [np.float32, np.float64], ids=["f32", "f64"])


def boxes(rng, n, lo=0.0, hi=64.0, smin=4.0, smax=32.0, dt=np.float32):
    c = rng.uniform(lo, hi, (n, 2))
    s = rng.uniform(smin, smax, (n, 2))
    return np.concatenate([c - s / 2, c + s / 2], 1).astype(dt)


def scene(seed=0, dt=np.float32):
    """Anchors (with exact duplicates, for ties) and two images' gt: image 0 with 3 objects
    and a padding row in the middle, image 1 with 1 object and 3 padding rows."""
    rng = np.random.default_rng(seed)
    anchors = boxes(rng, 300, dt=dt)
    anchors[250:] = anchors[:50]
    gb = np.zeros((2, 4, 4), dt)
    gl = np.full((2, 4), -1)
    gb[0, [0, 2, 3]], gl[0, [0, 2, 3]] = boxes(rng, 3, 8, 56, dt=dt), [3, 1, 2]
    gb[1, 0], gl[1, 0] = boxes(rng, 1, 8, 56, dt=dt)[0], 2
    gb[0, 1] = [5, 5, 20, 20]                # a padding row with a box: must never match
    return anchors, gb, gl


# ---------------------------------------------------------------- assign_targets

def tv_assign(anchors, gb, gl, fg, bg, binary):
    """torchvision's RPN labelling (assign_targets_to_anchors) on each image's valid gt."""
    M = TV.det_utils.Matcher(fg, bg, allow_low_quality_matches=True)
    labels, out = [], []
    for n in range(gl.shape[0]):
        valid = gl[n] >= 0
        g, lab = torch.tensor(gb[n][valid]), torch.tensor(gl[n][valid])
        if not len(g):
            labels.append(np.zeros(len(anchors), np.int64))
            out.append(np.zeros((len(anchors), 4), gb.dtype))
            continue
        q = TV.boxes.box_iou(g, torch.tensor(anchors))
        assert (q.max(1).values > 0).all()            # (a gt that overlaps nothing: see the kernel's doc)
        m = M(q)
        l = torch.ones_like(m) if binary else lab[m.clamp(min=0)]
        l = torch.where(m == M.BELOW_LOW_THRESHOLD, 0, torch.where(m == M.BETWEEN_THRESHOLDS, -1, l))
        labels.append(l.numpy())
        out.append(torch.where((m >= 0)[:, None], g[m.clamp(min=0)], 0).numpy())
    return np.stack(labels), np.stack(out)


@needs_tv
@DTYPES
@pytest.mark.parametrize("fg, bg, binary", [(0.7, 0.3, True), (0.5, 0.5, False), (0.5, 0.2, False)])
def test_assign_targets_matches_torchvisions_matcher(fg, bg, binary, dt):
    anchors, gb, gl = scene(1, dt)
    labels, matched = C.assign_targets(anchors, gb, gl, fg, bg, binary)
    want_l, want_b = tv_assign(anchors, gb, gl, fg, bg, binary)
    np.testing.assert_array_equal(labels, want_l)
    np.testing.assert_array_equal(matched, want_b)
    assert matched.dtype == dt and labels.dtype == np.int64
    assert (labels > 0).any() and (labels == 0).any() and ((labels == -1).any() or fg == bg)


@needs_tv
def test_assign_targets_at_exact_thresholds_ties_and_without_gt():
    gb = np.array([[[0, 0, 10, 10], [0, 0, 0, 0]], [[0, 0, 0, 0], [0, 0, 0, 0]]], np.float32)
    gl = np.array([[4, -1], [-1, -1]])
    # IoU 0.5 (exactly fg), 0.25 (exactly bg: ignored), just under 0.25, and two tied best
    anchors = np.array([[0, 0, 10, 20], [0, 0, 10, 40], [0, 0, 10, 40.5], [0, 0, 20, 10], [30, 30, 40, 40]],
                       np.float32)
    labels, matched = C.assign_targets(anchors, gb, gl, 0.6, 0.25, False)
    np.testing.assert_array_equal(labels[0], [4, -1, 0, 4, 0])     # both ties at 0.5 are low-quality matches
    np.testing.assert_array_equal(labels[1], 0)                     # no gt: all background
    assert (matched[1] == 0).all() and (matched[0, 0] == gb[0, 0]).all() and (matched[0, 2] == 0).all()
    want_l, want_b = tv_assign(anchors, gb[:1], gl[:1], 0.6, 0.25, False)
    np.testing.assert_array_equal(labels[:1], want_l)
    labels, _ = C.assign_targets(anchors, gb, gl, 0.5, 0.25, True)
    np.testing.assert_array_equal(labels[0], [1, -1, 0, 1, 0])


def test_assign_targets_never_matches_padding_and_rois_of_other_images_are_ignored():
    anchors, gb, gl = scene(2)
    gb[1, 1:] = gb[1, 0]                      # padding rows holding a real object's box
    labels, matched = C.assign_targets(anchors, gb, gl, 0.7, 0.3, False)
    assert set(np.unique(labels[1])) <= {-1, 0, 2}
    rois = np.concatenate([np.repeat([[0.0], [1.0], [-1.0]], 100, 0), anchors], 1).astype(np.float32)
    lr, br = C.assign_targets(rois, gb, gl, 0.7, 0.3, False)
    for n in range(2):
        own = rois[:, 0] == n
        la, _ = C.assign_targets(anchors[own], gb[n:n + 1], gl[n:n + 1], 0.7, 0.3, False)
        np.testing.assert_array_equal(lr[n, own], la[0])
        assert (lr[n, ~own] == -1).all() and (br[n, ~own] == 0).all()


# ---------------------------------------------------------------- sampling

def sampled_counts(labels):
    return (labels > 0).sum(1), (labels == 0).sum(1)


@needs_tv
@pytest.mark.parametrize("npos, nneg", [(300, 2000), (10, 2000), (300, 40), (0, 500), (5, 3)])
def test_sample_anchors_counts_are_torchvisions(npos, nneg):
    rng = np.random.default_rng(npos + nneg)
    labels = np.full((2, 3000), -1)
    for n in range(2):
        at = rng.permutation(3000)
        labels[n, at[:npos]] = rng.integers(1, 4, npos)
        labels[n, at[npos:npos + nneg]] = 0
    out = C.sample_anchors(labels, 256, 0.5, seed=11)
    pos, neg = TV.det_utils.BalancedPositiveNegativeSampler(256, 0.5)([torch.tensor(l) for l in labels])
    got_pos, got_neg = sampled_counts(out)
    np.testing.assert_array_equal(got_pos, [int(p.sum()) for p in pos])
    np.testing.assert_array_equal(got_neg, [int(q.sum()) for q in neg])
    kept = out != -1
    np.testing.assert_array_equal(out[kept], labels[kept])         # a kept anchor keeps its label
    np.testing.assert_array_equal(C.sample_anchors(labels, 256, 0.5, seed=11), out)
    if min(npos, nneg) > 200:
        assert not np.array_equal(C.sample_anchors(labels, 256, 0.5, seed=12), out)
        assert not np.array_equal(kept[0], kept[1]) or npos + nneg <= 256


def test_sample_anchors_draws_uniformly_and_independently_per_image():
    """8 of 40 positives and 8 of 60 negatives per draw: over 600 seeds each anchor is kept
    Binomial(600, p) times, p = 0.2 and 0.133; and image 1's draw is not image 0's."""
    labels = np.full((2, 120), -1)
    labels[:, :40], labels[:, 40:100] = 1, 0
    hits = np.zeros((2, 120))
    same = 0
    for seed in range(600):
        out = C.sample_anchors(labels, 16, 0.5, seed)
        assert ((out[:, :40] == 1).sum(1) == 8).all() and ((out[:, 40:100] == 0).sum(1) == 8).all()
        hits += out >= 0
        same += np.array_equal(out[0], out[1])
    for lo, hi, p in ((0, 40, 0.2), (40, 100, 8 / 60)):
        sd = math.sqrt(600 * p * (1 - p))
        assert np.abs(hits[:, lo:hi] - 600 * p).max() < 5 * sd
    assert (hits[:, 100:] == 0).all() and same == 0


def tv_roi_heads(batch, fraction, fg, bg):
    return TV.roi_heads.RoIHeads(None, None, None, fg, bg, batch, fraction, None, 0.05, 0.5, 100)


def proposals_for(rng, gb, gl, per_image):
    """Proposals around the gt (jittered) and elsewhere: [N*per_image, 5] RoIs."""
    rows = []
    for n in range(gl.shape[0]):
        near = np.repeat(gb[n][gl[n] >= 0], per_image // 2 // max(1, (gl[n] >= 0).sum()) + 1, 0)[:per_image // 2]
        near = near + rng.normal(0, 3, near.shape)
        far = boxes(rng, per_image - len(near))
        b = np.concatenate([near, far])
        b[:, 2:] = np.maximum(b[:, 2:], b[:, :2] + 1)
        rows.append(np.concatenate([np.full((per_image, 1), n), b], 1))
    return np.concatenate(rows).astype(np.float32)


@needs_tv
@pytest.mark.parametrize("fg, bg", [(0.5, 0.5), (0.7, 0.3)])
def test_sample_rois_keeping_everything_is_torchvisions_selection(fg, bg):
    rng = np.random.default_rng(3)
    _, gb, gl = scene(3)
    rois = proposals_for(rng, gb, gl, 40)
    batch = 64                                    # > 40 proposals + gt: nothing is dropped
    o_rois, o_lab, o_box, o_match = C.sample_rois(rois, gb, gl, batch, 1.0, fg, bg, 0.0, seed=1)
    heads = tv_roi_heads(batch, 1.0, fg, bg)
    props = [torch.tensor(rois[rois[:, 0] == n, 1:]) for n in range(2)]
    targets = [{"boxes": torch.tensor(gb[n][gl[n] >= 0]), "labels": torch.tensor(gl[n][gl[n] >= 0])} for n in range(2)]
    p, m, lab, _ = heads.select_training_samples(props, targets)
    for n in range(2):
        rows = slice(n * batch, (n + 1) * batch)
        k = len(p[n])
        valid = np.flatnonzero(gl[n] >= 0)
        np.testing.assert_array_equal(o_rois[rows][:k, 1:], p[n].numpy())
        np.testing.assert_array_equal(o_lab[rows][:k], lab[n].numpy())
        pos = lab[n].numpy() > 0
        np.testing.assert_array_equal(o_match[rows][:k][pos], valid[m[n].numpy()[pos]])   # gt index in the padded rows
        assert (o_match[rows][:k][~pos] == -1).all()
        np.testing.assert_array_equal(o_box[rows][:k][pos], gb[n][o_match[rows][:k][pos]])
        assert (o_box[rows][:k][~pos] == 0).all() and (o_rois[rows][:k, 0] == n).all()
        pad = slice(k, batch)                      # padding rows
        assert (o_rois[rows][pad, 0] == -1).all() and (o_rois[rows][pad, 1:] == 0).all()
        assert (o_lab[rows][pad] == -1).all() and (o_match[rows][pad] == -1).all()


@needs_tv
def test_sample_rois_samples_torchvisions_counts_from_the_right_labels():
    rng = np.random.default_rng(4)
    _, gb, gl = scene(4)
    rois = proposals_for(rng, gb, gl, 200)
    full = C.sample_rois(rois, gb, gl, 400, 1.0, 0.5, 0.5, 0.0, seed=0)
    label_of = {tuple(r): l for r, l in zip(full[0], full[1]) if r[0] >= 0}
    heads = tv_roi_heads(32, 0.25, 0.5, 0.5)
    props = [torch.tensor(rois[rois[:, 0] == n, 1:]) for n in range(2)]
    targets = [{"boxes": torch.tensor(gb[n][gl[n] >= 0]), "labels": torch.tensor(gl[n][gl[n] >= 0])} for n in range(2)]
    _, _, want, _ = heads.select_training_samples(props, targets)
    for seed in range(5):
        o_rois, o_lab, _, _ = C.sample_rois(rois, gb, gl, 32, 0.25, 0.5, 0.5, 0.0, seed)
        for n in range(2):
            rows = slice(n * 32, (n + 1) * 32)
            assert ((o_lab[rows] > 0).sum(), (o_lab[rows] == 0).sum()) == \
                ((want[n] > 0).sum().item(), (want[n] == 0).sum().item())
            for r, l in zip(o_rois[rows], o_lab[rows]):
                assert r[0] == -1 or label_of[tuple(r)] == l
        again = C.sample_rois(rois, gb, gl, 32, 0.25, 0.5, 0.5, 0.0, seed)
        assert all(np.array_equal(a, b) for a, b in zip(again, (o_rois, o_lab)))


def iou64(a, b):
    """IoU of every pair in float64: [A, 4] x [B, 4] -> [A, B]."""
    a, b = a.astype(np.float64)[:, None], b.astype(np.float64)[None]
    w = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    h = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])
    return w * h / (area(a) + area(b) - w * h)


def test_sample_rois_background_floor_and_padding_proposals():
    _, gb, gl = scene(5)
    rois = proposals_for(np.random.default_rng(5), gb, gl, 60)
    rois[::7] = [-1, 0, 0, 0, 0]                 # padding proposals never become RoIs
    o_rois, o_lab, _, _ = C.sample_rois(rois, gb, gl, 128, 1.0, 0.5, 0.5, 0.1, seed=0)
    real = o_rois[:, 0] >= 0
    assert not (o_rois[real, 1:] == 0).all(1).any()
    best = np.array([iou64(r[None, 1:], gb[int(r[0])][gl[int(r[0])] >= 0]).max() for r in o_rois[real]])
    lab = o_lab[real]
    assert (lab == 0).sum() > 5 and (lab > 0).sum() > 5
    assert ((best[lab == 0] >= 0.1) & (best[lab == 0] < 0.5)).all() and (best[lab > 0] >= 0.5).all()
    all_rois, _, _, _ = C.sample_rois(rois, gb, gl, 128, 1.0, 0.5, 0.5, 0.0, seed=0)
    assert real.sum() < (all_rois[:, 0] >= 0).sum()            # bg_lo left some out
    assert real.sum() + (rois[:, 0] < 0).sum() <= 120 + (gl >= 0).sum()


# ---------------------------------------------------------------- SSD's hard negatives

def tv_ssd_classification(logits, labels):
    """torchvision's SSD.compute_loss classification term for these class targets
    (matched_idxs: -1 where the label is 0, else the index of a gt of that label)."""
    N, K, Cn = logits.shape
    this = type("SSDLoss", (), {"box_coder": TV.det_utils.BoxCoder((10.0, 10.0, 5.0, 5.0)), "neg_to_pos_ratio": 3})()
    targets, matched = [], []
    for n in range(N):
        targets.append({"boxes": torch.tensor([[0.0, 0, 10, 10]] * Cn), "labels": torch.arange(Cn)})
        matched.append(torch.tensor(np.where(labels[n] > 0, labels[n], -1)))
    out = TV.ssd.SSD.compute_loss(this, targets, {"bbox_regression": torch.zeros(N, K, 4),
                                                  "cls_logits": torch.tensor(logits)},
                                  [torch.zeros(K, 4) + torch.tensor([0.0, 0, 10, 10])] * N, matched)
    return out["classification"].item()


@needs_tv
@DTYPES
def test_hard_negatives_give_torchvisions_ssd_classification_loss(dt):
    rng = np.random.default_rng(6)
    N, K, Cn = 3, 500, 5
    logits = rng.standard_normal((N, K, Cn)).astype(dt) * 3
    labels = np.zeros((N, K), np.int64)
    for n, npos in enumerate((20, 1, 0)):
        labels[n, rng.choice(K, npos, replace=False)] = rng.integers(1, Cn, npos)
    out = C.hard_negatives(logits, labels, 3)
    npos = (labels > 0).sum(1)
    np.testing.assert_array_equal((out == 0).sum(1), 3 * npos)
    np.testing.assert_array_equal(out[labels > 0], labels[labels > 0])
    ce = torch.nn.functional.cross_entropy(torch.tensor(logits.astype(np.float64)).view(-1, Cn),
                                           torch.tensor(np.maximum(out, 0)).view(-1), reduction="none").numpy()
    ours = ce[out.reshape(-1) >= 0].sum() / max(1, npos.sum())
    want = tv_ssd_classification(logits, labels)
    assert abs(ours - want) <= 1e-5 * want
    # ignored anchors (-1) are neither positive nor negative; few negatives: all kept
    labels[0, :5] = -1
    few = np.where(np.arange(K) < 30, 1, np.where(np.arange(K) < 60, 0, -1))[None]
    assert (C.hard_negatives(logits[:1], labels[:1], 3)[0, :5] == -1).all()
    np.testing.assert_array_equal(C.hard_negatives(logits[:1], few, 3), few)


# ---------------------------------------------------------------- per-RoI targets

def test_positive_and_match_gather():
    labels = np.array([[3, 0, -1], [1, -1, 0]])
    np.testing.assert_array_equal(C.positive(labels), [[1, 0, 0], [1, 0, 0]])
    assert C.positive(labels, np.float64).dtype == np.float64
    rng = np.random.default_rng(7)
    caps = rng.integers(0, 50, (2, 3, 6))
    feats = rng.standard_normal((2, 3, 2, 2)).astype(np.float32)
    rois = np.array([[0, 1, 1, 5, 5], [1, 0, 0, 4, 4], [1, 2, 2, 3, 3], [-1, 0, 0, 0, 0]], np.float32)
    matched = np.array([2, 0, -1, 1])
    got = C.match_gather(caps, rois, matched, -1)
    np.testing.assert_array_equal(got, [caps[0, 2], caps[1, 0], [-1] * 6, [-1] * 6])
    got = C.match_gather(feats, rois, matched, 0)
    np.testing.assert_array_equal(got, np.stack([feats[0, 2], feats[1, 0], np.zeros((2, 2)), np.zeros((2, 2))]))
    with pytest.raises(IndexError, match="matched to gt 3, but there are 3 per image"):
        C.match_gather(caps, rois, np.array([3, 0, 0, 0]), -1)
    with pytest.raises(IndexError, match="image index 2, but there are 2 images"):
        C.match_gather(caps, rois + np.array([2, 0, 0, 0, 0], np.float32), matched, -1)


@needs_tv
@DTYPES
def test_mask_targets_are_torchvisions_projected_masks(dt):
    rng = np.random.default_rng(8)
    N, G, H, W = 2, 3, 40, 48
    masks = (rng.random((N, G, H, W)) < 0.4).astype(dt)
    rois = np.concatenate([np.repeat([[0.0], [1.0]], 6, 0), boxes(rng, 12, 0, 44, 2, 40, np.float64)], 1).astype(dt)
    rois[3] = [-1, 0, 0, 0, 0]
    matched = rng.integers(-1, G, 12)
    matched[3] = 1
    got = C.mask_targets(masks, rois, matched, 14)
    assert got.shape == (12, 14, 14) and got.dtype == dt
    for r in range(12):
        b = int(rois[r, 0])
        if b < 0 or matched[r] < 0:
            assert (got[r] == 0).all()
            continue
        want = TV.project_masks_on_boxes(torch.tensor(masks[b]), torch.tensor(rois[r:r + 1, 1:]),
                                         torch.tensor(matched[r:r + 1]), 14)[0].numpy()
        np.testing.assert_allclose(got[r], want, atol={np.float32: 2e-5, np.float64: 1e-12}[dt])


@needs_tv
def test_keypoint_targets_are_torchvisions_heatmap_indices():
    rng = np.random.default_rng(9)
    N, G, K = 2, 3, 17
    kp = np.concatenate([rng.uniform(-5, 70, (N, G, K, 2)), rng.integers(0, 3, (N, G, K, 1))], 3).astype(np.float32)
    rois = np.concatenate([np.repeat([[0.0], [1.0]], 5, 0), boxes(rng, 10, smin=10, smax=50, dt=np.float64)],
                          1).astype(np.float32)
    matched = rng.integers(0, G, 10)
    matched[4] = -1
    kp[0, matched[0], 0, :2] = rois[0, 3:5]                 # on the right and bottom edges
    kp[0, matched[0], 0, 2] = 2
    kp[0, matched[0], 1, :2] = rois[0, 1:3]                 # on the top-left corner
    kp[0, matched[0], 1, 2] = 1
    got = C.keypoint_targets(kp, rois, matched, 56)
    assert got.shape == (10, K) and got.dtype == np.int64
    for r in range(10):
        if matched[r] < 0:
            assert (got[r] == -1).all()
            continue
        heat, valid = TV.roi_heads.keypoints_to_heatmap(torch.tensor(kp[int(rois[r, 0]), matched[r]])[None],
                                                        torch.tensor(rois[r:r + 1, 1:]), 56)
        np.testing.assert_array_equal(got[r], np.where(valid[0].numpy() > 0, heat[0].numpy(), -1))
    assert got[0, 0] == 56 * 56 - 1 and got[0, 1] == 0
    assert (got >= 0).sum() > 10 and (got == -1).sum() > 10


# ---------------------------------------------------------------- YOLO v1

def yolo_reference(pred, gb, gl, B, Cn, H, W):
    """YOLO v1's targets from the paper in float64: the cell holding an object's centre is
    responsible for it (the first object in a cell wins: one class per cell), and its
    predictor with the highest IoU with the object (darknet: if none overlaps, the smallest
    squared error of x, y, w, h); targets x, y within the cell, sqrt w, sqrt h of the image,
    confidence = that IoU, one-hot class."""
    pred = pred.astype(np.float64)
    N, S = pred.shape[:2]
    target, obj = np.zeros_like(pred), np.zeros((N, S, S, B))
    cell = np.zeros((N, S, S))
    for n in range(N):
        for g in range(gb.shape[1]):
            x1, y1, x2, y2 = gb[n, g].astype(np.float64)
            if gl[n, g] <= 0 or x2 <= x1 or y2 <= y1:
                continue
            cx, cy, w, h = (x1 + x2) / 2 / W, (y1 + y2) / 2 / H, (x2 - x1) / W, (y2 - y1) / H
            col, row = min(int(cx * S), S - 1), min(int(cy * S), S - 1)
            if cell[n, row, col]:
                continue
            cell[n, row, col] = 1
            ious, errs = [], []
            for b in range(B):
                px, py, sw, sh = pred[n, row, col, 5 * b:5 * b + 4]
                px, py, pw, ph = (col + px) / S, (row + py) / S, sw * sw, sh * sh
                iw = min(px + pw / 2, cx + w / 2) - max(px - pw / 2, cx - w / 2)
                ih = min(py + ph / 2, cy + h / 2) - max(py - ph / 2, cy - h / 2)
                inter = max(iw, 0) * max(ih, 0)
                ious.append(inter / (pw * ph + w * h - inter) if pw > 0 and ph > 0 else 0.0)
                errs.append((px - cx) ** 2 + (py - cy) ** 2 + (pw - w) ** 2 + (ph - h) ** 2)
            b = int(np.argmax(ious)) if max(ious) > 0 else int(np.argmin(errs))
            target[n, row, col, 5 * b:5 * b + 5] = [cx * S - col, cy * S - row, math.sqrt(w), math.sqrt(h), ious[b]]
            target[n, row, col, 5 * B + gl[n, g] - 1] = 1
            obj[n, row, col, b] = 1
    return target, obj, 1 - obj, cell


def yolo_scene(seed, N=2, S=4, B=2, Cn=3, dt=np.float32):
    rng = np.random.default_rng(seed)
    pred = (rng.standard_normal((N, S, S, B * 5 + Cn)) * 0.3 + 0.5).astype(dt)
    gb = np.zeros((N, 5, 4), dt)
    gl = np.full((N, 5), -1)
    for n, k in enumerate((4, 2)[:N]):
        gb[n, :k] = boxes(rng, k, 8, 88, 6, 40, dt)
        gl[n, :k] = rng.integers(1, Cn + 1, k)
    gb[0, 3] = gb[0, 0] + [-2, -2, 2, 2]     # another object centred in the same cell: the first wins
    gb[0, 1, 2:] = gb[0, 1, :2]              # an empty box: not an object
    gl[1, 2] = 0                             # label 0: not an object
    gb[1, 2] = gb[1, 1]
    return pred, gb, gl


@DTYPES
def test_yolo_targets_match_the_papers_reference(dt):
    for seed in range(4):
        pred, gb, gl = yolo_scene(seed, dt=dt)
        if seed == 3:                        # boxes off the image: none overlaps, darknet's nearest
            pred[..., 0:2], pred[..., 5:7] = -3, -2
        got = C.yolo_targets(pred, gb, gl, 2, 3, (96, 100))
        want = yolo_reference(pred, gb, gl, 2, 3, 96, 100)
        for g, w in zip(got, want):
            assert g.dtype == dt
            np.testing.assert_allclose(g, w, atol={np.float32: 2e-6, np.float64: 1e-12}[dt])
        assert 1 <= got[3][0].sum() <= 2 and got[3][1].sum() >= 1    # image 0: 3 objects, 2 in one cell
        if seed == 3:
            assert (got[1][..., 1] == got[3]).all() and (got[0][..., 4] == 0).all()
    with pytest.raises(IndexError, match="gt label 4 is not a class in 1..3"):
        C.yolo_targets(pred, gb, np.where(gl == 2, 4, gl), 2, 3, 96)


def test_yolo_decode_gives_boxes_in_pixels_and_class_scores():
    pred = (np.random.default_rng(10).standard_normal((1, 3, 3, 13)) * 0.3 + 0.5).astype(np.float32)
    pred[0, 1, 2, 5:10] = [0.5, 0.25, 0.5, 0.4, 0.8]      # row 1, column 2, predictor 1
    pred[0, 1, 2, 10:] = [0.1, -0.3, 0.9]
    out_b, out_s = C.yolo_decode(pred, 2, 3, (60, 90))
    assert out_b.shape == (1, 18, 4) and out_s.shape == (1, 18, 4)
    q = (1 * 3 + 2) * 2 + 1
    cx, cy, w, h = (2 + 0.5) / 3 * 90, (1 + 0.25) / 3 * 60, 0.25 * 90, 0.16 * 60
    np.testing.assert_allclose(out_b[0, q], [cx - w / 2, cy - h / 2, min(cx + w / 2, 90), cy + h / 2], rtol=1e-6)
    np.testing.assert_allclose(out_s[0, q], [0, 0.08, 0, 0.72], rtol=1e-6)
    p64 = pred.astype(np.float64)
    for k in range(18):
        r, c, b = k // 6, (k // 2) % 3, k % 2
        np.testing.assert_allclose(out_s[0, k, 1:], np.maximum(p64[0, r, c, 10:], 0) * max(p64[0, r, c, 5 * b + 4], 0),
                                   rtol=1e-6, atol=1e-7)
    assert (out_s[..., 0] == 0).all() and (out_b >= 0).all() and (out_b[..., [0, 2]] <= 90).all()


# ---------------------------------------------------------------- a batch is its images

def test_a_two_image_batch_gives_each_images_targets_alone():
    """Image 0 with 3 objects, image 1 with 1 (padded to 4 in the batch, unpadded alone)."""
    anchors, gb, gl = scene(11)
    one = [(gb[0:1], gl[0:1]), (gb[1:2, :1], gl[1:2, :1])]
    labels, matched = C.assign_targets(anchors, gb, gl, 0.7, 0.3, True)
    for n, (b, l) in enumerate(one):
        la, ma = C.assign_targets(anchors, b, l, 0.7, 0.3, True)
        np.testing.assert_array_equal(labels[n], la[0])
        np.testing.assert_array_equal(matched[n], ma[0])
    logits = np.random.default_rng(11).standard_normal((2, 300, 4)).astype(np.float32)
    hn = C.hard_negatives(logits, labels, 3)
    for n in range(2):
        np.testing.assert_array_equal(hn[n], C.hard_negatives(logits[n:n + 1], labels[n:n + 1], 3)[0])
    rois = proposals_for(np.random.default_rng(11), gb, gl, 30)
    batch = C.sample_rois(rois, gb, gl, 40, 1.0, 0.5, 0.5, 0.0, seed=3)     # keeps all: no draw
    for n, (b, l) in enumerate(one):
        mine = rois[rois[:, 0] == n].copy()
        mine[:, 0] = 0
        alone = C.sample_rois(mine, b, l, 40, 1.0, 0.5, 0.5, 0.0, seed=3)
        rows = slice(n * 40, (n + 1) * 40)
        real = batch[0][rows, 0] >= 0
        np.testing.assert_array_equal(batch[0][rows][real, 1:], alone[0][real, 1:])
        for got, want in zip(batch[1:], alone[1:]):
            np.testing.assert_array_equal(got[rows], want)
    masks = (np.random.default_rng(12).random((2, 4, 32, 32)) < 0.5).astype(np.float32)
    kp = np.random.default_rng(13).uniform(0, 64, (2, 4, 5, 3)).astype(np.float32)
    r, m = batch[0], batch[3]
    for n in range(2):
        rows = slice(n * 40, (n + 1) * 40)
        alone_r = r[rows].copy()
        alone_r[alone_r[:, 0] >= 0, 0] = 0
        G = 4 if n == 0 else 1
        np.testing.assert_array_equal(C.mask_targets(masks, r, m, 7)[rows],
                                      C.mask_targets(masks[n:n + 1, :G], alone_r, m[rows], 7))
        np.testing.assert_array_equal(C.keypoint_targets(kp, r, m, 14)[rows],
                                      C.keypoint_targets(kp[n:n + 1, :G], alone_r, m[rows], 14))
        np.testing.assert_array_equal(C.match_gather(kp, r, m, -1)[rows],
                                      C.match_gather(kp[n:n + 1, :G], alone_r, m[rows], -1))
    pred, yb, yl = yolo_scene(14)
    both = C.yolo_targets(pred, yb, yl, 2, 3, 96)
    for n, G in ((0, 5), (1, 2)):
        for got, want in zip(both, C.yolo_targets(pred[n:n + 1], yb[n:n + 1, :G], yl[n:n + 1, :G], 2, 3, 96)):
            np.testing.assert_array_equal(got[n], want[0])


# ---------------------------------------------------------------- through Model

YOLO = f"""import "{SPECS}/det/yolo_v1.net"
network t(S = 4, B = 2, classes = 3) {{
  input x: f32[N, 6]
  input gt_boxes: f32[N, G, 4]
  input gt_labels: i64[N, G]
  pred = x -> linear(S * S * (B * 5 + classes), name="fc") -> reshape([-1, S, S, B * 5 + classes])
  output pred
  c, o, no, k = yolo_loss(pred, gt_boxes, gt_labels, B, classes, [96, 100])
  loss coord = c weight 5.0
  loss conf_obj = o
  loss conf_noobj = no weight 0.5
  loss cls = k
}}
"""


def paper_loss(pred, gb, gl, image=(96, 100)):
    """The paper's sum-squared loss per image (lambda_coord 5, lambda_noobj 0.5), float64."""
    target, obj, noobj, cell = yolo_reference(pred, gb, gl, 2, 3, *image)
    p = pred.astype(np.float64)
    N, S = p.shape[:2]
    d = (p - target) ** 2
    out = []
    for n in range(N):
        box = d[n, :, :, :10].reshape(S, S, 2, 5)
        out.append(5 * (obj[n][..., None] * box[..., :4]).sum() + (obj[n] * box[..., 4]).sum()
                   + 0.5 * (noobj[n] * box[..., 4]).sum() + (cell[n][..., None] * d[n, :, :, 10:]).sum())
    return np.array(out)


@DTYPES
def test_the_yolo_loss_block_of_the_spec_is_the_papers_loss(tmp_path, dt):
    """Its terms keep the paper's balance: their weighted sum is the paper's loss / (S*S)
    per image, averaged over the batch; so a two-image batch with different object counts
    gives the mean of the two images' losses alone."""
    g = compile_text(tmp_path, YOLO)
    params = {k: v.astype(dt) for k, v in Model(g, seed=2).params.items()}
    _, gb, gl = yolo_scene(15, dt=dt)
    x = np.random.default_rng(15).standard_normal((2, 6)).astype(dt)
    model = Model(g, params=params, dtype=dt)
    total, _, outs, _ = model.train_step({"x": x, "gt_boxes": gb, "gt_labels": gl})
    per_image = paper_loss(outs["pred"], gb, gl) / 16
    tol = {np.float32: 1e-5, np.float64: 1e-12}[dt]
    assert abs(total - per_image.mean()) <= tol * per_image.mean()
    for n, G in ((0, 5), (1, 2)):
        alone, _, _, _ = Model(g, params=params, dtype=dt).train_step(
            {"x": x[n:n + 1], "gt_boxes": gb[n:n + 1, :G], "gt_labels": gl[n:n + 1, :G]})
        assert abs(alone - per_image[n]) <= tol * per_image[n]


RPN = """network t(K = 200) {
  input x: f32[N, 4]
  input anchors: f32[K, 4]
  input gt_boxes: f32[N, G, 4]
  input gt_labels: i64[N, G]
  scores = x -> linear(K * 2, name="fc") -> reshape([-1, K, 2])
  labels, matched = assign_targets(anchors, gt_boxes, gt_labels, fg_iou=0.5, bg_iou=0.3, binary=true)
  labels = sample_anchors(labels, batch=32, fg_fraction=0.5)
  output labels
  output weight = positive(labels)
  loss cls = cross_entropy(scores, labels)
}
"""


def test_sampling_in_a_graph_repeats_for_a_seed_and_changes_with_it(tmp_path):
    g = compile_text(tmp_path, RPN)
    rng = np.random.default_rng(16)
    anchors = boxes(rng, 200)
    gb = np.stack([anchors[[3, 50]] + 1, anchors[[7, 9]] - 1])
    feeds = {"x": rng.standard_normal((2, 4)).astype(np.float32), "anchors": anchors, "gt_boxes": gb,
             "gt_labels": np.array([[1, 1], [1, -1]])}
    runs = [Model(g, seed=s).train_step(feeds) for s in (1, 1, 2)]
    (t1, _, o1, _), (t2, _, o2, _), (t3, _, o3, _) = runs
    assert t1 == t2 and np.array_equal(o1["labels"], o2["labels"])
    assert not np.array_equal(o1["labels"], o3["labels"])
    assert ((o1["labels"] >= 0).sum(1) == 32).all() and ((o1["labels"] > 0).sum(1) <= 16).all()
    np.testing.assert_array_equal(o1["weight"], o1["labels"] > 0)


def test_a_bad_gt_index_is_reported_at_its_node(tmp_path):
    g = compile_text(tmp_path, """network t() {
  input masks: f32[1, 2, 8, 8]
  input rois: f32[3, 5]
  input matched: i64[3]
  output y = mask_targets(masks, rois, matched, size=4)
}""")
    rois = np.array([[0, 0, 0, 4, 4]] * 3, np.float32)
    with pytest.raises(NetdslError, match=r"mask_targets \(mask_targets1\): RoI 2 is matched to gt 2") as e:
        Model(g).infer({"masks": np.zeros((1, 2, 8, 8), np.float32), "rois": rois, "matched": np.array([0, -1, 2])})
    assert e.value.pos.line == 5


@pytest.mark.parametrize("text, message", [
    ("sample_rois(rois, gb, gl, bg_lo=0.4, bg_iou=0.3, fg_iou=0.5)", "bg_lo=0.4 is above bg_iou=0.3"),
    ("sample_rois(rois, gb, gl, bg_iou=0.6, fg_iou=0.5)", "bg_iou=0.6 is above fg_iou=0.5"),
    ("assign_targets(rois, gb, gl, bg_iou=0.8)", "bg_iou=0.8 is above fg_iou=0.7"),
])
def test_threshold_mistakes_are_errors(tmp_path, text, message):
    with pytest.raises(NetdslError, match=message):
        compile_text(tmp_path, f"""network t() {{
  input rois: f32[6, 5]
  input gb: f32[2, 3, 4]
  input gl: i64[2, 3]
  output y = {text}
}}""")


MASK_RCNN = f"""import "{SPECS}/lib/det.net"
network t(classes = 3) {{
  input image: f32[N, 3, 64, 64]
  input gt_boxes: f32[N, G, 4]
  input gt_labels: i64[N, G]
  input gt_masks: f32[N, G, 64, 64]
  input gt_keypoints: f32[N, G, 2, 3]
  features = image -> conv(8, k=3, p=1) -> relu -> maxpool(k=4, s=4) -> conv(8, k=3, p=1) -> relu
                   -> maxpool(k=4, s=4)
  anchors = anchors(features, sizes=[16.0, 32.0], ratios=[0.5, 1.0, 2.0], stride=16)
  scores, deltas = rpn(features, 6, mid=8, name="rpn")
  proposals = proposals(scores, deltas, anchors, pre_nms=60, post_nms=20, iou=0.7, image=[64, 64])
  rois, labels, matched_boxes, matched = sample_rois(proposals, gt_boxes, gt_labels, batch=16,
                                                     fg_fraction=0.25, fg_iou=0.5, bg_iou=0.5)
  pooled = roi_align(features, rois, out=4, scale=1.0 / 16, sampling=2)
  logits, box_deltas = pooled -> flatten -> linear(16) -> relu -> box_predictor(classes, name="")
  rpn_cls_l, rpn_box_l = rpn_losses(scores, deltas, anchors, gt_boxes, gt_labels, name="rpn_loss")
  cls_l, box_l = roi_losses(logits, box_deltas, labels, matched_boxes, rois, name="roi_loss")
  masks = pooled -> conv(classes + 1, k=1) -> select_class(labels)
  heat = pooled -> conv(2, k=1) -> reshape([-1, 2, 16])
  loss rpn_cls = rpn_cls_l
  loss rpn_box = rpn_box_l
  loss cls = cls_l
  loss box = box_l
  loss mask = bce(masks -> flatten, mask_targets(gt_masks, rois, matched, size=4) -> flatten, positive(labels))
  loss keypoint = cross_entropy(heat, keypoint_targets(gt_keypoints, rois, matched, size=4))
  output labels, matched
  output joints = match_gather(gt_keypoints, rois, matched, fill=-1)
}}
"""


def test_a_small_mask_rcnn_of_the_library_blocks_trains_one_step(tmp_path):
    """The targets in their places: lib/det.net's RPN and RoI losses, mask and keypoint
    targets, on two images with 3 and 1 objects (padded gt)."""
    g = compile_text(tmp_path, MASK_RCNN)
    rng = np.random.default_rng(17)
    gb = np.zeros((2, 3, 4), np.float32)
    gl = np.full((2, 3), -1)
    gb[0], gl[0] = [[4, 6, 30, 34], [30, 30, 60, 50], [10, 40, 26, 60]], [1, 2, 3]
    gb[1, 0], gl[1, 0] = [16, 8, 48, 56], 2
    masks = np.zeros((2, 3, 64, 64), np.float32)
    for n in range(2):
        for k in range(3):
            x1, y1, x2, y2 = gb[n, k].astype(int)
            masks[n, k, y1:y2, x1:x2] = gl[n, k] > 0
    t = rng.uniform(0.1, 0.9, (2, 3, 2, 2))              # joints inside their object's box
    kp = np.concatenate([gb[:, :, None, :2] + t * (gb[:, :, None, 2:] - gb[:, :, None, :2]), np.ones((2, 3, 2, 1))],
                        3).astype(np.float32)
    feeds = {"image": rng.random((2, 3, 64, 64), dtype=np.float32), "gt_boxes": gb, "gt_labels": gl,
             "gt_masks": masks, "gt_keypoints": kp}
    total, losses, outs, grads = Model(g, seed=4).train_step(feeds)
    assert np.isfinite(total) and set(losses) == {"rpn_cls", "rpn_box", "cls", "box", "mask", "keypoint"}
    assert all(np.isfinite(v) for v in losses.values()) and losses["mask"] > 0
    labels, matched = outs["labels"], outs["matched"]
    assert labels.shape == (32,) and (labels[:16] > 0).any() and (labels[16:] > 0).any()   # the gt joined
    assert set(matched[16:][labels[16:] > 0]) == {0} and (matched[labels <= 0] == -1).all()
    pos = labels > 0
    np.testing.assert_array_equal(outs["joints"][pos], kp[np.repeat([0, 1], 16)[pos], matched[pos]])
    again = Model(g, seed=4).train_step(feeds)
    assert again[0] == total and np.array_equal(again[2]["labels"], labels)
