"""Start-up: what a Model defers or overlaps must not change what it computes."""
import subprocess
import sys

import numpy as np
import pytest

from helpers import ROOT, compile_spec
from netdsl.runtime.init import init_params
from netdsl.runtime.model import Model


def test_weights_drawn_on_the_helper_are_init_params():
    g = compile_spec("digits_cnn.net")
    want = init_params(g, 3)
    got = Model(g, seed=3).params
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].tobytes() == want[k].tobytes(), k


def test_a_step_before_the_weights_are_all_drawn_matches_one_after():
    g = compile_spec("digits_cnn.net")
    feeds = {"image": np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype(np.float32),
             "label": np.array([1, 7])}
    early = Model(g, seed=1)
    loss_early, _, _, grads_early = early.train_step(feeds)      # reads the weights as they come
    late = Model(g, seed=1)
    late.params                                                  # waits for all of them
    loss_late, _, _, grads_late = late.train_step(feeds)
    assert loss_early == loss_late
    for k in grads_late:
        assert np.array_equal(grads_early[k], grads_late[k]), k
    for k, v in late.params.items():
        assert np.array_equal(early.params[k], v), k   # incl. the batch-norm running statistics


def test_an_initialiser_error_reaches_the_caller():
    g = compile_spec("digits_cnn.net")
    next(iter(g.params.values())).init = "bogus"
    m = Model(g, seed=0)
    with pytest.raises(ValueError, match="unknown initialiser 'bogus'"):
        m.params
    with pytest.raises(ValueError, match="unknown initialiser 'bogus'"):
        m.params                        # and again, not an empty dict the second time


def test_front_end_and_model_import_without_numba_and_blas_without_scipy_linalg():
    code = ("import sys\n"
            "from netdsl.lang.elaborate import elaborate\n"
            "from netdsl.runtime.model import Model\n"
            "import netdsl.runtime\n"
            "assert 'numba' not in sys.modules, 'numba imported'\n"
            "import netdsl.kernels.cpu\n"
            "assert 'scipy.linalg.cython_blas' in sys.modules and 'scipy.linalg' not in sys.modules\n"
            "import scipy.linalg, scipy.linalg.cython_blas as b\n"
            "assert b is sys.modules['scipy.linalg.cython_blas']\n"
            "assert float(scipy.linalg.det([[2.0, 0.0], [0.0, 3.0]])) == 6.0\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
