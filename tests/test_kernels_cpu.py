"""netdsl.kernels.cpu against PyTorch (float32) and finite differences (float64)."""
import numba
import numpy as np
import pytest

import netdsl.kernels.cpu as K

torch = pytest.importorskip("torch")
F = torch.nn.functional

RTOL, ATOL = 1e-4, 1e-5


@pytest.fixture(params=["serial", "parallel"])
def path(request, monkeypatch):
    """Run a test through the serial kernels and through the prange ones."""
    monkeypatch.setattr(K, "PAR_MIN", 0 if request.param == "parallel" else 1 << 62)
    return request.param


def rnd(*shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def T(a, grad=True):
    return torch.tensor(a, requires_grad=grad)


def close(a, b, rtol=RTOL, atol=ATOL):
    b = b.detach().numpy() if isinstance(b, torch.Tensor) else np.asarray(b)
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    assert a.shape == b.shape, (a.shape, b.shape)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol * max(1.0, np.abs(b).max()))


def fd_check(f, inputs, grads, which, eps=1e-6, tol=1e-6):
    """Compare analytic grads of sum(f(*inputs) * r) with central differences.
    `grads(r)` returns the analytic gradients of the inputs listed in `which`."""
    r = rnd(*np.shape(f(*inputs)), seed=99, dtype=np.float64)
    for k, g in zip(which, grads(r)):
        x = inputs[k]
        num = np.empty_like(x)
        for i in np.ndindex(x.shape):
            old = x[i]
            x[i] = old + eps
            lp = np.sum(f(*inputs) * r)
            x[i] = old - eps
            lm = np.sum(f(*inputs) * r)
            x[i] = old
            num[i] = (lp - lm) / (2 * eps)
        np.testing.assert_allclose(g, num, rtol=tol, atol=tol)


# ---------------------------------------------------------------- conv

CONV_CASES = [
    # x shape, w shape, stride, pad, dilation, groups
    ((2, 3, 7, 5), (4, 3, 3, 3), 1, 1, 1, 1),
    ((3, 4, 9, 6), (6, 2, 3, 2), (2, 1), (1, 2), (2, 1), 2),
    ((2, 6, 5, 8), (6, 1, 3, 3), 2, 1, 1, 6),           # depthwise
    ((16, 8, 4, 4), (8, 8, 3, 3), 1, 1, 1, 1),          # many images per GEMM
    ((5, 8, 6, 6), (12, 8, 1, 1), 2, 0, 1, 1),          # strided 1x1 shortcut
    ((2, 3, 6, 6), (4, 3, 5, 5), 3, 2, 1, 1),           # kernel > stride, uneven cover
]


@pytest.mark.parametrize("xs,ws,s,p,d,g", CONV_CASES)
def test_conv2d_vs_torch(path, xs, ws, s, p, d, g):
    x, w, b = rnd(*xs, seed=1), rnd(*ws, seed=2), rnd(ws[0], seed=3)
    tx, tw, tb = T(x), T(w), T(b)
    ty = F.conv2d(tx, tw, tb, stride=s, padding=p, dilation=d, groups=g)
    y = K.conv2d(x, w, b, s, p, d, g)
    close(y, ty)
    gy = rnd(*y.shape, seed=4)
    ty.backward(torch.tensor(gy))
    gx, gw, gb = K.conv2d_backward(x, w, gy, s, p, d, g)
    close(gx, tx.grad)
    close(gw, tw.grad)
    close(gb, tb.grad)


