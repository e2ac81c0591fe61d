"""The CUDA kernels against the CPU kernels, under Numba's CUDA simulator.

`NUMBA_ENABLE_CUDASIM=1` must be set before numba is imported, so the checks run
in subprocesses (this file run as a script). Every CUDA kernel, forward and
backward, is compared with its CPU twin on small shapes (the simulator runs each
thread in Python), and one training step of a small CNN through the executor on
the CUDA target is compared with the same step on the CPU: loss and every
gradient to 1e-4 relative.

On a real GPU (`scripts/gpu-check`) the same script runs with the simulator off
(`python tests/test_cuda_sim.py device`); it then also checks that each kernel was
compiled for exactly the signature `tests/test_cuda_ptx.py` compiles it for.
"""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import script_results

HERE = Path(__file__).resolve()
TOL = 1e-4
GROUPS = ("gemm", "other", "train")    # subprocesses, run side by side


@pytest.fixture(scope="module")
def results():
    return script_results(HERE, dict.fromkeys(GROUPS, True), timeout=600)


@pytest.mark.parametrize("group", ["gemm", "other"])
def test_every_kernel_matches_cpu(results, group):
    errs = results[group]["errors"]
    bad = {k: v for k, v in errs.items() if not v <= TOL}
    assert not bad, bad
    assert len(errs) >= {"gemm": 19, "other": 75}[group]


def test_every_cpu_operator_has_a_cuda_kernel(results):
    r = results["other"]
    assert r["missing"] == [] and r["ops"] >= 50


def test_dropout_mask_is_the_cpu_mask(results):
    assert results["other"]["dropout_mask_equal"]


def test_small_cnn_training_step_matches_cpu(results):
    r = results["train"]
    assert r["grads"] and set(r["grads"]) == set(r["expect_grads"])
    assert r["loss"] <= TOL, r
    worst = max(r["grads"], key=r["grads"].get)
    assert r["grads"][worst] <= TOL, (worst, r["grads"][worst])
    assert r["running"] <= TOL and r["logits"] <= TOL
    assert r["params_on_device"] and r["grads_on_device"]


def test_scan_training_step_matches_cpu(results):
    r = results["train"]["scan"]
    assert r["grads"] and set(r["grads"]) == set(r["expect_grads"])
    assert r["loss"] <= TOL and r["logits"] <= TOL, r
    worst = max(r["grads"], key=r["grads"].get)
    assert r["grads"][worst] <= TOL, (worst, r["grads"][worst])


def test_optimiser_steps_on_device_match_cpu(results):
    errs = results["train"]["optimizer"]
    assert len(errs) == 9 and max(errs.values()) <= 1e-5, errs


def test_error_check_can_fail(results):
    """The comparison sees a wrong kernel: a perturbed result is reported as an error."""
    assert results["gemm"]["control"] > 1e-2


def test_device_cuda_without_a_gpu_is_a_clear_error():
    from helpers import SPECS, cli
    from netdsl.runtime.cuda import gpu_available
    p = cli("run", SPECS / "digits_cnn.net", "--device", "cuda", "--epochs", "1")
    assert "Traceback" not in p.stderr
    if not gpu_available():
        assert p.returncode == 2 and "no CUDA GPU" in p.stderr, p.stderr


# ---------------------------------------------------------------- the subprocess side

def rel(got, want):
    got = got.copy_to_host() if hasattr(got, "copy_to_host") else np.asarray(got)
    want = np.asarray(want)
    if got.shape != want.shape and got.size == want.size == 1:
        got = got.reshape(want.shape)
    assert got.shape == want.shape, (got.shape, want.shape)
    if got.dtype.kind in "iub":
        return float(not np.array_equal(got, want))
    d = np.abs(got.astype(np.float64) - want)
    return float(d.max() / max(np.abs(want).max(), 1e-6)) if d.size else 0.0


def _setup(seed):
    from netdsl.kernels import cpu as C, cuda as G
    rng = np.random.default_rng(seed)
    return C, G, rng, (lambda *s: rng.standard_normal(s).astype(np.float32)), G.to_device


def both(name, g, c):
    return name, g, c


