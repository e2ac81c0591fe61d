"""The RoI feature operators and the detection heads' layers on the CPU kernels
(kernels/cpu/roi.py), forward and backward, float32 and float64:

- roi_align against torchvision's pure-Python `_roi_align` (tests/tvref.py, autograd for
  the backward) over aligned / sampling (adaptive too) / scale settings, with RoIs inside,
  partly off the map, empty, and padding rows; float64 finite differences;
- roi_pool against a float64 transcription of torchvision's C++ kernel
  (csrc/ops/cpu/roi_pool_kernel.cpp), argmax included, and finite differences;
- crop_resize as roi_align(size, 1, 1, aligned) and, on the whole image, as torch's
  F.interpolate(bilinear, align_corners=False);
- l2norm and select_class against torch autograd;
- small graphs with these operators training one step through Model, against torch.
(The CUDA twins are checked against these kernels in test_cuda_roi.py.)"""
import math

import numpy as np
import pytest
import torch

import tvref
from helpers import compile_text
from netdsl.errors import NetdslError
from netdsl.kernels import cpu as C
from netdsl.runtime.model import Model

F = torch.nn.functional
TV = tvref.load()
needs_tv = pytest.mark.skipif(TV is None, reason=tvref.SKIP_REASON)
DTYPES = pytest.mark.parametrize("dt", [np.float32, np.float64], ids=["f32", "f64"])
TOL = {np.float32: 2e-5, np.float64: 1e-12}

# Two 9x11 maps. RoIs in image pixels (the settings' scales map them onto the map): inside,
# partly off the map by more than a cell (C++: those samples count 0), off by less than a
# cell (clamped to the edge), one cell, empty (x1 = x2, y1 = y2), reversed, far larger
# than the map, and one entirely off it.
ROIS = np.array([[0, 1.3, 2.2, 7.7, 8.1],
                 [1, -6.5, -5.0, 9.0, 12.5],
                 [1, -0.6, -0.4, 10.6, 8.6],
                 [0, 4.0, 4.0, 5.0, 5.0],
                 [1, 3.0, 3.0, 3.0, 3.0],
                 [0, 6.0, 5.0, 2.0, 1.0],
                 [0, -20.0, -15.0, 40.0, 30.0],
                 [1, 30.0, 25.0, 36.0, 31.0]])
XSHAPE = (2, 3, 9, 11)
# (aligned, sampling, scale, out): torchvision's legacy default, Detectron2's aligned,
# one sample per bin, adaptive (sampling <= 0), an uneven output, a coarse scale
SETTINGS = [(False, 2, 1.0, (3, 3)), (True, 2, 1.0, (3, 3)), (False, 1, 0.5, (4, 3)), (True, 1, 0.5, (2, 5)),
            (False, 0, 1.0, (3, 4)), (True, 0, 0.5, (3, 4)), (False, -1, 0.25, 2), (True, 3, 1.0, (5, 5))]