ONE_IMAGE = [
    # x shape, w shape, stride, pad, dilation: row bands shared out between threads
    ((1, 16, 28, 28), (16, 16, 3, 3), 1, 1, 1),     # 28 rows: bands of 7, not 9+9+9+1
    ((1, 16, 29, 29), (24, 16, 3, 3), 2, 1, 1),     # strided, odd size
    ((1, 8, 31, 31), (12, 8, 5, 5), 1, 2, 2),       # dilated, wide halo
    ((1, 3, 40, 40), (16, 3, 7, 7), 2, 3, 1),       # an RGB stem
    ((1, 64, 14, 14), (96, 64, 1, 1), 1, 0, 1),     # 1x1: gw written, not added to
    ((1, 32, 9, 9), (48, 32, 1, 1), 2, 0, 1),
]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("xs,ws,s,p,d", ONE_IMAGE)
def test_conv_of_one_image_vs_torch(threads, xs, ws, s, p, d):
    """One image: the threads split its row bands (each converting only the rows its
    bands read) or its channels. gw goes into a NaN-filled buffer: a kernel that added
    to it instead of writing it would show."""
    from netdsl.kernels import native
    before = native.get_num_threads()
    native.set_num_threads(threads)
    try:
        x, w = rnd(*xs, seed=1), rnd(*ws, seed=2)
        tx, tw = T(x), T(w)
        ty = F.conv2d(tx, tw, stride=s, padding=p, dilation=d)
        close(K.conv2d(x, w, None, s, p, d), ty)
        gy = rnd(*ty.shape, seed=3)
        ty.backward(torch.tensor(gy))
        gx, gw, _ = K.conv2d_backward(x, w, gy, s, p, d, gw_out=np.full(w.shape, np.nan, np.float32))
        close(gw, tw.grad)
        close(gx, tx.grad)
        _, gw, _ = K.conv2d_backward(x, w, gy, s, p, d, need_gx=False)     # the band-split gw pass
        close(gw, tw.grad)
    finally:
        native.set_num_threads(before)


def test_conv2d_no_bias_and_no_gx():
    x, w = rnd(2, 3, 6, 6), rnd(5, 3, 3, 3, seed=1)
    close(K.conv2d(x, w), F.conv2d(T(x), T(w)))
    gy = rnd(2, 5, 4, 4, seed=2)
    gx, gw, _ = K.conv2d_backward(x, w, gy, need_gx=False)
    assert gx is None
    close(gw, K.conv2d_backward(x, w, gy)[1])


@pytest.mark.parametrize("xs,ws,s,p,d,g", [CONV_CASES[1], CONV_CASES[2], CONV_CASES[5]])
def test_conv2d_finite_differences(xs, ws, s, p, d, g):
    xs = (2,) + xs[1:3] + (min(xs[3], 5),)
    x, w = rnd(*xs, seed=5, dtype=np.float64), rnd(*ws, seed=6, dtype=np.float64)
    fd_check(lambda x, w: K.conv2d(x, w, None, s, p, d, g), [x, w],
             lambda r: K.conv2d_backward(x, w, r, s, p, d, g)[:2], [0, 1])


TCONV_CASES = [
    ((2, 4, 5, 3), (4, 3, 3, 3), 2, 1, 1, 1, 1),
    ((3, 4, 4, 5), (4, 2, 3, 2), (2, 3), (1, 0), (1, 2), (2, 1), 2),
    ((16, 8, 3, 3), (8, 4, 4, 4), 2, 1, 0, 1, 1),
]


@pytest.mark.parametrize("xs,ws,s,p,op,d,g", TCONV_CASES)
def test_conv_transpose2d_vs_torch(path, xs, ws, s, p, op, d, g):
    x, w, b = rnd(*xs, seed=1), rnd(*ws, seed=2), rnd(ws[1] * g, seed=3)
    tx, tw, tb = T(x), T(w), T(b)
    ty = F.conv_transpose2d(tx, tw, tb, stride=s, padding=p, output_padding=op, groups=g, dilation=d)
    y = K.conv_transpose2d(x, w, b, s, p, op, d, g)
    close(y, ty)
    gy = rnd(*y.shape, seed=4)
    ty.backward(torch.tensor(gy))
    gx, gw, gb = K.conv_transpose2d_backward(x, w, gy, s, p, op, d, g)
    close(gx, tx.grad)
    close(gw, tw.grad)
    close(gb, tb.grad)


def test_conv_errors():
    with pytest.raises(ValueError):
        K.conv2d(rnd(1, 3, 5, 5), rnd(4, 2, 3, 3))          # channel mismatch
    with pytest.raises(ValueError):
        K.conv2d(rnd(1, 3, 2, 2), rnd(4, 3, 3, 3))          # empty output


# ---------------------------------------------------------------- linear

