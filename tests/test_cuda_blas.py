"""The cuBLAS route for the CUDA target's GEMMs (runtime/cuda_blas.py) without a GPU: the
calls it plans for every product kernels/cuda/gemm.py makes (convolution forward, data
and weight gradients with groups and image chunks, linear forward and backward), run by
a numpy model of cublasSgemmStridedBatched's column-major semantics, against netdsl's
GEMM semantics computed directly. On a GPU, scripts/gpu-check runs the CPU comparison
of the ResNet-18 step with NETDSL_CUDA_BLAS=1 and the benchmark's graph-cublas way."""
from types import SimpleNamespace

import numpy as np
import pytest

from netdsl.runtime.cuda_blas import plan


def op(arr, rs, ks, off=0, kdiv=0, kbs=0, z1=0, z2=0):
    return SimpleNamespace(arr=arr, rs=rs, ks=ks, off=off, kdiv=kdiv, kbs=kbs, z1=z1, z2=z2)


def netdsl_gemm(a, b, c, M, N, K, Z1, Z2, accumulate):
    """kernels/cuda/gemm.py's semantics, element by element (float64)."""
    out = c.arr.astype(np.float64).copy()
    i, j, k = np.arange(M)[:, None, None], np.arange(N)[None, :, None], np.arange(K)[None, None, :]
    kk = lambda o: ((k // o.kdiv) * o.kbs + (k % o.kdiv) * o.ks) if o.kdiv else k * o.ks
    for z1 in range(Z1):
        for z2 in range(Z2):
            A = a.arr[a.off + z1 * a.z1 + z2 * a.z2 + i * a.rs + kk(a)].astype(np.float64)
            B = b.arr[b.off + z1 * b.z1 + z2 * b.z2 + j * b.rs + kk(b)].astype(np.float64)
            ci = c.off + z1 * c.z1 + z2 * c.z2 + i[:, :, 0] * c.rs + j[:, :, 0] * c.ks
            out[ci] = (out[ci] if accumulate else 0) + (A * B).sum(axis=2)
    return out


def cublas(calls, arrays):
    """cublasSgemmStridedBatched, column-major, modelled in numpy (float64)."""
    out = arrays["c"].astype(np.float64).copy()
    for c in calls:
        A, B = arrays[c.A], arrays[c.B]
        for bi in range(c.batch):
            def stored(arr, off, ld, rows, cols):
                r, s = np.arange(rows)[:, None], np.arange(cols)[None, :]
                return arr[off + r + s * ld].astype(np.float64)
            oa = (stored(A, c.a_off + bi * c.stride_a, c.lda, c.m, c.k) if c.transa == 0
                  else stored(A, c.a_off + bi * c.stride_a, c.lda, c.k, c.m).T)
            ob = (stored(B, c.b_off + bi * c.stride_b, c.ldb, c.k, c.n) if c.transb == 0
                  else stored(B, c.b_off + bi * c.stride_b, c.ldb, c.n, c.k).T)
            r, s = np.arange(c.m)[:, None], np.arange(c.n)[None, :]
            ci = c.c_off + bi * c.stride_c + r + s * c.ldc
            out[ci] = oa @ ob + c.beta * out[ci]
    return out


def conv_products(N, C, O, G, H, W, KH, KW, nb, acc):
    """The three products of a convolution (stride 1, 'same' padding so OH, OW = H, W),
    as kernels/cuda/gemm.py's _forward / _backward_data / _backward_weight make them for
    the image chunk starting at n0 = nb (a second chunk, so offsets are not zero); acc: the
    weight gradient adds to what earlier chunks wrote."""
    rng = np.random.default_rng(0)
    L, Og, Cg = H * W, O // G, C // G
    CKK = Cg * KH * KW
    RK = CKK * L
    w = rng.standard_normal(O * CKK).astype(np.float32)
    cols = rng.standard_normal(nb * G * RK + 7).astype(np.float32)
    y = rng.standard_normal(N * O * L).astype(np.float32)
    gw = rng.standard_normal(O * CKK).astype(np.float32)
    n0 = nb
    fwd = (op(w, CKK, 1, z2=Og * CKK), op(cols, 1, L, off=7, z1=G * RK, z2=RK),
           op(y, L, 1, off=n0 * O * L, z1=O * L, z2=Og * L), Og, L, CKK, nb, G, False)
    data = (op(w, 1, CKK, z2=Og * CKK), op(y, 1, L, off=n0 * O * L, z1=O * L, z2=Og * L),
            op(cols, L, 1, off=7, z1=G * RK, z2=RK), CKK, L, Og, nb, G, False)
    weight = (op(y, L, 1, off=n0 * O * L, kdiv=L, kbs=O * L, z2=Og * L),
              op(cols, L, 1, off=7, kdiv=L, kbs=G * RK, z2=RK),
              op(gw, CKK, 1, z2=Og * CKK), Og, CKK, nb * L, 1, G, acc)
    return {"forward": fwd, "backward_data": data, "backward_weight": weight}


def linear_products(N, K, M):
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal(N * K).astype(np.float32), rng.standard_normal(M * K).astype(np.float32)
    y, gy = rng.standard_normal(N * M).astype(np.float32), rng.standard_normal(N * M).astype(np.float32)
    gx, gw = rng.standard_normal(N * K).astype(np.float32), rng.standard_normal(M * K).astype(np.float32)
    return {"linear": (op(x, K, 1), op(w, K, 1), op(y, M, 1), N, M, K, 1, 1, False),
            "linear_gx": (op(gy, M, 1), op(w, 1, K), op(gx, K, 1), N, K, M, 1, 1, False),
            "linear_gw": (op(gy, 1, M), op(x, 1, K), op(gw, K, 1), M, K, N, 1, 1, False)}


CASES = {**{f"conv_{k}": v for k, v in conv_products(N=4, C=6, O=8, G=1, H=3, W=4, KH=3, KW=3, nb=2, acc=False).items()},
         **{f"grouped_{k}": v for k, v in conv_products(N=4, C=6, O=4, G=2, H=2, W=3, KH=1, KW=1, nb=2, acc=True).items()},
         **{f"one_pixel_{k}": v for k, v in conv_products(N=2, C=3, O=5, G=1, H=1, W=1, KH=1, KW=1, nb=1, acc=False).items()},
         **linear_products(5, 7, 3), **{f"{k}_one_row": v for k, v in linear_products(1, 7, 3).items()}}


@pytest.mark.parametrize("name", sorted(CASES))
def test_planned_cublas_calls_compute_netdsls_gemm(name):
    a, b, c, M, N, K, Z1, Z2, acc = CASES[name]
    calls = plan(a, b, c, M, N, K, Z1, Z2, acc)
    assert calls is not None, name
    want = netdsl_gemm(a, b, c, M, N, K, Z1, Z2, acc)
    got = cublas(calls, {"a": a.arr, "b": b.arr, "c": c.arr})
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-9)
    for call in calls:     # what cuBLAS requires of leading dimensions
        assert call.lda >= max(1, call.m if call.transa == 0 else call.k)
        assert call.ldb >= max(1, call.k if call.transb == 0 else call.n)
        assert call.ldc >= max(1, call.m)


def test_what_cublas_cannot_express_is_left_to_netdsl():
    x = np.zeros(64, np.float32)
    # an operand with no unit stride
    assert plan(op(x, 2, 2), op(x, 4, 1), op(x, 4, 1), 2, 2, 2) is None
    # K split differently in the two operands
    assert plan(op(x, 4, 1, kdiv=2, kbs=8), op(x, 4, 1, kdiv=4, kbs=8), op(x, 4, 1), 2, 2, 8) is None