def rel(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def data(dt, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(XSHAPE).astype(dt), ROIS.astype(dt), rng


# ---------------------------------------------------------------- roi_align

def torch_align(x, rois, gy, setting, cpp_bounds=True):
    """(y, gx) of torchvision's pure-Python RoIAlign, by autograd."""
    aligned, sampling, scale, out = setting
    tx = torch.tensor(x, requires_grad=True)
    ty = tvref.roi_align(tx, torch.tensor(rois), scale, out, sampling, aligned, cpp_bounds=cpp_bounds)
    (ty * torch.tensor(gy)).sum().backward()
    return ty.detach().numpy(), tx.grad.numpy()


def adaptive_grid(rois, setting):
    """torchvision's samples per bin along y and x of each RoI when sampling <= 0."""
    aligned, sampling, scale, out = setting
    oh, ow = (out, out) if isinstance(out, int) else out
    h, w = (rois[:, 4] - rois[:, 2]) * scale, (rois[:, 3] - rois[:, 1]) * scale
    if not aligned:
        h, w = np.maximum(h, 1), np.maximum(w, 1)
    return np.ceil(h / oh).astype(int), np.ceil(w / ow).astype(int)


@needs_tv
@DTYPES
@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: "a{}s{}x{}o{}".format(*s).replace(" ", ""))
def test_roi_align_matches_torchvision(setting, dt):
    aligned, sampling, scale, out = setting
    x, rois, rng = data(dt)
    y = C.roi_align(x, rois, out, scale, sampling, aligned)
    gy = rng.standard_normal(y.shape).astype(dt)
    assert y.dtype == dt and y.shape == (len(rois), 3, *((out, out) if isinstance(out, int) else out))
    # RoIs compared with the reference at the setting's sampling, or at another (adaptive
    # grids longer than the map: the Python reference samples at most H x W points per
    # bin, so compare at the RoI's grid given explicitly), or not at all (None: an empty
    # RoI samples nothing, 0 / 0 in the reference, whose gradient is NaN)
    groups = {sampling: list(range(len(rois)))}
    if sampling <= 0:
        gh, gw = adaptive_grid(rois.astype(np.float64), setting)
        for r in range(len(rois)):
            if gh[r] * gw[r] == 0 or gh[r] > x.shape[2] or gw[r] > x.shape[3]:
                groups[sampling].remove(r)
                groups.setdefault(int(gh[r]) if gh[r] == gw[r] and gh[r] else None, []).append(r)
    assert not y[groups.get(None, [])].any()
    for s, rows in groups.items():
        mask = np.isin(np.arange(len(rois)), rows)[:, None, None, None]
        gx = C.roi_align_backward(gy * mask, rois, x.shape, scale, sampling, aligned)
        assert gx.dtype == dt
        if s is None:
            assert not gx.any()
            continue
        ty, tgx = torch_align(x, rois[rows], gy[rows], (aligned, s, scale, out))
        assert rel(y[rows], ty) < TOL[dt]
        assert rel(gx, tgx) < TOL[dt]


@needs_tv
def test_roi_align_within_a_cell_of_the_map_is_the_plain_python_reference():
    """The C++ rule (samples beyond a cell off the map count 0) is all tvref adds: for RoIs
    that stay within that margin, the unmodified Python transcription agrees."""
    x, rois, rng = data(np.float64)
    near = rois[[0, 2, 3]]
    for setting in SETTINGS[:4]:
        aligned, sampling, scale, out = setting
        y = C.roi_align(x, near, out, scale, sampling, aligned)
        gy = rng.standard_normal(y.shape)
        ty, tgx = torch_align(x, near, gy, setting, cpp_bounds=False)
        assert rel(y, ty) < 1e-12
        assert rel(C.roi_align_backward(gy, near, x.shape, scale, sampling, aligned), tgx) < 1e-12


def test_roi_align_far_off_the_map_counts_zero():
    x = np.ones((1, 1, 4, 4))
    y = C.roi_align(x, np.array([[0, -10.0, -10.0, -4.0, -4.0], [0, 0.0, 0.0, 4.0, 4.0]]), 2, 1.0, 2, False)
    assert np.array_equal(y[0], np.zeros((1, 2, 2))) and np.allclose(y[1], 1.0)


@pytest.mark.parametrize("setting", [SETTINGS[0], SETTINGS[1], SETTINGS[4]], ids=["legacy", "aligned", "adaptive"])
def test_roi_align_backward_matches_finite_differences(setting):
    aligned, sampling, scale, out = setting
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 2, 5, 6))
    rois = np.array([[1, 0.7, 1.1, 4.3, 3.9], [0, -2.2, -1.6, 3.4, 6.8], [1, 2.0, 2.0, 2.5, 3.5]])
    gy = rng.standard_normal(C.roi_align(x, rois, out, scale, sampling, aligned).shape)
    fd = finite_differences(lambda v: float((C.roi_align(v, rois, out, scale, sampling, aligned) * gy).sum()), x)
    assert np.abs(C.roi_align_backward(gy, rois, x.shape, scale, sampling, aligned) - fd).max() < 1e-8