@pytest.mark.parametrize("n,k,m", [(3, 5, 4), (64, 40, 30)])
def test_linear_vs_torch(path, n, k, m):
    x, w, b = rnd(n, k), rnd(m, k, seed=1), rnd(m, seed=2)
    tx, tw, tb = T(x), T(w), T(b)
    ty = F.linear(tx, tw, tb)
    y = K.linear(x, w, b)
    close(y, ty)
    gy = rnd(n, m, seed=3)
    ty.backward(torch.tensor(gy))
    gx, gw, gb = K.linear_backward(x, w, gy)
    close(gx, tx.grad)
    close(gw, tw.grad)
    close(gb, tb.grad)


# ---------------------------------------------------------------- pooling

POOL_CASES = [
    # kernel, stride, pad, ceil_mode, input HxW
    (2, 2, 0, False, (6, 8)),
    (3, 2, 1, False, (7, 6)),
    (3, 2, 1, True, (8, 7)),
    ((3, 2), (2, 1), (1, 0), True, (6, 5)),
    (3, 3, 0, True, (7, 5)),
]


@pytest.mark.parametrize("k,s,p,ceil,hw", POOL_CASES)
def test_maxpool_and_unpool_vs_torch(path, k, s, p, ceil, hw):
    x = rnd(2, 3, *hw)
    tx = T(x)
    ty, tidx = F.max_pool2d(tx, k, s, p, ceil_mode=ceil, return_indices=True)
    y, idx = K.maxpool2d(x, k, s, p, ceil)
    close(y, ty)
    np.testing.assert_array_equal(idx, tidx.numpy())
    gy = rnd(*y.shape, seed=1)
    ty.backward(torch.tensor(gy))
    close(K.maxpool2d_backward(gy, idx, x.shape), tx.grad)

    # unpool back to the input size, and its backward
    tu = T(y)
    tz = F.max_unpool2d(tu, tidx, k, s, p, output_size=hw)
    z = K.max_unpool2d(y, idx, k, s, p, output_size=hw)
    close(z, tz)
    gz = rnd(*z.shape, seed=2)
    tz.backward(torch.tensor(gz))
    close(K.max_unpool2d_backward(gz, idx), tu.grad)


def test_maxpool_nan_and_int32_switches():
    x = rnd(1, 1, 4, 4)
    x[0, 0, 1, 1] = np.nan
    y, idx = K.maxpool2d(x, 2)
    ty, tidx = F.max_pool2d(torch.tensor(x), 2, return_indices=True)
    np.testing.assert_array_equal(idx, tidx.numpy())
    assert np.isnan(y[0, 0, 0, 0]) and idx.dtype == np.int32


@pytest.mark.parametrize("k,s,p,ceil,hw", POOL_CASES)
@pytest.mark.parametrize("include_pad", [True, False])
def test_avgpool_vs_torch(path, k, s, p, ceil, hw, include_pad):
    x = rnd(2, 3, *hw)
    tx = T(x)
    ty = F.avg_pool2d(tx, k, s, p, ceil_mode=ceil, count_include_pad=include_pad)
    close(K.avgpool2d(x, k, s, p, ceil, include_pad), ty)
    gy = rnd(*ty.shape, seed=1)
    ty.backward(torch.tensor(gy))
    close(K.avgpool2d_backward(gy, x.shape, k, s, p, ceil, include_pad), tx.grad)


def test_pool_finite_differences():
    x = rnd(1, 2, 5, 4, seed=3, dtype=np.float64)
    args = (3, 2, 1, True)
    fd_check(lambda x: K.avgpool2d(x, *args), [x],
             lambda r: [K.avgpool2d_backward(r, x.shape, *args)], [0])
    fd_check(lambda x: K.maxpool2d(x, *args)[0], [x],
             lambda r: [K.maxpool2d_backward(r, K.maxpool2d(x, *args)[1], x.shape)], [0])
    fd_check(lambda x: K.upsample_bilinear2d(x, (7, 9)), [x],
             lambda r: [K.upsample_bilinear2d_backward(r, x.shape)], [0])


def test_global_avgpool_vs_torch(path):
    x = rnd(3, 4, 5, 7)
    tx = T(x)
    ty = F.adaptive_avg_pool2d(tx, 1)
    close(K.global_avgpool2d(x), ty)
    gy = rnd(3, 4, 1, 1, seed=1)
    ty.backward(torch.tensor(gy))
    close(K.global_avgpool2d_backward(gy, x.shape), tx.grad)


