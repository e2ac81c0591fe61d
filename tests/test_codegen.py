"""Generated elementwise / fused kernels (netdsl.kernels.codegen) against PyTorch autograd.

CPU kernels run here; CUDA kernels run under the Numba simulator and are compiled
to PTX (no GPU needed) in subprocesses, since both need settings fixed before
numba.cuda is first imported. Run this file as a script (`sim`, `ptx`, `cache`)
for those subprocess parts.
"""
import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from netdsl.kernels import codegen as cg
from netdsl.kernels.codegen import Fused, backward, compile_kernel
from netdsl.ops.elementwise import SCALAR

if __name__ != "__main__":   # the subprocess side needs no torch, which takes seconds to import
    import torch
    F = torch.nn.functional

DTYPES = [np.float32, np.float64]
TOL = {np.float32: (2e-6, 1e-6), np.float64: (1e-12, 1e-13)}   # rtol, atol (scaled)
SHAPE = (2, 3, 4, 5)

# The torch function (a path under torch) computing each SCALAR op, and attribute
# values to test with, passed positionally after the tensors.
REF = {
    "relu":       ("relu", {}),
    "leaky_relu": ("nn.functional.leaky_relu", {"slope": 0.2}),
    "sigmoid":    ("sigmoid", {}),
    "relu6":      ("nn.functional.relu6", {}),
    "hardswish":  ("nn.functional.hardswish", {}),
    "silu":       ("nn.functional.silu", {}),
    "gelu":       ("nn.functional.gelu", {}),
    "clamp":      ("clamp", {"min": -0.5, "max": 0.8}),
    "tanh":       ("tanh", {}),
    "exp":        ("exp", {}),
    "log":        ("log", {}),
    "neg":        ("neg", {}),
    "square":     ("square", {}),
    "sqrt":       ("sqrt", {}),
    "scale":      ("mul", {"factor": 0.3}),
    "shift":      ("add", {"amount": -0.7}),
    "add":        ("add", {}),
    "sub":        ("sub", {}),
    "mul":        ("mul", {}),
    "div":        ("div", {}),
}
POSITIVE = {("log", 0), ("sqrt", 0)}   # inputs kept in the op's domain
NONZERO = {("div", 1)}


def data(shape, dt, seed, kind=None):
    x = np.random.default_rng(seed).standard_normal(shape)
    if kind == "positive":
        x = 0.5 + np.abs(x)
    elif kind == "nonzero":
        x = np.sign(x) * (0.5 + np.abs(x))
    return x.astype(dt)


def close(got, want, dt):
    want = want.detach().numpy() if isinstance(want, torch.Tensor) else np.asarray(want)
    assert got.dtype == np.dtype(dt), got.dtype
    assert got.shape == want.shape, (got.shape, want.shape)
    rtol, atol = TOL[dt]
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol * max(1.0, np.abs(want).max()))


def torch_grads(fn, arrays, gs):
    ts = [torch.tensor(a, requires_grad=True) for a in arrays]
    outs = fn(*ts)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, [torch.tensor(g) for g in gs])
    return outs, [t.grad for t in ts]


# ---------------------------------------------------------------- every SCALAR op

def all_ops(dt):
    """One kernel applying every SCALAR op to its own inputs: compiling 2 kernels
    per dtype instead of 2 per op keeps the cold-cache test run short."""
    inputs, nodes, arrays = {}, [], []
    for op, (arity, *_) in SCALAR.items():
        names = [f"{op}{i}" for i in range(arity)]
        for i, name in enumerate(names):
            inputs[name] = "full"
            kind = "positive" if (op, i) in POSITIVE else "nonzero" if (op, i) in NONZERO else None
            arrays.append(data(SHAPE, dt, len(arrays), kind))
        nodes.append((op, *names, REF[op][1]))
    f = Fused.build(inputs, nodes, list(range(len(nodes))))
    gs = [data(SHAPE, dt, 100 + k) for k in range(len(nodes))]
    return f, arrays, gs


@pytest.fixture(scope="module", params=DTYPES, ids=["f32", "f64"])
def ops_run(request):
    dt = request.param
    f, arrays, gs = all_ops(dt)
    ys = compile_kernel(f, dt)(*arrays)
    grads = compile_kernel(backward(f), dt)(*arrays, *gs)
    per_op, k = {}, 0
    for j, (op, (arity, *_)) in enumerate(SCALAR.items()):
        per_op[op] = (arrays[k:k + arity], ys[j], gs[j], grads[k:k + arity])
        k += arity
    return dt, per_op