def finite_differences(loss, x, eps=1e-6):
    fd = np.zeros(x.shape)
    for i in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[i] += eps
        xm[i] -= eps
        fd[i] = (loss(xp) - loss(xm)) / (2 * eps)
    return fd


# ---------------------------------------------------------------- roi_pool

def cpp_round(v):
    """std::round: halves away from zero."""
    return int(math.copysign(math.floor(abs(v) + 0.5), v))


def roi_pool_ref(x, rois, out, scale):
    """torchvision's roi_pool_forward_kernel_impl: geometry in the input's dtype T as there,
    maxima in float64. (y, argmax)."""
    T = x.dtype.type
    N, C_, H, W = x.shape
    oh, ow = (out, out) if isinstance(out, int) else out
    y, arg = np.zeros((len(rois), C_, oh, ow)), np.full((len(rois), C_, oh, ow), -1)
    for r, roi in enumerate(rois):
        b = int(roi[0])
        x0, y0, x1, y1 = (cpp_round(float(v * T(scale))) for v in roi[1:])
        bh = T(max(y1 - y0 + 1, 1)) / T(oh)
        bw = T(max(x1 - x0 + 1, 1)) / T(ow)
        for ph in range(oh):
            h0 = min(max(math.floor(T(ph) * bh) + y0, 0), H)
            h1 = min(max(math.ceil(T(ph + 1) * bh) + y0, 0), H)
            for pw in range(ow):
                w0 = min(max(math.floor(T(pw) * bw) + x0, 0), W)
                w1 = min(max(math.ceil(T(pw + 1) * bw) + x0, 0), W)
                if h1 <= h0 or w1 <= w0:
                    continue
                win = x[b, :, h0:h1, w0:w1].astype(np.float64).reshape(C_, -1)
                k = win.argmax(axis=1)                  # the first maximum, as the strict > there
                y[r, :, ph, pw] = win[np.arange(C_), k]
                arg[r, :, ph, pw] = (h0 + k // (w1 - w0)) * W + w0 + k % (w1 - w0)
    return y, arg


def roi_pool_backward_ref(gy, arg, rois, xshape):
    gx = np.zeros(xshape)
    for r, c, ph, pw in np.ndindex(gy.shape):
        if arg[r, c, ph, pw] >= 0:
            gx[int(rois[r, 0]), c].flat[arg[r, c, ph, pw]] += gy[r, c, ph, pw]
    return gx


@DTYPES
@pytest.mark.parametrize("out, scale", [(3, 1.0), ((2, 4), 0.5), (7, 0.25), (4, 1 / 16)])
def test_roi_pool_matches_torchvisions_algorithm(out, scale, dt):
    x, rois, rng = data(dt, seed=1)
    rois = np.concatenate([rois, np.array([[0, 2.5, 1.5, 6.5, 4.5], [1, 8 * 16, 4 * 16, 10 * 16, 7 * 16]], dt)])
    y, arg = C.roi_pool(x, rois, out, scale)
    want, want_arg = roi_pool_ref(x, rois, out, scale)
    assert y.dtype == dt and arg.dtype == np.int64
    assert np.array_equal(y, want.astype(dt)) and np.array_equal(arg, want_arg)     # a max: exact
    gy = rng.standard_normal(y.shape).astype(dt)
    gx = C.roi_pool_backward(gy, arg, rois, x.shape)
    assert gx.dtype == dt and rel(gx, roi_pool_backward_ref(gy, want_arg, rois, x.shape)) < TOL[dt]


def test_roi_pool_empty_bins_are_zero_and_get_no_gradient():
    x = -np.ones((1, 1, 4, 4))
    y, arg = C.roi_pool(x, np.array([[0, 10.0, 10.0, 12.0, 12.0], [0, 0.0, 0.0, 0.0, 0.0]]), 2, 1.0)
    assert np.array_equal(y[0], np.zeros((1, 2, 2))) and (arg[0] == -1).all()
    assert (y[1] == -1).all() and (arg[1] == 0).all()                       # a malformed RoI is 1x1
    assert not C.roi_pool_backward(np.ones_like(y[:1]), arg[:1], np.zeros((1, 5)), x.shape).any()


def test_roi_pool_backward_matches_finite_differences():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 2, 6, 7))
    rois = np.array([[1, 0.0, 1.0, 5.0, 4.0], [0, -2.0, -1.0, 3.0, 7.0], [1, 2.0, 2.0, 6.0, 5.0]])
    y, arg = C.roi_pool(x, rois, (3, 2), 1.0)
    gy = rng.standard_normal(y.shape)
    fd = finite_differences(lambda v: float((C.roi_pool(v, rois, (3, 2), 1.0)[0] * gy).sum()), x)
    assert np.abs(C.roi_pool_backward(gy, arg, rois, x.shape) - fd).max() < 1e-8


