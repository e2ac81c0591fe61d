"""The native store (kernels/native.py, kernels/cpu/jit.py): stored kernels run without
Numba and compute exactly what Numba's own dispatch of the same code computes."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import ROOT
from netdsl.kernels import native

STEP = """
import json, sys
import numpy as np
from netdsl.lang.elaborate import elaborate
from netdsl.runtime import make_optimizer
from netdsl.runtime.model import Model
g, _ = elaborate("specs/digits_cnn.net")
m = Model(g, seed=0)
rng = np.random.default_rng(0)
feeds = {"image": rng.standard_normal((16, 1, 8, 8)).astype(np.float32), "label": rng.integers(0, 10, 16)}
loss, _, _, grads = m.train_step(feeds)
out = {"loss": float(loss), "grads": {k: v.tobytes().hex() for k, v in grads.items()}}
for name in ("sgd", "adam"):      # the optimiser kernels, then inference with the new weights
    make_optimizer(name, m.trainable(), lr=0.01, weight_decay=1e-4).step(grads)
out["logits"] = m.infer({"image": feeds["image"]})["logits"].tobytes().hex()
out["numba"] = "numba" in sys.modules
print(json.dumps(out))
"""


def run_step(**env):
    r = subprocess.run([sys.executable, "-c", STEP], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, **env}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_a_second_process_runs_the_stored_kernels_without_numba():
    first = run_step()                      # compiles or loads through Numba where the store misses
    second = run_step()
    assert not second["numba"], "a warm store should not need Numba"
    through_numba = run_step(NETDSL_NATIVE="0")
    assert through_numba["numba"]
    # the same machine code, so the same bits
    assert second["loss"] == first["loss"] == through_numba["loss"]
    assert second["grads"] == first["grads"] == through_numba["grads"]
    assert second["logits"] == first["logits"] == through_numba["logits"]


def _samples():
    a = np.zeros((4, 6), np.float32)
    ro = np.zeros(5, np.float64)
    ro.flags.writeable = False
    return [a, a.T, a[:, ::2], a[0], a[:, 0], np.zeros((), np.float32), np.zeros(3, np.int64), ro,
            np.zeros((2, 1, 3), np.float64), np.zeros((0, 3), np.float32), np.zeros(7, np.uint64),
            3, 2.5, True, None, np.float32(1), np.float64(1), np.int64(2), np.int32(2), np.uint64(2), np.bool_(1)]


def test_arg_key_determines_numba_type():
    """Calls with one key must be one signature: the stored code unboxes its arguments
    as the types it was compiled for, unchecked."""
    import numba
    seen = {}
    for x in _samples():
        key = native.arg_key((x,))
        assert key is not None
        t = numba.typeof(x)
        assert seen.setdefault(key, t) == t, (key, seen[key], t)
    assert native.arg_key(((1, 2),)) is None and native.arg_key(([1],)) is None   # these go to Numba


def test_a_kernel_with_an_unresolvable_symbol_is_not_linked():
    rt = native.runtime()
    assert rt is not None, native._failed
    with pytest.raises(native.Unavailable, match="netdsl_no_such_symbol"):
        rt._link(b"", set(), {"netdsl_no_such_symbol"})


def test_elf_symbols_of_a_stored_kernel():
    from netdsl.kernels import cpu as K
    K.conv2d(np.ones((1, 1, 3, 3), np.float32), np.ones((1, 1, 1, 1), np.float32))
    st = native.store()          # a kernel has run, so the store holds it (stored now or before)
    assert st is not None and st.index
    entry = st.read(next(iter(st.index.values())))
    defined, undefined = native.elf_symbols(entry["obj"])
    assert entry["wrapper"] in defined and entry["env"] in defined
    assert "NRT_decref" in undefined or "NRT_MemInfo_call_dtor" in undefined or any(
        s.startswith("numba_") for s in undefined)
    with pytest.raises(native.Unavailable):
        native.elf_symbols(b"not an object")


def test_threads_are_one_pool_shared_with_numba():
    import numba
    n = native.get_num_threads()
    try:
        native.set_num_threads(1)
        assert native.get_num_threads() == numba.get_num_threads() == 1
        with pytest.raises(ValueError, match="threads must be between 1 and"):
            native.set_num_threads(native.max_threads() + 1)
    finally:
        native.set_num_threads(n)
    assert native.get_num_threads() == numba.get_num_threads() == n


def test_a_store_that_cannot_be_written_still_runs(tmp_path):
    """Kernels run through Numba when the native store's folder cannot be made (here a
    file stands where it should be): no error, and the same numbers."""
    (tmp_path / "native").write_text("not a folder")
    r = run_step(NETDSL_CACHE_DIR=str(tmp_path))
    assert r["numba"]
    assert r["loss"] == run_step(NETDSL_NATIVE="0")["loss"]


def test_with_native_off_numba_is_not_patched(tmp_path):
    """NETDSL_NATIVE=0: kernels run through Numba as it ships, nothing of it replaced."""
    code = ("import numpy as np\n"
            "from netdsl.kernels import cpu as K\n"
            "K.conv2d(np.ones((1, 1, 3, 3), np.float32), np.ones((1, 1, 1, 1), np.float32))\n"
            "from numba.core import codegen\n"
            "c = codegen.CPUCodeLibrary\n"
            "print(c._unserialize.__func__.__module__, c._object_compiled_hook.__func__.__module__,"
            " getattr(c, '_netdsl_keeps', False))\n")
    outs = {}
    for flag in ("0", "1"):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                           env={**os.environ, "NETDSL_NATIVE": flag, "NETDSL_CACHE_DIR": str(tmp_path / flag)},
                           timeout=600)     # empty caches: Numba compiles
        assert r.returncode == 0, r.stderr[-3000:]
        outs[flag] = r.stdout.split()
    assert outs["0"] == ["numba.core.codegen", "numba.core.codegen", "False"]
    assert outs["1"][2] == "True"       # control: with the layer on, it does keep the objects


def test_a_hostile_or_damaged_store_is_ignored_and_rebuilt(tmp_path):
    """Index and entries are data: a pickle planted where the old index lived, an index
    that is not JSON or points outside the store, and entries that are truncated or
    garbled are all misses; the step still runs, with the same numbers, and the index
    is written afresh."""
    first = run_step(NETDSL_CACHE_DIR=str(tmp_path))
    folder, = (tmp_path / "native").iterdir()
    index = json.loads((folder / "index.json").read_text())
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    import pickle
    (folder / "index.pkl").write_bytes(pickle.dumps({("x", ()): "y"} | {"evil": Evil()}))
    names = sorted(index["kernels"].values())
    (folder / names[0]).write_bytes(pickle.dumps(Evil()))               # not an entry at all
    data = (folder / names[1]).read_bytes()
    (folder / names[1]).write_bytes(data[:len(data) // 2])              # truncated object
    (folder / names[2]).write_bytes(data.replace(b'"wrapper"', b'"wrapped"', 1))   # garbled header
    for bad in ("not json {", json.dumps([1, 2]), json.dumps({"format": "netdsl-native-index",
                                                              "kernels": {"k": "../../etc/passwd"}})):
        (folder / "index.json").write_text(bad)
        r = run_step(NETDSL_CACHE_DIR=str(tmp_path))
        assert r["grads"] == first["grads"] and r["loss"] == first["loss"]
    (folder / "index.json").write_text(json.dumps(index))       # the real index, damaged entries
    r = run_step(NETDSL_CACHE_DIR=str(tmp_path))
    assert r["grads"] == first["grads"] and r["logits"] == first["logits"]
    assert not marker.exists()
    rebuilt = json.loads((folder / "index.json").read_text())["kernels"]
    assert set(rebuilt.values()) >= set(names)
    assert all(native.Store(folder).read(n) is not None for n in rebuilt.values())     # rewritten whole
