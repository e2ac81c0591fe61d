"""kernels/cpu/vmath.py: the vectorisable exp, sigmoid and tanh the fused cells use,
against float64 numpy over the whole float32 range."""
import numpy as np
import pytest

from netdsl.kernels.cpu import vmath

X = np.concatenate([np.linspace(-100, 100, 20001), np.random.default_rng(0).standard_normal(5000) * 4,
                    np.geomspace(1e-30, 0.2, 200), -np.geomspace(1e-30, 0.2, 200), [0.0, -0.0]]).astype(np.float32)
REF = {"vexp": np.exp, "vsigmoid": lambda z: 1 / (1 + np.exp(-z)), "vtanh": np.tanh}


def run(name, x):
    a = x.copy()
    ki = np.empty(2 * len(a), np.int32)
    getattr(vmath, name)(a, 0, len(a), ki)
    return a


@pytest.mark.parametrize("name", ["vexp", "vsigmoid", "vtanh"])
def test_close_to_float64(name):
    x = X[(X > -87) & (X < 88)] if name == "vexp" else X
    got, want = run(name, x).astype(np.float64), REF[name](x.astype(np.float64))
    rel = np.abs(got - want) / np.maximum(np.abs(want), 1e-30)
    tol = {"vexp": 4e-7, "vsigmoid": 4e-7, "vtanh": 1e-6}[name]
    small = np.abs(want) < 1e-30      # sigmoid far below 0: the float32 result underflows differently
    assert rel[~small].max() < tol, (name, x[~small][rel[~small].argmax()])
    assert np.abs(got - want)[small].max() < 1e-30


@pytest.mark.parametrize("name", ["vexp", "vsigmoid", "vtanh"])
def test_nan_stays_nan_and_infinities_saturate(name):
    got = run(name, np.array([np.nan, np.inf, -np.inf], np.float32))
    assert np.isnan(got[0])
    assert {"vexp": got[2] < 1e-37, "vsigmoid": got[1] == 1 and got[2] < 1e-37,
            "vtanh": got[1] == 1 and got[2] == -1}[name]


def test_offset_and_float64_rows():
    a = np.arange(-3, 3, 0.5)
    b = a.copy()
    vmath.vtanh(b, 2, 5, np.empty(10, np.int32))       # only a[2:7], in float64 via np.tanh
    np.testing.assert_array_equal(b[:2], a[:2])
    np.testing.assert_array_equal(b[7:], a[7:])
    np.testing.assert_allclose(b[2:7], np.tanh(a[2:7]), rtol=1e-15)