# ---------------------------------------------------------------- crop_resize, padding, bad indices

@DTYPES
def test_crop_resize_is_aligned_roi_align_with_one_sample(dt):
    x, rois, rng = data(dt, seed=2)
    y = C.crop_resize(x, rois, (5, 6))
    assert np.array_equal(y, C.roi_align(x, rois, (5, 6), 1.0, 1, True))
    gy = rng.standard_normal(y.shape).astype(dt)
    assert np.array_equal(C.crop_resize_backward(gy, rois, x.shape), C.roi_align_backward(gy, rois, x.shape, 1.0, 1, True))


@DTYPES
@pytest.mark.parametrize("size", [(18, 22), (5, 4), (9, 11)])
def test_crop_resize_of_the_whole_image_is_bilinear_interpolation(size, dt):
    """The warp of the box (0, 0, W, H) is torch's bilinear resize, align_corners=False."""
    x, _, rng = data(dt, seed=3)
    rois = np.array([[0, 0, 0, 11, 9], [1, 0, 0, 11, 9]], dt)
    tx = torch.tensor(x, requires_grad=True)
    ty = F.interpolate(tx, size=size, mode="bilinear", align_corners=False)
    gy = rng.standard_normal(tuple(ty.shape)).astype(dt)
    (ty * torch.tensor(gy)).sum().backward()
    assert rel(C.crop_resize(x, rois, size), ty.detach().numpy()) < TOL[dt]
    assert rel(C.crop_resize_backward(gy, rois, x.shape), tx.grad.numpy()) < TOL[dt]


@pytest.mark.parametrize("op", ["roi_pool", "roi_align", "crop_resize"])
def test_padding_rois_give_zeros_and_no_gradient(op):
    """A RoI whose batch index is negative (a padding row) reads nothing."""
    x, rois, rng = data(np.float64)
    pad = rois.copy()
    pad[:, 0] = -1
    run = {"roi_pool": lambda r: C.roi_pool(x, r, 3, 1.0)[0], "roi_align": lambda r: C.roi_align(x, r, 3, 1.0, 2, False),
           "crop_resize": lambda r: C.crop_resize(x, r, 3)}[op]
    y = run(pad)
    assert y.shape == (len(rois), 3, 3, 3) and not y.any()
    gy = np.ones(y.shape)
    g = {"roi_pool": lambda: C.roi_pool_backward(gy, C.roi_pool(x, pad, 3, 1.0)[1], pad, x.shape),
         "roi_align": lambda: C.roi_align_backward(gy, pad, x.shape, 1.0, 2, False),
         "crop_resize": lambda: C.crop_resize_backward(gy, pad, x.shape)}[op]()
    assert not g.any()