@pytest.mark.parametrize("scale", [2, (2, 3)])
def test_upsample_nearest_vs_torch(path, scale):
    x = rnd(2, 3, 4, 5)
    tx = T(x)
    ty = F.interpolate(tx, scale_factor=scale, mode="nearest")
    close(K.upsample_nearest2d(x, scale), ty)
    gy = rnd(*ty.shape, seed=1)
    ty.backward(torch.tensor(gy))
    close(K.upsample_nearest2d_backward(gy, scale), tx.grad)


@pytest.mark.parametrize("size,scale", [(None, 2), ((7, 5), None), ((3, 11), None)])
def test_upsample_bilinear_vs_torch(path, size, scale):
    x = rnd(2, 3, 4, 5)
    tx = T(x)
    ty = F.interpolate(tx, size=size, scale_factor=scale, mode="bilinear", align_corners=False)
    close(K.upsample_bilinear2d(x, size, scale), ty)
    gy = rnd(*ty.shape, seed=1)
    ty.backward(torch.tensor(gy))
    close(K.upsample_bilinear2d_backward(gy, x.shape, scale), tx.grad)


# ---------------------------------------------------------------- normalisation

@pytest.mark.parametrize("size,alpha,beta,k", [(5, 1e-4, 0.75, 1.0), (2, 0.5, 0.6, 2.0), (4, 1.0, 1.2, 0.5)])
def test_lrn_vs_torch(path, size, alpha, beta, k):
    x = rnd(2, 7, 3, 4)
    tx = T(x)
    ty = F.local_response_norm(tx, size, alpha, beta, k)
    y, scale = K.local_response_norm(x, size, alpha, beta, k)
    close(y, ty)
    gy = rnd(*y.shape, seed=1)
    ty.backward(torch.tensor(gy))
    close(K.local_response_norm_backward(x, scale, gy, size, alpha, beta), tx.grad)


def test_lrn_finite_differences():
    x = rnd(1, 5, 2, 3, seed=2, dtype=np.float64)
    a = (4, 0.7, 0.8, 1.5)
    fd_check(lambda x: K.local_response_norm(x, *a)[0], [x],
             lambda r: [K.local_response_norm_backward(x, K.local_response_norm(x, *a)[1], r, *a[:3])], [0])


@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (8, 5), (3, 4, 7)])
def test_batchnorm_train_vs_torch(path, shape):
    C = shape[1]
    x, g, b = rnd(*shape) * 3 + 1, rnd(C, seed=1), rnd(C, seed=2)
    rm, rv = rnd(C, seed=3), np.abs(rnd(C, seed=4)) + 0.5
    trm, trv = torch.tensor(rm), torch.tensor(rv)
    tx, tg, tb = T(x), T(g), T(b)
    ty = F.batch_norm(tx, trm, trv, tg, tb, training=True, momentum=0.2, eps=1e-5)
    train = K.batchnorm2d_train if len(shape) == 4 else K.batchnorm1d_train
    y, mean, invstd = train(x, g, b, rm, rv, momentum=0.2, eps=1e-5)
    close(y, ty)
    close(rm, trm)
    close(rv, trv)
    gy = rnd(*shape, seed=5)
    ty.backward(torch.tensor(gy))
    gx, gg, gb = K.batchnorm_backward(x, gy, g, mean, invstd)
    close(gx, tx.grad)
    close(gg, tg.grad)
    close(gb, tb.grad)
    # inference with the updated running stats
    close(K.batchnorm_infer(x, g, b, rm, rv), F.batch_norm(T(x, False), trm, trv, tg, tb, training=False))


def test_batchnorm_finite_differences():
    x, g = rnd(3, 2, 2, 3, seed=1, dtype=np.float64), rnd(2, seed=2, dtype=np.float64)

    def grads(r):
        _, mean, invstd = K.batchnorm_train(x, g)
        return K.batchnorm_backward(x, r, g, mean, invstd)[:2]
    fd_check(lambda x, g: K.batchnorm_train(x, g)[0], [x, g], grads, [0, 1])