def test_reference_covers_every_op():
    assert set(REF) == set(SCALAR)


@pytest.mark.parametrize("op", list(SCALAR))
def test_op_forward_and_gradients(ops_run, op):
    dt, per_op = ops_run
    arrays, y, g, grads = per_op[op]
    path, attrs = REF[op]
    fn = functools.reduce(getattr, path.split("."), torch)
    (want,), want_grads = torch_grads(lambda *t: fn(*t, *attrs.values()), arrays, [g])
    close(y, want, dt)
    for got, w in zip(grads, want_grads):
        close(got, w, dt)


def test_attributes_are_runtime_arguments():
    """Two slopes, one generated module; each result matches its own slope."""
    x = data(SHAPE, np.float32, 0)
    ks = [compile_kernel(Fused.single("leaky_relu", slope=s)) for s in (0.1, 0.3)]
    assert ks[0].module is ks[1].module
    for k, s in zip(ks, (0.1, 0.3)):
        close(k(x)[0], F.leaky_relu(torch.tensor(x), s), np.float32)


# ---------------------------------------------------------------- fused chains

def ch(v, x):   # a per-channel vector broadcast over x: [N, C, ...]
    return v.reshape((-1,) + (1,) * (x.dim() - 2))


CHAINS = {
    # name: (inputs, nodes, outputs, torch reference)
    "bias_relu": ({"x": "full", "b": "channel"}, [("add", "x", "b"), ("relu", 0)], [1],
                  lambda x, b: torch.relu(x + ch(b, x))),
    "scale_shift_relu": ({"x": "full", "scale": "channel", "shift": "channel"},
                         [("mul", "x", "scale"), ("add", 0, "shift"), ("relu", 1)], [2],
                         lambda x, s, t: torch.relu(x * ch(s, x) + ch(t, x))),
    "add_relu": (["x", "skip"], [("add", "x", "skip"), ("relu", 0)], [1],
                 lambda x, s: torch.relu(x + s)),
    # a value used twice and two outputs: gradients must accumulate
    "swish_two_outputs": (["x"], [("sigmoid", "x"), ("mul", "x", 0)], [0, 1],
                          lambda x: (torch.sigmoid(x), x * torch.sigmoid(x))),
    "scalar_gain_leaky": ({"x": "full", "k": "scalar"},
                          [("mul", "x", "k"), ("leaky_relu", 0, {"slope": 0.1})], [1],
                          lambda x, k: F.leaky_relu(x * k, 0.1)),
}


def chain(name, dt, shape, seed=0):
    inputs, nodes, outputs, ref = CHAINS[name]
    f = Fused.build(inputs, nodes, outputs)
    size = {"full": shape, "channel": (shape[1],), "scalar": (1,)}
    arrays = [data(size[l], dt, seed + j) for j, (_, l) in enumerate(f.inputs)]
    gs = [data(shape, dt, seed + 50 + j) for j in range(len(outputs))]
    return f, arrays, gs, ref


@pytest.mark.parametrize("shape", [SHAPE, (5, 3)], ids=["NCHW", "NC"])
@pytest.mark.parametrize("dt", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(CHAINS))
def test_fused_chain(name, dt, shape):
    f, arrays, gs, ref = chain(name, dt, shape)
    want, want_grads = torch_grads(ref, arrays, gs)
    for got, w in zip(compile_kernel(f, dt)(*arrays), want):
        close(got, w, dt)
    bwd = backward(f)
    assert len(bwd.nodes) <= 2 * len(f.nodes) + len(f.outputs) + 2   # one kernel, no blow-up
    for got, w in zip(compile_kernel(bwd, dt)(*arrays, *gs), want_grads):
        close(got.reshape(w.shape), w, dt)


@pytest.mark.parametrize("name", ["bias_relu", "scale_shift_relu"])
def test_parallel_variant(name, monkeypatch):
    """The prange kernels (chosen above PAR_MIN elements) agree with torch."""
    monkeypatch.setattr(cg.cpu, "PAR_MIN", 0)
    shape = (4, 6, 9, 7)
    f, arrays, gs, ref = chain(name, np.float32, shape)
    (want,), want_grads = torch_grads(ref, arrays, gs)
    k = compile_kernel(f)
    close(k(*arrays)[0], want, np.float32)
    assert k.module.kernel_parallel.keys    # only this test runs the parallel copy
    for got, w in zip(compile_kernel(backward(f))(*arrays, *gs), want_grads):
        close(got, w, np.float32)