def _gemm_cases():
    """(name, cuda result, cpu result): convolutions and linear layers, forward and backward."""
    C, G, rng, r, d = _setup(0)
    out = []
    # convolution: stride, padding, dilation, groups; 1x1 (direct columns); transposed
    for tag, xs, ws, a in (("s2p1g2", (2, 4, 6, 6), (6, 2, 3, 3), (2, 1, 1, 2)),
                           ("dil2", (1, 3, 7, 7), (4, 3, 3, 3), (1, 2, 2, 1)),
                           ("1x1", (2, 5, 3, 3), (3, 5, 1, 1), (1, 0, 1, 1))):
        x, w, b = r(*xs), r(*ws), r(ws[0])
        y = C.conv2d(x, w, b, *a)
        gy = r(*y.shape)
        out.append(both(f"conv_{tag}", G.conv2d(d(x), d(w), d(b), *a), y))
        cg = C.conv2d_backward(x, w, gy, *a)
        gg = G.conv2d_backward(d(x), d(w), d(gy), *a)
        out += [both(f"conv_{tag}_g{k}", gg[i], cg[i]) for i, k in enumerate("xwb")]
    x, w, b = r(2, 4, 3, 3), r(4, 3, 3, 3), r(3)
    y = C.conv_transpose2d(x, w, b, 2, 1, 1)
    gy = r(*y.shape)
    out.append(both("conv_transpose", G.conv_transpose2d(d(x), d(w), d(b), 2, 1, 1), y))
    cg, gg = C.conv_transpose2d_backward(x, w, gy, 2, 1, 1), G.conv_transpose2d_backward(d(x), d(w), d(gy), 2, 1, 1)
    out += [both(f"conv_transpose_g{k}", gg[i], cg[i]) for i, k in enumerate("xwb")]
    # weight gradients whose K split (image, pixel) has fewer pixels than a K tile: L = 1 and 4
    for tag, xs, ws, a in (("L1", (3, 4, 3, 3), (5, 4, 3, 3), (1, 0, 1, 1)),
                           ("L4g2", (2, 4, 4, 4), (6, 2, 3, 3), (2, 1, 1, 2))):
        x, w = r(*xs), r(*ws)
        gy = r(*C.conv2d(x, w, None, *a).shape)
        out.append(both(f"conv_{tag}_gw", G.conv2d_backward(d(x), d(w), d(gy), *a)[1],
                        C.conv2d_backward(x, w, gy, *a)[1]))
    out += _gemm_direct_cases(G, r, d)
    # linear, with a K long enough for two K tiles
    x, w, b = r(5, 37), r(7, 37), r(7)
    gy = r(5, 7)
    out.append(both("linear", G.linear(d(x), d(w), d(b)), C.linear(x, w, b)))
    cg, gg = C.linear_backward(x, w, gy), G.linear_backward(d(x), d(w), d(gy))
    out += [both(f"linear_g{k}", gg[i], cg[i]) for i, k in enumerate("xwb")]
    return out