def test_dropout():
    x = rnd(50, 40) + 2
    y, mask = K.dropout(x, 0.3, seed=7)
    assert mask.dtype == np.uint8 and y.dtype == np.float32
    assert abs(mask.mean() - 0.7) < 0.03
    np.testing.assert_array_equal(y, np.where(mask, x * np.float32(1 / 0.7), 0).astype(np.float32))
    np.testing.assert_array_equal(K.dropout(x, 0.3, seed=7)[1], mask)     # seed is reproducible
    assert (K.dropout(x, 0.3, seed=8)[1] != mask).any()
    y2, _ = K.dropout(x * 2, 0.3, mask=mask)
    np.testing.assert_allclose(y2, 2 * y, rtol=1e-6)
    gy = rnd(50, 40, seed=1)
    np.testing.assert_allclose(K.dropout_backward(gy, mask, 0.3), gy * mask / np.float32(0.7), rtol=1e-6)
    assert not K.dropout(x, 1.0, seed=1)[0].any()


# ---------------------------------------------------------------- losses

@pytest.mark.parametrize("ignore", [False, True])
def test_softmax_cross_entropy_vs_torch(path, ignore):
    z = rnd(9, 6) * 4
    lab = np.random.default_rng(1).integers(0, 6, 9)
    if ignore:
        lab[[2, 5]] = -1
    tz = T(z)
    tl = F.cross_entropy(tz, torch.tensor(lab), ignore_index=-1)
    loss, probs = K.softmax_cross_entropy(z, lab, ignore_index=-1)
    close(np.asarray(loss), tl)
    close(probs, torch.softmax(torch.tensor(z), 1))
    tl.backward(torch.tensor(1.5))
    close(K.softmax_cross_entropy_backward(probs, lab, -1, gloss=1.5), tz.grad)


def test_softmax_cross_entropy_extreme_logits():
    z = np.array([[1000.0, 0.0, -1000.0]], np.float32)
    loss, _ = K.softmax_cross_entropy(z, [2])
    assert np.isclose(loss, 2000.0) and loss.dtype == np.float32
    with pytest.raises(ValueError):
        K.softmax_cross_entropy(z, [3])


LOSSES = [
    ("mse", K.mse_loss, K.mse_loss_backward, lambda a, b: F.mse_loss(a, b)),
    ("smooth_l1", K.smooth_l1_loss, K.smooth_l1_loss_backward, lambda a, b: F.smooth_l1_loss(a, b, beta=1.0)),
    ("bce", K.bce_with_logits, K.bce_with_logits_backward,
     lambda a, b: F.binary_cross_entropy_with_logits(a, b)),
]


@pytest.mark.parametrize("name,fwd,bwd,ref", LOSSES)
def test_pointwise_losses_vs_torch(path, name, fwd, bwd, ref):
    a = rnd(7, 5) * 3
    b = np.random.default_rng(2).random((7, 5)).astype(np.float32) if name == "bce" else rnd(7, 5, seed=2)
    ta = T(a)
    tl = ref(ta, torch.tensor(b))
    loss = fwd(a, b)
    assert loss.dtype == np.float32
    close(np.asarray(loss), tl)
    tl.backward(torch.tensor(0.7))
    close(bwd(a, b, 0.7), ta.grad)


def test_losses_finite_differences():
    a = rnd(3, 4, seed=1, dtype=np.float64) * 2
    b = rnd(3, 4, seed=2, dtype=np.float64)
    for _, fwd, bwd, _ in LOSSES:
        fd_check(lambda a: np.array(fwd(a, b)), [a], lambda r: [bwd(a, b, float(r))], [0])
    lab = np.array([0, 3, -1])
    fd_check(lambda a: np.array(K.softmax_cross_entropy(a, lab)[0]), [a],
             lambda r: [K.softmax_cross_entropy_backward(K.softmax_cross_entropy(a, lab)[1], lab, gloss=float(r))],
             [0])


def test_float32_is_preserved():
    x = rnd(2, 4, 6, 6)
    outs = [K.conv2d(x, rnd(4, 4, 3, 3)), K.maxpool2d(x, 2)[0], K.avgpool2d(x, 3, 1, 1),
            K.upsample_bilinear2d(x, scale_factor=2), K.local_response_norm(x, 3)[0],
            K.batchnorm2d_train(x)[0], K.linear(x.reshape(2, -1), rnd(3, 144))]
    assert all(o.dtype == np.float32 for o in outs)