@pytest.mark.parametrize("dt", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("shape,axis", [((3, 4, 10, 10), 1), ((7, 5), 1), ((2, 3, 4), 2), ((6, 2), 0)])
def test_channel_sum(shape, axis, dt):
    x = data(shape, dt, 1)
    dims = tuple(d for d in range(len(shape)) if d != axis)
    close(cg.channel_sum(x, axis), torch.tensor(x).sum(dims), dt)


def test_bad_geometry_is_reported():
    f, arrays, _, _ = chain("bias_relu", np.float32, SHAPE)
    with pytest.raises(ValueError, match="channel input 'b' has 3 elements, axis 2 has 4"):
        compile_kernel(f)(*arrays, axis=2)
    with pytest.raises(ValueError, match="unknown input"):
        Fused.build(["x"], [("relu", "y")], [0])


# ---------------------------------------------------------------- float32 stays float32

def core_ir(k, args, monkeypatch):
    """LLVM IR of kernel k's serial function itself, as called on args, without the
    CPython wrapper (which unboxes scalar arguments through PyFloat_AsDouble)."""
    import numba   # recompiled uncached, with the same options: cached code has no IR to inspect
    calls = []
    launch = cg.cpu.launch
    monkeypatch.setattr(cg.cpu, "launch", lambda m, rows, size, a: calls.append(a) or launch(m, rows, size, a))
    k(*args)
    monkeypatch.undo()
    jit = k.module.kernel_serial
    fresh = numba.njit(**jit.options)(jit.py_func)
    fresh.compile(tuple(numba.typeof(a) for a in calls[0]))
    (ir,) = fresh.inspect_llvm().values()
    funcs = {re.search(r"@([^\s(]+)\(", f).group(1): f
             for f in re.split(r"^(?=define )", ir, flags=re.M) if f.startswith("define")}
    core = [f for name, f in funcs.items() if "kernel_" in name
            and not any(w in name for w in ("cpython", "cfunc"))]
    assert len(core) == 1, list(funcs)
    return core[0]


def test_no_float64_in_float32_kernels(monkeypatch):
    """Every op and gradient (all_ops) in float32: no double in the kernel's IR.
    The float64 chain is the control showing the check can see a double."""
    f, arrays, gs = all_ops(np.float32)
    g, garrays, ggs, _ = chain("scalar_gain_leaky", np.float64, SHAPE)
    for fused, args, dt in ((f, arrays, np.float32), (backward(f), arrays + gs, np.float32),
                            (backward(g), garrays + ggs, np.float64)):
        k = compile_kernel(fused, dt)
        assert all(o.dtype == dt for o in k(*args))
        assert ("double" in core_ir(k, args, monkeypatch)) == (dt == np.float64), fused


# ---------------------------------------------------------------- subprocess parts

HERE = Path(__file__).resolve()


def start_script(mode, env=None):
    env = {**os.environ, **(env or {})}
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    if mode == "sim":    # must be set before numba is imported
        env["NUMBA_ENABLE_CUDASIM"] = "1"
    return subprocess.Popen([sys.executable, str(HERE), mode], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=HERE.parent.parent)


def result(proc, timeout=180):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def background():
    """The simulator and PTX subprocesses, started once when first needed and left
    to run while the in-process tests go on."""
    return {mode: start_script(mode) for mode in ("sim", "ptx")}


@pytest.fixture(autouse=True, scope="module")
def _start_early(background):
    yield


def test_cache_second_process_does_not_recompile(tmp_path):
    env = {"NETDSL_CACHE_DIR": str(tmp_path)}
    cold = result(start_script("cache", env))
    assert cold["numba"] and cold["misses"] > 0 and cold["hits"] == 0 and cold["native"] == 0
    # Numba's own cache (the native store switched off)
    numba_warm = result(start_script("cache", {**env, "NETDSL_NATIVE": "0"}))
    assert numba_warm["misses"] == 0 and numba_warm["hits"] == cold["misses"] and numba_warm["native"] == 0
    # the native store: the same kernels, and Numba not even imported
    warm = result(start_script("cache", env))
    assert not warm["numba"] and warm["native"] == cold["misses"] and warm["misses"] == warm["hits"] == 0
    assert list((tmp_path / "kernels").glob("netdsl_cpu_*.py"))
    assert list((tmp_path / "kernels" / "__pycache__").glob("*.nbi"))
    assert list((tmp_path / "native").glob("*/index.json"))
    assert warm["seconds"] < numba_warm["seconds"] < cold["seconds"]


def test_cuda_simulator_matches_cpu(background):
    errors = result(background["sim"])
    assert errors and max(errors.values()) < 1e-5, errors


def test_cuda_ptx_has_no_float64_in_float32_kernels(background):
    found = result(background["ptx"])
    f64 = {k: v for k, v in found.items() if k.startswith("float32")}
    assert f64 and not any(f64.values()), f64
    assert all(found[k] for k in found if k.startswith("float64")), "control: f64 kernels use .f64"


# -- the subprocess side

def _cases(dt, shape=(1, 2, 12, 12)):
    """(name, fused, arrays): forward and backward of all ops and of every chain.
    Small (the simulator runs each thread in Python), with rows longer than a
    CUDA reduction block (144 > 128) so the thread-stride loop is exercised."""
    f, arrays, gs = all_ops(dt)
    out = [("all_ops", f, arrays), ("all_ops_bwd", backward(f), arrays + gs)]
    for name in CHAINS:
        f, arrays, gs, _ = chain(name, dt, shape)
        out += [(name, f, arrays), (name + "_bwd", backward(f), arrays + gs)]
    return out


def _script_cache():
    import time
    t = time.perf_counter()
    ks = []
    for name in ("bias_relu", "add_relu", "swish_two_outputs"):
        f, arrays, gs, _ = chain(name, np.float32, SHAPE)
        for fused, args in ((f, arrays), (backward(f), arrays + gs)):
            k = compile_kernel(fused)
            k(*args)
            ks.append(k.module.kernel_serial)
    ds = [k._dispatcher for k in ks if k._dispatcher is not None]
    return {"seconds": time.perf_counter() - t, "numba": "numba" in sys.modules,
            "native": sum(len(k.native_keys) for k in ks),
            "hits": sum(sum(d.stats.cache_hits.values()) for d in ds),
            "misses": sum(sum(d.stats.cache_misses.values()) for d in ds)}


def _script_sim():
    from netdsl.kernels.codegen import cuda
    errors = {}
    for dt in DTYPES:
        for name, f, arrays in _cases(dt):
            if dt == np.float64 and name not in ("all_ops_bwd", "bias_relu_bwd"):
                continue   # same code as float32 but the dtype; two cases suffice
            want = compile_kernel(f, dt, "cpu")(*arrays)
            got = compile_kernel(f, dt, "cuda")(*arrays)
            errors[f"{np.dtype(dt).name}:{name}"] = max(
                float(np.max(np.abs(cuda.to_host(g) - w) / (1 + np.abs(w)))) for g, w in zip(got, want))
        x = data((3, 4, 10, 10), dt, 3)
        errors[f"{np.dtype(dt).name}:channel_sum"] = float(np.max(np.abs(
            cuda.to_host(cg.channel_sum(x, 1, "cuda")) - cg.channel_sum(x, 1)) / (1 + x.size)))
    return errors


def _script_ptx():
    """.f64 instructions per kernel: float32 all ops and the reducing chain
    backwards (the chain forwards are subsets of all_ops); one float64 control."""
    from numba import cuda, from_dtype, int64

    def f64(ptx):
        return sorted({line.split()[0] for line in ptx.splitlines() if ".f64" in line})
    cases = [c for c in _cases(np.float32) if c[0].startswith("all_ops") or c[0].endswith("_bwd")]
    found = {f"float32:{name}": f64(compile_kernel(f, np.float32, "cuda").ptx()) for name, f, _ in cases}
    name, f, _ = [c for c in _cases(np.float64) if c[0] == "bias_relu_bwd"][0]
    found[f"float64:{name}"] = f64(compile_kernel(f, np.float64, "cuda").ptx())
    arr = from_dtype(np.float32)[::1]
    ptx, _ = cuda.compile_ptx(cg.reductions(np.float32, "cuda").channel_sum.py_func,
                              (arr, int64, int64, int64, arr), cc=(8, 0))
    found["float32:channel_sum"] = f64(ptx)
    return found


if __name__ == "__main__":
    print(json.dumps({"cache": _script_cache, "sim": _script_sim, "ptx": _script_ptx}[sys.argv[1]]()))