def _gemm_direct_cases(G, r, d):
    """The GEMM kernel itself, each block tile forced: partial tiles, both load orders
    (k or m contiguous), batches and groups, bias per row and per column, accumulation,
    and K split as (k // kdiv, k % kdiv) with kdiv below the K tile, over several slices."""
    from netdsl.kernels.cuda.gemm import GEMMS, Operand

    def mat(arr, R, K, off, rs, ks, kdiv=0, kbs=0):     # the matrix an Operand describes
        i, k = np.arange(R)[:, None], np.arange(K)[None, :]
        kdiv = kdiv or K
        return arr[off + i * rs + k // kdiv * kbs + k % kdiv * ks].astype(np.float64)

    out = []
    for bm, bn in GEMMS:
        # A[M, K] and B[N, K] row-major: k contiguous; M and N one tile and a bit.
        M, N, K = bm + 3, bn - 5, 21
        a, b = r(M * K), r(N * K)
        c = G.empty((M, N), np.float32)
        G.gemm(Operand(d(a), K, 1), Operand(d(b), K, 1), Operand(c, N, 1), M, N, K, tile=(bm, bn, 1))
        out.append(both(f"gemm_{bm}x{bn}_kmajor", c, mat(a, M, K, 0, K, 1) @ mat(b, N, K, 0, K, 1).T))
    # A[K, M] and B[K, N] (m contiguous), Z1 = 2 batches x Z2 = 3 groups, bias per row, then += .
    M, N, K, Z1, Z2 = 10, 70, 19, 2, 3
    a, b, bias = r(Z2 * K * M + 1), r(Z1 * Z2 * K * N), r(Z2 * M)
    want = np.zeros((Z1, Z2, M, N))
    for z1 in range(Z1):
        for z2 in range(Z2):
            want[z1, z2] = mat(a, M, K, 1 + z2 * K * M, 1, M) @ mat(b, N, K, (z1 * Z2 + z2) * K * N, 1, N).T
    for bm, bn in ((64, 128), (64, 64)):
        c = G.empty((Z1, Z2, M, N), np.float32)
        args = (Operand(d(a), 1, M, off=1, z2=K * M), Operand(d(b), 1, N, z1=Z2 * K * N, z2=K * N),
                Operand(c, N, 1, z1=Z2 * M * N, z2=M * N), M, N, K, Z1, Z2)
        G.gemm(*args, bias=d(bias), bias_mode=1, bias_z2=M, tile=(bm, bn, 1))
        out.append(both(f"gemm_{bm}x{bn}_mmajor_batched_bias", c.copy_to_host(), want + bias.reshape(1, Z2, M, 1)))
        G.gemm(*args, accumulate=True, tile=(bm, bn, 1))
        out.append(both(f"gemm_{bm}x{bn}_mmajor_batched_acc", c, 2 * want + bias.reshape(1, Z2, M, 1)))
    # K = (outer, inner) with inner runs of kdiv = 1, 3 or 5 (below the K tile of 8), the
    # outer stride not kdiv * ks; K sliced over S blocks (atomic accumulation), bias per column.
    for kdiv, (bm, bn, S) in ((1, (64, 64, 2)), (3, (64, 64, 3)), (5, (128, 128, 2))):
        M, N, K = 9, 67, 7 * kdiv
        a, b, bias = r(M * (K // kdiv) * (kdiv + 2)), r(N * K * 2), r(N)
        A = Operand(d(a), kdiv, 1, kdiv=kdiv, kbs=M * kdiv + 1)       # rows kdiv apart, k-blocks M*kdiv+1
        B = Operand(d(b), 1, N, kdiv=kdiv, kbs=2 * kdiv * N)          # m contiguous, gaps between k-blocks
        c = G.empty((M, N), np.float32)
        G.gemm(A, B, Operand(c, N, 1), M, N, K, bias=d(bias), bias_mode=2, tile=(bm, bn, S))
        want = mat(a, M, K, 0, kdiv, 1, kdiv, M * kdiv + 1) @ mat(b, N, K, 0, 1, N, kdiv, 2 * kdiv * N).T
        out.append(both(f"gemm_{bm}x{bn}_kdiv{kdiv}_S{S}", c, want + bias))
    return out


def _other_cases():
    """(name, cuda result, cpu result): every other kernel, forward and backward."""
    C, G, rng, r, d = _setup(1)
    f32 = np.float32
    out = []
    # batch norm, train (with running stats) / infer / backward; a row longer than a block
    x = (r(3, 4, 7, 7) * 2 + 5).astype(f32)
    g, bb = r(4), r(4)
    rm, rv = r(4), np.abs(r(4)) + 0.5
    crm, crv, grm, grv = rm.copy(), rv.copy(), d(rm), d(rv)
    cy, cm, ci = C.batchnorm_train(x, g, bb, crm, crv, 0.1, 1e-5)
    gy_, gm, gi = G.batchnorm_train(d(x), d(g), d(bb), grm, grv, 0.1, 1e-5)
    out += [both("bn_train", gy_, cy), both("bn_mean", gm, cm), both("bn_invstd", gi, ci),
            both("bn_running_mean", grm, crm), both("bn_running_var", grv, crv)]
    gy = r(*x.shape)
    cg, gg = C.batchnorm_backward(x, gy, g, cm, ci), G.batchnorm_backward(d(x), d(gy), d(g), gm, gi)
    out += [both(f"bn_g{k}", gg[i], cg[i]) for i, k in enumerate(("x", "gamma", "beta"))]
    out.append(both("bn_infer", G.batchnorm_infer(d(x), d(g), d(bb), d(rm), d(rv), 1e-5),
                    C.batchnorm_infer(x, g, bb, rm, rv, 1e-5)))
    # LRN
    x = r(2, 6, 3, 3)
    cy, cs = C.local_response_norm(x, 5, 1e-2, 0.75, 2.0)
    gy_, gs = G.local_response_norm(d(x), 5, 1e-2, 0.75, 2.0)
    gy = r(*x.shape)
    out += [both("lrn", gy_, cy), both("lrn_g", G.local_response_norm_backward(d(x), gs, d(gy), 5, 1e-2, 0.75),
                                       C.local_response_norm_backward(x, cs, gy, 5, 1e-2, 0.75))]
    # dropout: the same mask bit for bit
    x = r(3, 50)
    cy, cmask = C.dropout(x, 0.3, seed=1234)
    gy_, gmask = G.dropout(d(x), 0.3, 1234)
    out += [both("dropout", gy_, cy), both("dropout_mask", gmask, cmask),
            both("dropout_g", G.dropout_backward(d(x), gmask, 0.3), C.dropout_backward(x, cmask, 0.3))]
    # pooling
    x = r(2, 3, 7, 7)
    for tag, a in (("k3s2p1", (3, 2, 1, False)), ("k2ceil", (2, 2, 0, True)), ("k3s1", (3, 1, 0, False))):
        cy, cs = C.maxpool2d(x, *a)
        gy_, gs = G.maxpool2d(d(x), *a)
        gy = r(*cy.shape)
        out += [both(f"maxpool_{tag}", gy_, cy), both(f"maxpool_{tag}_switch", gs, cs),
                both(f"maxpool_{tag}_g", G.maxpool2d_backward(d(gy), gs, x.shape, *a),
                     C.maxpool2d_backward(gy, cs, x.shape))]
        for inc in (True, False):
            ca = C.avgpool2d(x, *a, count_include_pad=inc)
            out += [both(f"avgpool_{tag}_{inc}", G.avgpool2d(d(x), *a, count_include_pad=inc), ca),
                    both(f"avgpool_{tag}_{inc}_g", G.avgpool2d_backward(d(gy), x.shape, *a, count_include_pad=inc),
                         C.avgpool2d_backward(gy, x.shape, *a, count_include_pad=inc))]
    gy = r(2, 3, 1, 1)
    out += [both("global_avgpool", G.global_avgpool2d(d(x)), C.global_avgpool2d(x)),
            both("global_avgpool_g", G.global_avgpool2d_backward(d(gy), x.shape),
                 C.global_avgpool2d_backward(gy, x.shape))]
    cy, cs = C.maxpool2d(x, x.shape[2:], 1, 0)
    gy_, gs = G.global_maxpool2d(d(x))
    out += [both("global_maxpool", gy_, cy),
            both("global_maxpool_g", G.maxpool2d_backward(d(gy), gs, x.shape, x.shape[2:], 1, 0),
                 C.maxpool2d_backward(gy, cs, x.shape))]
    # adaptive average pooling (uneven cells), against torch's cell rule as the CPU runtime has it
    from netdsl.runtime import cpu as rc
    ay = rc.adaptive_avgpool2d(x, (3, 2))
    gy = r(*ay.shape)
    out += [both("adaptive_avgpool", G.adaptive_avgpool2d(d(x), (3, 2)), ay),
            both("adaptive_avgpool_g", G.adaptive_avgpool2d_backward(d(gy), x.shape),
                 rc.adaptive_avgpool2d_backward(gy, x.shape))]
    # unpooling with switches
    cy, cs = C.maxpool2d(x[:, :, :6, :6].copy(), 2, 2)
    cs = cs.astype(np.int64)      # switches are i64 in the IR (the CPU kernel keeps int32)
    gy = r(2, 3, 6, 6)
    out += [both("max_unpool", G.max_unpool2d(d(cy), d(cs), 2, 2), C.max_unpool2d(cy, cs, 2, 2)),
            both("max_unpool_g", G.max_unpool2d_backward(d(gy), d(cs)), C.max_unpool2d_backward(gy, cs))]
    # upsampling
    x = r(1, 2, 3, 4)
    gy = r(1, 2, 6, 8)
    out += [both("upsample_nearest", G.upsample_nearest2d(d(x), 2), C.upsample_nearest2d(x, 2)),
            both("upsample_nearest_g", G.upsample_nearest2d_backward(d(gy), 2), C.upsample_nearest2d_backward(gy, 2)),
            both("upsample_bilinear", G.upsample_bilinear2d(d(x), 2.0), C.upsample_bilinear2d(x, scale_factor=2.0)),
            both("upsample_bilinear_g", G.upsample_bilinear2d_backward(d(gy), x.shape, 2.0),
                 C.upsample_bilinear2d_backward(gy, x.shape, scale_factor=2.0))]
    nails = np.zeros(gy.shape, f32)
    nails[:, :, ::2, ::2] = x
    out += [both("bed_of_nails", G.bed_of_nails(d(x), 2), nails),
            both("bed_of_nails_g", G.bed_of_nails_backward(d(gy), 2), gy[:, :, ::2, ::2])]
    # losses: cross-entropy with an ignored row and more classes than a reduction block
    z = r(5, 150) * 3
    lab = np.array([3, 149, -1, 0, 77])
    cl, cp = C.softmax_cross_entropy(z, lab, -1)
    gl, gp, cnt = G.softmax_cross_entropy(d(z), d(lab), -1)
    out += [both("cross_entropy", gl, np.array([cl])), both("cross_entropy_probs", gp, cp),
            both("cross_entropy_g", G.softmax_cross_entropy_backward(gp, d(lab), cnt, d(np.array([0.7], f32)), -1),
                 C.softmax_cross_entropy_backward(cp, lab, -1, 0.7))]
    none = np.full(5, -1)      # every row ignored: loss 0 and gradient 0 on both targets
    cl, cp = C.softmax_cross_entropy(z, none, -1)
    gl, gp, cnt = G.softmax_cross_entropy(d(z), d(none), -1)
    out += [both("cross_entropy_none", gl, np.array([cl])),
            both("cross_entropy_none_g", G.softmax_cross_entropy_backward(gp, d(none), cnt, d(np.array([0.7], f32)),
                                                                          -1),
                 C.softmax_cross_entropy_backward(cp, none, -1, 0.7))]
    a, t = r(4, 33), r(4, 33)
    tb = (rng.random((4, 33)) > 0.5).astype(f32)
    for name, cf, cb, gf, gb, tt, kw in (
            ("l2", C.mse_loss, C.mse_loss_backward, G.mse_loss, G.mse_loss_backward, t, {}),
            ("smooth_l1", C.smooth_l1_loss, C.smooth_l1_loss_backward, G.smooth_l1_loss,
             G.smooth_l1_loss_backward, t, {"beta": 0.5}),
            ("bce", C.bce_with_logits, C.bce_with_logits_backward, G.bce_with_logits,
             G.bce_with_logits_backward, tb, {})):
        out += [both(name, gf(d(a), d(tt), **kw), np.array([cf(a, tt, **kw)])),
                both(name + "_g", gb(d(a), d(tt), d(np.array([1.3], f32)), **kw), cb(a, tt, 1.3, **kw))]
        # weighted: per row / per element, each norm once, and a weight of all zeros
        for tag, w, norm in {"l2": (("row_weight", rng.random(4).astype(f32), "weight"),
                                    ("zero_weight", np.zeros(4, f32), "weight")),
                             "smooth_l1": (("elem_rows", tb, "rows"),),
                             "bce": (("row_elements", rng.random(4).astype(f32), "elements"),)}[name]:
            wc, wg = {**kw, "weight": w, "norm": norm}, {**kw, "weight": d(w), "norm": norm}
            out += [both(f"{name}_{tag}", gf(d(a), d(tt), **wg), np.array([cf(a, tt, **wc)])),
                    both(f"{name}_{tag}_g", gb(d(a), d(tt), d(np.array([1.3], f32)), **wg), cb(a, tt, 1.3, **wc))]
    # softmax family and reductions over an inner axis, structural ops: numpy is the CPU kernel
    x = r(2, 5, 3)
    gy = r(2, 5, 3)
    xl = r(3, 600)    # longer than a reduction block
    for log in (False, True):
        z = x - x.max(axis=1, keepdims=True)
        lse = np.log(np.exp(z).sum(axis=1, keepdims=True))
        y = z - lse if log else np.exp(z - lse)
        gx = gy - np.exp(y) * gy.sum(axis=1, keepdims=True) if log else y * (gy - (gy * y).sum(axis=1, keepdims=True))
        gy_ = G.softmax(d(x), 1, log)
        out += [both(f"softmax_log{log}", gy_, y), both(f"softmax_log{log}_g", G.softmax_backward(d(gy), gy_, 1, log), gx)]
    out += [both("sum", G.reduce_axis(d(x), 1), x.sum(axis=1)), both("mean_last", G.reduce_axis(d(x), -1, mean=True), x.mean(-1)),
            both("sum_long", G.reduce_axis(d(xl), 1), xl.sum(axis=1)),
            both("mean_g", G.broadcast_axis(d(gy[:, 0]), x.shape, 1, 0.2),
                 np.broadcast_to(gy[:, None, 0] * f32(0.2), x.shape)),
            both("transpose", G.transpose(d(x), (2, 0, 1)), x.transpose(2, 0, 1)),
            both("concat", G.concat([d(x), d(gy[:, :2])], 1), np.concatenate([x, gy[:, :2]], 1)),
            both("split", G.split(d(x), [2, 3], 1)[1], x[:, 2:]),
            both("slice", G.slice_(d(x), (slice(None), slice(1, None, 2), 0)), x[:, 1::2, 0]),
            both("slice_g", G.slice_backward(d(x[:, 1::2, 0].copy()), x.shape, (slice(None), slice(1, None, 2), 0)),
                 _scatter(x.shape, x[:, 1::2, 0])),
            both("sum_to", G.sum_to(d(x), (5, 1)), x.sum(axis=0).sum(axis=1, keepdims=True)),
            both("pad", G.pad(d(x), -1, 1, 2), np.pad(x, [(0, 0), (0, 0), (1, 2)])),
            both("broadcast_to", G.broadcast_to(d(x[:1, :, :1].copy()), x.shape), np.broadcast_to(x[:1, :, :1], x.shape))]
    # extract_patches: uneven stride and padding, windows partly outside the image
    x = r(2, 2, 5, 4)
    cy = C.extract_patches(x, 3, (2, 1), (1, 2))
    gy = r(*cy.shape)
    out += [both("extract_patches", G.extract_patches(d(x), 3, (2, 1), (1, 2)), cy),
            both("extract_patches_g", G.extract_patches_backward(d(gy), x.shape, 3, (2, 1), (1, 2)),
                 C.extract_patches_backward(gy, x.shape, 3, (2, 1), (1, 2)))]
    w = r(6, 4)
    ids = np.array([[1, 5, 1], [0, 1, 3]])
    gy = r(2, 3, 4)
    gw = np.zeros_like(w)
    np.add.at(gw, ids.reshape(-1), gy.reshape(-1, 4))
    out += [both("embedding", G.embedding(d(w), d(ids)), w[ids]),
            both("embedding_g", G.embedding_backward(d(gy), d(ids), w.shape), gw),
            both("one_hot", G.one_hot(d(ids), 6), np.eye(6, dtype=f32)[ids])]
    return out + _recurrent_cases(C, G, r, d)


def _recurrent_cases(C, G, r, d):
    """Cells (each kind, both LSTM gate orders), the hoisted step's accumulating backward,
    attention, the reads, sampling (the same indices) and argmax."""
    out = []
    N, D, H = 3, 5, 4
    x, h, c, gh, gc = r(N, D), r(N, H), r(N, H), r(N, H), r(N, H)
    for kind, G_, order in (("rnn", 1, "ifog"), ("lstm", 4, "ifog"), ("lstm", 4, "ifgo"), ("gru", 3, "ifog")):
        lstm = kind == "lstm"
        w = (r(G_ * H, D), r(G_ * H, H), r(G_ * H), r(G_ * H))
        cf = C.cell_forward(kind, x, h, c if lstm else None, *w, order)
        gf = G.cell_forward(kind, d(x), d(h), d(c) if lstm else None, *map(d, w), order)
        tag = f"{kind}_{order}"
        out += [both(f"{tag}_{k}", g, cv) for k, g, cv in zip(("h", "c", "acts"), gf, cf) if cv is not None]
        cb = C.cell_backward(kind, cf[2], gh, gc if lstm else None, x, h, c if lstm else None, w[0], w[1], order)
        gb = G.cell_backward(kind, gf[2], d(gh), d(gc) if lstm else None, d(x), d(h), d(c) if lstm else None,
                             d(w[0]), d(w[1]), order)
        out += [both(f"{tag}_g{k}", g, cv) for k, g, cv in zip(("x", "h", "c", "w_ih", "w_hh", "b_ih", "b_hh"), gb, cb)
                if cv is not None]
        # a time loop's step: gradients added to the previous steps' (accumulate)
        gw0, gb0 = r(G_ * H, H), r(G_ * H)
        cs = C.cell_step_backward(kind, cf[2], gh, None, h, c if lstm else None, w[1], order, gw0.copy(), gb0.copy(),
                                  accumulate=True)
        gs = G.cell_step_backward(kind, gf[2], d(gh), None, d(h), d(c) if lstm else None, d(w[1]), order, d(gw0),
                                  d(gb0), accumulate=True)
        out += [both(f"{tag}_step_g{k}", gs[i], cs[i]) for i, k in ((0, "xp"), (3, "w_hh_acc"), (4, "b_hh_acc"))]
    N, L, D, Q, A = 2, 3, 4, 5, 6
    f, q, wf, wq, b, ws = r(N, L, D), r(N, Q), r(A, D), r(A, Q), r(A), r(1, A)
    ca, cu = C.attention_scores(f, q, wf, wq, b, ws)
    ga, gu = G.attention_scores(d(f), d(q), d(wf), d(wq), d(b), d(ws))
    gw = r(N, L)
    out += [both("attention", ga, ca), both("attention_u", gu, cu)]
    out += [both(f"attention_g{k}", g, cv) for k, g, cv in zip(
        ("feats", "query", "w_feat", "w_query", "bias", "w_score"),
        G.attention_scores_backward(d(gw), ga, gu, d(f), d(q), d(wf), d(wq), d(ws)),
        C.attention_scores_backward(gw, ca, cu, f, q, wf, wq, ws))]
    gy, ix = r(N, D), np.array([2, 0])
    out += [both("weighted_sum", G.weighted_sum(d(f), ga), C.weighted_sum(f, ca))]
    out += [both(f"weighted_sum_g{k}", g, cv) for k, g, cv in zip(
        ("feats", "weights"), G.weighted_sum_backward(d(gy), d(f), ga), C.weighted_sum_backward(gy, f, ca))]
    out += [both("gather_location", G.gather_location(d(f), d(ix)), C.gather_location(f, ix)),
            both("gather_location_g", G.gather_location_backward(d(gy), d(ix), L), C.gather_location_backward(gy, ix, L))]
    p = np.abs(r(40, 7))
    p[3], p[4, 2], p[5, :6] = 0, np.nan, 0
    x = r(3, 4, 5)
    x[1, 2, 3] = np.nan
    out += [both("sample_categorical", G.sample_categorical(d(p), 11), C.sample_categorical(p, 11))]
    out += [both(f"argmax_{a}", G.argmax(d(x), a), C.argmax(x, a)) for a in (0, 1, 2)]
    return out


def _scatter(shape, v):
    g = np.zeros(shape, np.float32)
    g[:, 1::2, 0] = v
    return g


def main_gemm():
    cases = _gemm_cases()
    return {"errors": {name: rel(got, want) for name, got, want in cases},
            "control": rel(np.asarray(cases[0][2]) * 1.05, cases[0][2])}


def main_other():
    from netdsl.runtime import cpu, cuda as rcuda
    cases = _other_cases()
    masks = [g for n, g, _ in cases if n == "dropout_mask"] + [c for n, _, c in cases if n == "dropout_mask"]
    return {"errors": {name: rel(got, want) for name, got, want in cases},
            "dropout_mask_equal": bool(np.array_equal(masks[0].copy_to_host(), masks[1])),
            "missing": sorted(set(cpu.KERNELS) - set(rcuda.KERNELS)), "ops": len(rcuda.KERNELS)}


SMALL_CNN = """
network small(classes = 5) {
  input image: f32[N, 1, 8, 8]
  input label: i64[N]
  x = image -> conv(4, k=3, p=1, bias=false) -> bn -> relu -> maxpool(k=2, s=2)
  logits = concat(x, coords(x)) -> flatten -> linear(classes)     # CoordConv's channels made on the device
  output logits
  loss ce = cross_entropy(logits, label)
}
"""


SMALL_RNN = """
import "{lib}"
step mixed(x_t: seq, H) {{
  carry h = zeros([x_t.N, H]), c = zeros([x_t.N, H]), g = zeros([x_t.N, H])
  i, f, o, z = split(linear(concat(h, x_t), 4 * H, name="W"), 4)
  c = sigmoid(f) * c + sigmoid(i) * tanh(z)
  h = sigmoid(o) * tanh(c)
  g = gru_cell(x_t, g, H, name="gru")     # reads the sequence: its projection is hoisted out of the loop
  o = g * h
  emit o
}}
network small_rnn(V = 5) {{
  input x: f32[N, T, 3]
  input y: i64[N, T]
  hs = scan mixed(x, 4, name="rnn")
  logits = hs -> linear(V, name="head")
  output logits
  loss ce = cross_entropy(logits, y)
}}
"""


def _scan_step():
    """One training step of a scan (the notes' LSTM written out beside a fused GRU cell
    whose input projection is hoisted) on both targets: loss, logits and every gradient."""
    import tempfile
    from netdsl.lang.elaborate import elaborate
    from netdsl.runtime.model import Model
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "small_rnn.net"
        p.write_text(SMALL_RNN.format(lib=HERE.parent.parent / "specs" / "lib" / "rnn.net"))
        g, _ = elaborate(str(p), None, {})
    cpu_m = Model(g, seed=7)
    gpu_m = Model(g, params={k: v.copy() for k, v in cpu_m.params.items()}, device="cuda")
    rng = np.random.default_rng(8)
    feeds = {"x": rng.standard_normal((2, 3, 3)).astype(np.float32), "y": rng.integers(0, 5, (2, 3))}
    tc, _, oc, gc = cpu_m.train_step(feeds)
    tg, _, og, gg = gpu_m.train_step(feeds)
    return {"loss": abs(tg - tc) / abs(tc), "logits": rel(og["logits"], oc["logits"]),
            "grads": {k: rel(gg[k], gc[k]) for k in gc}, "expect_grads": sorted(cpu_m.trainable())}


def main_train():
    import tempfile
    from netdsl.lang.elaborate import elaborate
    from netdsl.runtime.model import Model
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "small.net"
        p.write_text(SMALL_CNN)
        g, _ = elaborate(str(p), None, {})
    cpu_m = Model(g, seed=4)
    gpu_m = Model(g, params={k: v.copy() for k, v in cpu_m.params.items()}, device="cuda")
    rng = np.random.default_rng(5)
    feeds = {"image": rng.standard_normal((2, 1, 8, 8)).astype(np.float32), "label": np.array([1, 4])}
    tc, _, oc, gc = cpu_m.train_step(feeds)
    tg, _, og, gg = gpu_m.train_step(feeds)
    host = gpu_m.host_params()
    opt = _optimizer_steps(cpu_m, gpu_m, gc, gg)
    return {"optimizer": opt, "loss": abs(tg - tc) / abs(tc), "logits": rel(og["logits"], oc["logits"]),
            "grads": {k: rel(gg[k], gc[k]) for k in gc}, "expect_grads": sorted(cpu_m.trainable()),
            "running": max(rel(host[k], cpu_m.params[k]) for k in host if "running" in k),
            "params_on_device": all(hasattr(v, "copy_to_host") for v in gpu_m.params.values()),
            "grads_on_device": all(hasattr(v, "copy_to_host") for v in gg.values()),
            "scan": _scan_step()}


def _optimizer_steps(cpu_m, gpu_m, gc, gg):
    """Two steps of each optimiser (momentum, Nesterov, weight decay; Adam, AdamW) after
    clipping, host arrays vs device arrays: the parameters and the state must agree."""
    from netdsl.runtime import clip_grad_norm, make_optimizer
    from netdsl.runtime.cuda import DeviceOptimizer, clip_grad_norm as clip_device, upload
    errs = {}
    for name, kw in (("sgd", {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-2, "nesterov": True}),
                     ("adam", {"lr": 0.01, "weight_decay": 1e-2}), ("adamw", {"lr": 0.01})):
        hp = {k: v.copy() for k, v in cpu_m.trainable().items()}
        dp = {k: upload(v) for k, v in hp.items()}
        host = make_optimizer(name, hp, **kw)
        dev = DeviceOptimizer(make_optimizer(name, {k: v.copy() for k, v in hp.items()}, **kw), dp)
        for _ in range(2):
            hg = {k: v.copy() for k, v in gc.items()}
            dg = {k: upload(v.copy_to_host()) for k, v in gg.items()}
            n1, n2 = clip_grad_norm(hg, 0.05), clip_device(dg, 0.05)
            errs[f"{name}:norm"] = abs(n1 - n2) / n1
            host.step(hg)
            dev.step(dg)
        errs[name] = max(rel(dp[k], hp[k]) for k in hp)
        hs, ds = host.state_dict(), dev.state_dict()
        errs[f"{name}:state"] = max(rel(ds[k], hs[k]) for k in hs if k != "step")
        assert set(hs) == set(ds)
    return errs


def main_signatures():
    """On a real device: the signature each kernel was compiled for is its declared one
    (for some element type: fill also fills integer arrays)."""
    from netdsl.kernels import cuda as G
    wrong = {}
    for name, disp, kinds in G.REGISTRY:
        allowed = {G.signature(kinds, dt) for dt in (np.float32, np.float64, np.int64)}
        for sig in getattr(disp, "signatures", []):
            if tuple(sig) not in allowed:
                wrong[name] = [str(sig), str(G.signature(kinds, np.float32))]
    return {"wrong": wrong, "compiled": sum(bool(getattr(d, "signatures", ())) for _, d, _ in G.REGISTRY)}


if __name__ == "__main__":
    import warnings
    warnings.simplefilter("ignore")     # the simulator's uint64 hash overflows on purpose
    sys.path.insert(0, str(HERE.parent))
    if sys.argv[1] == "device":          # a real GPU: everything, then the signatures
        res = {"gemm": main_gemm(), "other": main_other(), "train": main_train(),
               "signatures": main_signatures()}
    else:
        res = {"gemm": main_gemm, "other": main_other, "train": main_train}[sys.argv[1]]()
    print(json.dumps(res))