@pytest.mark.parametrize("N,C,O,H,k,s,p,d", [
    (8, 64, 128, 2, 3, 1, 1, 1),     # ResNet layer3/4 at 32x32 input: the small-image path
    (4, 32, 64, 4, 3, 2, 1, 1),      # strided
    (3, 16, 64, 2, 3, 1, 2, 2),      # dilated
    (6, 8, 96, 1, 3, 1, 1, 1),       # 1x1 image, 3x3 kernel: only the centre tap sees data
    (16, 48, 130, 2, 3, 1, 1, 1),    # big enough for the parallel kernels; 130 = 2 uneven column shares
    (32, 130, 64, 2, 3, 2, 1, 1),    # strided 2x2 -> 1x1 (ResNet's layer4.0.conv1), parallel
    # more than 4 pixels: w @ im2col in the weights' own layout (ResNet-50's layer3/4 at batch 1)
    (1, 64, 64, 7, 3, 1, 1, 1),
    (2, 96, 130, 7, 3, 1, 1, 1),     # two images (gw accumulates), uneven shares
    (1, 48, 64, 14, 3, 2, 1, 1),     # strided 14x14 -> 7x7 (layer4.0.conv2)
    (1, 40, 72, 9, 3, 1, 2, 2),      # dilated
])
def test_conv_small_image_path_matches_torch(N, C, O, H, k, s, p, d):
    from netdsl.kernels.cpu import conv_small
    from netdsl.kernels.cpu.conv import _Geom
    rng = np.random.default_rng(7)
    x = rng.standard_normal((N, C, H, H)).astype(np.float32)
    w = rng.standard_normal((O, C, k, k)).astype(np.float32)
    b = rng.standard_normal(O).astype(np.float32)
    assert conv_small.usable(_Geom(x.shape, w.shape, s, p, d, 1))
    xt, wt, bt = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    yt = torch.nn.functional.conv2d(xt, wt, bt, s, p, d)
    gy = rng.standard_normal(yt.shape).astype(np.float32)
    yt.backward(torch.tensor(gy))
    y = K.conv2d(x, w, b, s, p, d)
    gx, gw, gb = K.conv2d_backward(x, w, gy, s, p, d)
    for ours, ref in ((y, yt.detach()), (gx, xt.grad), (gw, wt.grad), (gb, bt.grad)):
        assert np.abs(ours - ref.numpy()).max() <= 1e-4 * np.abs(ref.numpy()).max()
    _, gw_only, _ = K.conv2d_backward(x, w, gy, s, p, d, need_gx=False)
    assert np.array_equal(gw_only, gw)


@pytest.mark.parametrize("xshape,wshape,s,p", [
    ((4, 8, 2, 2), (16, 8, 3, 3), 1, 1),      # small-image path
    ((4, 8, 9, 9), (16, 8, 3, 3), 2, 1),      # im2col path
    ((4, 8, 6, 6), (16, 8, 1, 1), 1, 0),      # 1x1 path
])
def test_weight_gradient_goes_into_a_given_buffer(xshape, wshape, s, p):
    rng = np.random.default_rng(3)
    x, w = rng.standard_normal(xshape).astype(np.float32), rng.standard_normal(wshape).astype(np.float32)
    gy = rng.standard_normal(K.conv2d(x, w, None, s, p).shape).astype(np.float32)
    _, fresh, _ = K.conv2d_backward(x, w, gy, s, p)
    buf = np.full(w.shape, np.nan, np.float32)
    _, gw, _ = K.conv2d_backward(x, w, gy, s, p, gw_out=buf)
    assert gw is buf and np.array_equal(buf, fresh)
    xl, wl, gl = x.reshape(4, -1), rng.standard_normal((5, x[0].size)).astype(np.float32), \
        rng.standard_normal((4, 5)).astype(np.float32)
    buf = np.full(wl.shape, np.nan, np.float32)
    assert K.linear_backward(xl, wl, gl, gw_out=buf)[1] is buf
    assert np.array_equal(buf, K.linear_backward(xl, wl, gl)[1])