def test_a_roi_of_a_missing_image_is_an_index_error():
    x, rois, _ = data(np.float32)
    rois[3, 0] = 2
    for call in (lambda: C.roi_pool(x, rois, 2, 1.0), lambda: C.roi_align(x, rois, 2, 1.0, 2, False),
                 lambda: C.crop_resize(x, rois, 2)):
        with pytest.raises(IndexError, match="RoI 3 has batch index 2, but there are 2 images"):
            call()


# ---------------------------------------------------------------- l2norm, select_class

@DTYPES
def test_l2norm_matches_torch(dt):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 5, 3, 4)).astype(dt)
    x[1, :, 2, 3] = 0                                   # eps keeps a zero vector finite
    w = rng.uniform(10, 30, 5).astype(dt)
    tx, tw = torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True)
    ty = tx / torch.sqrt((tx * tx).sum(1, keepdim=True) + 1e-10) * tw.view(1, -1, 1, 1)
    gy = rng.standard_normal(x.shape).astype(dt)
    (ty * torch.tensor(gy)).sum().backward()
    y = C.l2norm(x, w, 1e-10)
    gx, gw = C.l2norm_backward(gy, x, w, 1e-10)
    assert y.dtype == gx.dtype == gw.dtype == dt and np.isfinite(gx).all()
    assert rel(y, ty.detach().numpy()) < TOL[dt]
    assert rel(gx, tx.grad.numpy()) < 5 * TOL[dt] and rel(gw, tw.grad.numpy()) < 5 * TOL[dt]
    assert C.l2norm_backward(gy, x, w, 1e-10, need_gx=False)[0] is None


@DTYPES
@pytest.mark.parametrize("shape", [(6, 4, 4), (6, 3, 5, 5), (6, 2)], ids=["deltas", "masks", "scalars"])
def test_select_class_matches_torch_gather(shape, dt):
    rng = np.random.default_rng(6)
    x = rng.standard_normal(shape).astype(dt)
    labels = np.array([1, -1, 0, shape[1] - 1, 1, -1])
    tx = torch.tensor(x, requires_grad=True)
    keep = torch.tensor(labels >= 0)
    idx = torch.tensor(np.maximum(labels, 0)).view(-1, 1, *([1] * (len(shape) - 2))).expand(-1, 1, *shape[2:])
    ty = torch.gather(tx, 1, idx).squeeze(1) * keep.view(-1, *([1] * (len(shape) - 2))).to(tx.dtype)
    gy = rng.standard_normal(tuple(ty.shape)).astype(dt)
    (ty * torch.tensor(gy)).sum().backward()
    y = C.select_class(x, labels)
    assert y.shape == shape[:1] + shape[2:] and np.array_equal(y, ty.detach().numpy())
    assert np.array_equal(C.select_class_backward(gy, labels, shape[1]), tx.grad.numpy())


def test_select_class_of_an_unknown_class_is_an_index_error():
    with pytest.raises(IndexError, match=r"labels\[1\] = 4 is not a class in \[0, 4\)"):
        C.select_class(np.zeros((2, 4, 4)), np.array([0, 4]))


# ---------------------------------------------------------------- through a graph

HEAD = """
network head() {
  input image: f32[2, 3, 12, 10]
  input rois: f32[5, 5]
  input labels: i64[5]
  input target: f32[5, 4]
  f = image -> conv(4, k=3, p=1, name="conv") -> l2norm(scale=5.0, name="norm")
  a = roi_align(f, rois, out=3, scale=0.5, sampling=2, aligned=true)
  p = roi_pool(f, rois, out=2, scale=0.5)
  c = crop_resize(image, rois, size=4)
  z = concat([flatten(a), flatten(p), flatten(c)], 1) -> linear(12, name="fc") -> reshape([5, 3, 4])
  y = select_class(z, labels)
  output y
  loss box = l2(y, target)
}
"""


