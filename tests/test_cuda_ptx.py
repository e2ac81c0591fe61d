"""Real CUDA code generation without a GPU: every hand-written CUDA kernel compiles to PTX.

`numba.cuda.compile_ptx` runs NVVM (pip `cuda-toolkit[nvvm,nvrtc]`, the `ptx` extra)
for compute capability 8.0, in a subprocess without the simulator (the simulator
runs plain Python and hides typing mistakes). Each kernel is compiled for the
float32 signature the runtime launches it with (its `kinds` in
`netdsl.kernels.cuda.REGISTRY`), and its PTX must hold no float64 arithmetic: a
float literal or an int-float mix would show up as `.f64` instructions. The
float64 signatures of a few kernels are the control: there the check must see doubles.
Run as a script (`python tests/test_cuda_ptx.py`) to print the findings as JSON.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve()
CONTROL = ("gemm._gemm", "norm._bn_stats", "loss._softmax_ce")


@pytest.fixture(scope="module")
def found():
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    p = subprocess.run([sys.executable, str(HERE)], capture_output=True, text=True, env=env,
                       cwd=HERE.parent.parent, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_every_kernel_compiles_to_ptx(found):
    errors = {k: v for k, v in found["errors"].items()}
    assert not errors, errors
    # every kernel module is covered, and nothing is compiled twice under one name
    names = set(found["float32"])
    for family in ("gemm", "pool", "norm", "loss", "tensor", "patches", "recurrent"):
        assert any(n.startswith(family + ".") for n in names), family
    assert len(names) >= 40


def test_float32_kernels_have_no_float64(found):
    f64 = {k: v for k, v in found["float32"].items() if v}
    assert not f64, f64


def test_control_float64_kernels_do_use_doubles(found):
    assert set(found["float64"]) == set(CONTROL)
    assert all(found["float64"].values()), found["float64"]


def test_gemm_keeps_its_tiles_in_shared_memory(found):
    """The GEMM is tiled: its PTX declares shared arrays and synchronises the block."""
    assert found["gemm_shared"] and found["gemm_bar"]


def test_compiles_under_numpy_without_row_stack():
    """NumPy 2.5 removed np.row_stack, which numba-cuda 0.30 overloads: on the GPU machine
    (numpy 2.5.2) every kernel failed to compile until netdsl's alias. Simulated here by
    deleting the name before netdsl's CUDA kernels are imported."""
    code = ("import numpy as np\n"
            "if hasattr(np, 'row_stack'): del np.row_stack\n"
            "from numba import cuda\n"
            "import netdsl.kernels.cuda as K\n"
            "name, fn, kinds = K.REGISTRY[0]\n"
            "print(name, len(cuda.compile_ptx(fn.py_func, K.signature(kinds, np.float32), cc=(8, 0))[0]))\n")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       cwd=HERE.parent.parent, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]


# -- the subprocess side

def _f64(ptx):
    """The float64 instructions of a PTX listing (register declarations aside)."""
    return sorted({line.split()[0] for line in ptx.splitlines()
                   if ".f64" in line and not line.strip().startswith(".reg")})


def main():
    import numpy as np
    from numba import cuda
    from netdsl.kernels import cuda as K

    out = {"float32": {}, "float64": {}, "errors": {}}
    for name, disp, kinds in K.REGISTRY:
        for dt in (np.float32, np.float64):
            if dt == np.float64 and name not in CONTROL:
                continue
            try:
                ptx, _ = cuda.compile_ptx(disp.py_func, K.signature(kinds, dt), cc=(8, 0))
            except Exception as e:  # report every failure, not just the first
                out["errors"][f"{np.dtype(dt).name}:{name}"] = f"{type(e).__name__}: {str(e)[:400]}"
                continue
            out[np.dtype(dt).name][name] = _f64(ptx)
            if name == "gemm._gemm" and dt == np.float32:
                out["gemm_shared"] = ".shared" in ptx
                out["gemm_bar"] = "bar.sync" in ptx
    print(json.dumps(out))


if __name__ == "__main__":
    main()