@pytest.mark.parametrize("xshape,wshape,p,d,G", [
    ((3, 8, 4, 4), (12, 4, 3, 3), 1, 1, 2),          # grouped
    ((2, 6, 4, 4), (5, 6, 3, 3), 2, 2, 1),           # dilated, padding = reach
    ((2, 4, 3, 4), (6, 4, 3, 1), (1, 0), 1, 1),      # non-square kernel and padding
    ((2, 4, 4, 4), (6, 4, 3, 3), 0, 1, 1),           # no padding
])
def test_data_gradient_as_a_forward_conv_matches_torch(xshape, wshape, p, d, G):
    from netdsl.kernels.cpu.conv import _Geom
    assert _Geom(xshape, wshape, 1, p, d, G).gx_as_conv()
    rng = np.random.default_rng(11)
    x, w = rng.standard_normal(xshape).astype(np.float32), rng.standard_normal(wshape).astype(np.float32)
    xt, wt = torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True)
    yt = F.conv2d(xt, wt, None, 1, p, d, G)
    gy = rng.standard_normal(yt.shape).astype(np.float32)
    yt.backward(torch.tensor(gy))
    gx, gw, _ = K.conv2d_backward(x, w, gy, 1, p, d, G)
    close(gx, xt.grad)
    close(gw, wt.grad)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_all_finite_finds_one_bad_element_anywhere(dtype):
    from netdsl.kernels.cpu.optim import all_finite
    x = rnd(3, 70001).astype(dtype)         # several blocks, a partial last one
    assert all_finite([x, x[:0]])
    for v in (np.inf, -np.inf, np.nan):
        for at in (0, 65535, 65536, x.size - 1):
            y = x.copy()
            y.reshape(-1)[at] = v
            assert not all_finite([x, y]), (v, at)
    assert all_finite([np.full(5, np.finfo(dtype).max, dtype)])


def test_transposed_conv_of_a_small_image_matches_torch():
    # its forward is the backward-data of a conv on 2x2 images: the small-image path
    x, w = rnd(3, 8, 2, 2), rnd(8, 6, 3, 3, seed=1)
    xt, wt = torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True)
    yt = F.conv_transpose2d(xt, wt, None, 1, 1)
    close(K.conv_transpose2d(x, w, None, 1, 1), yt)
    gy = rnd(*yt.shape, seed=2)
    yt.backward(torch.tensor(gy))
    gx, gw, _ = K.conv_transpose2d_backward(x, w, gy, 1, 1)
    close(gx, xt.grad)
    close(gw, wt.grad)


@pytest.mark.parametrize("xshape,wshape,s,p,groups", [
    ((1, 16, 20, 20), (24, 16, 3, 3), 1, 1, 1),      # gx as a forward conv, gw over row bands
    ((1, 32, 18, 18), (16, 32, 3, 3), 1, 1, 1),      # per-tap bands (K = KW*C >= 64)
    ((1, 16, 21, 21), (24, 16, 3, 3), 2, 1, 1),      # strided: with gx, one thread per image
    ((3, 16, 20, 20), (24, 16, 3, 3), 1, 1, 1),      # more images than threads
    ((1, 17, 20, 20), (25, 17, 1, 1), 1, 0, 1),      # 1x1: channel slices per thread (odd counts)
    ((1, 32, 41, 41), (48, 32, 1, 1), 2, 0, 1),      # 1x1 strided: slices of the picked columns
    ((1, 32, 20, 20), (24, 16, 1, 1), 1, 0, 2),      # 1x1 in two groups
])
def test_conv_with_fewer_images_than_threads_matches_torch(xshape, wshape, s, p, groups):
    from netdsl.kernels.cpu import conv as C
    g = C._Geom(xshape, wshape, s, p, 1, groups)
    if g.pointwise and numba.get_num_threads() > 1:     # the case under test: channel slices
        assert g.split1(C._fwd1)[3] > 1 and g.split1(C._bwd1)[3] > 1
    rng = np.random.default_rng(5)
    x, w = rng.standard_normal(xshape).astype(np.float32), rng.standard_normal(wshape).astype(np.float32)
    b = rng.standard_normal(wshape[0]).astype(np.float32)
    xt, wt = torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True)
    yt = F.conv2d(xt, wt, torch.tensor(b), s, p, 1, groups)
    close(K.conv2d(x, w, b, s, p, 1, groups), yt)
    gy = rng.standard_normal(yt.shape).astype(np.float32)
    yt.backward(torch.tensor(gy))
    gx, gw, _ = K.conv2d_backward(x, w, gy, s, p, 1, groups)
    close(gx, xt.grad)
    close(gw, wt.grad)
    close(K.conv2d_backward(x, w, gy, s, p, 1, groups, need_gx=False)[1], wt.grad)   # band items: another sum order