def torch_head(params, feeds, dt):
    """The same network in torch (tvref's RoIAlign, our float64 roi_pool reference's
    switches as a gather): (loss, y, grads)."""
    t = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    img, rois = torch.tensor(feeds["image"]), torch.tensor(feeds["rois"])
    f = F.conv2d(img, t["conv.weight"], t["conv.bias"], padding=1)
    f = f / torch.sqrt((f * f).sum(1, keepdim=True) + 1e-10) * t["norm.weight"].view(1, -1, 1, 1)
    a = tvref.roi_align(f, rois, 0.5, 3, 2, True)
    _, arg = roi_pool_ref(f.detach().numpy(), feeds["rois"], 2, 0.5)          # the switches
    b = torch.tensor(feeds["rois"][:, 0].astype(np.int64))
    planes = f.flatten(2)[b]                                                   # [R, C, H*W]
    p = torch.gather(planes, 2, torch.tensor(np.maximum(arg, 0)).flatten(2)).view(5, 4, 2, 2) * torch.tensor(arg >= 0)
    c = tvref.roi_align(img, rois, 1.0, 4, 1, True)
    z = torch.cat([a.flatten(1), p.flatten(1), c.flatten(1)], 1) @ t["fc.weight"].T + t["fc.bias"]
    y = z.view(5, 3, 4)[torch.arange(5), torch.tensor(feeds["labels"])]
    loss = F.mse_loss(y, torch.tensor(feeds["target"]))
    loss.backward()
    return loss.item(), y.detach().numpy(), {k: v.grad.numpy() for k, v in t.items()}


@needs_tv
@DTYPES
def test_roi_head_trains_one_step_through_model(tmp_path, dt):
    g = compile_text(tmp_path, HEAD)
    rng = np.random.default_rng(7)
    params = {k: v.astype(dt) for k, v in Model(g, seed=1).params.items()}
    assert set(params) == {"conv.weight", "conv.bias", "norm.weight", "fc.weight", "fc.bias"}
    assert (params["norm.weight"] == 5.0).all()                              # constant(scale)
    feeds = {"image": rng.standard_normal((2, 3, 12, 10)).astype(dt),
             "rois": np.array([[0, 1, 2, 9, 11], [1, -3, 0, 6, 8], [1, 4, 4, 4, 4], [0, 0, 0, 10, 12],
                               [1, 2.5, 3.5, 7.5, 9.5]], dt),
             "labels": np.array([2, 0, 1, 2, 1]), "target": rng.standard_normal((5, 4)).astype(dt)}
    want_loss, want_y, want_grads = torch_head(params, feeds, dt)
    total, _, outs, grads = Model(g, params={k: v.copy() for k, v in params.items()}, dtype=dt).train_step(feeds)
    tol = {np.float32: 1e-4, np.float64: 1e-10}[dt]
    assert abs(total - want_loss) <= tol * want_loss
    assert rel(outs["y"], want_y) < tol
    assert set(grads) == set(want_grads)
    for k in grads:
        assert rel(grads[k], want_grads[k]) < tol, k


def test_a_roi_of_a_missing_image_is_reported_at_its_node(tmp_path):
    g = compile_text(tmp_path, """network t() {
  input image: f32[1, 2, 6, 6]
  input rois: f32[2, 5]
  output y = roi_align(conv(image, 2, k=1), rois, out=2, scale=1.0)
}""")
    rois = np.array([[0, 0, 0, 3, 3], [1, 0, 0, 3, 3]], np.float32)
    with pytest.raises(NetdslError, match=r"roi_align \(roi_align1\): RoI 1 has batch index 1") as e:
        Model(g).infer({"image": np.zeros((1, 2, 6, 6), np.float32), "rois": rois})
    assert e.value.pos.line == 4


def test_l2norm_eps_must_be_positive(tmp_path):
    with pytest.raises(NetdslError, match="attribute 'eps' must be positive"):
        compile_text(tmp_path, """network t() {
  input x: f32[N, 4, 3, 3]
  output y = l2norm(x, eps=0.0)
}""")
