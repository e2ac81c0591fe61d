"""Start-up: what is deferred, overlapped or cached must not change what is computed."""
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import ROOT, compile_spec
from netdsl.errors import NetdslError
from netdsl.lang import graph_cache
from netdsl.lang.elaborate import elaborate
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


# ---- the graph cache (netdsl/lang/graph_cache.py)

ALL_SPECS = sorted(p for p in (ROOT / "specs").rglob("*.net") if p.parent.name != "lib")


def _fingerprint(g):
    """Everything elaboration records, with values named by first appearance."""
    ids = {}
    vid = lambda v: None if v is None else ids.setdefault(id(v), len(ids))
    val = lambda v: (vid(v), repr(v.shape), v.dtype, v.name, v.pos, v.param, v.index)
    nodes = []
    for n in graph_cache._in_order(g):
        nodes.append((n.op, n.path, n.pos, repr(n.attrs), [vid(v) for v in n.inputs], [val(v) for v in n.outputs],
                      {r: (p.name, p.shape, p.dtype, p.init, p.role, p.node.path) for r, p in n.params.items()},
                      repr(n.macs), [(f.scope, f.kind, f.callee, f.pos, repr(f.repeat_key)) for f in n.frames],
                      None if n.body is None else _fingerprint(n.body)))
    return (g.name, nodes, {k: val(v) for k, v in g.inputs.items()}, {k: vid(v) for k, v in g.outputs.items()},
            [(l.name, vid(l.value), l.weight, l.phase, l.pos) for l in g.losses], list(g.params),
            [(c.name, vid(c.init), vid(c.step_in), vid(c.step_out), vid(c.final)) for c in g.carries],
            repr(g.train), g.train_pos, g.symbols, repr(g.args), g.pos)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NETDSL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(ROOT)
    return tmp_path / "cache" / "graphs"


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda p: str(p.relative_to(ROOT / "specs")))
def test_a_cached_graph_is_the_elaborated_one(spec, cache_dir):
    path = str(spec.relative_to(ROOT))
    fresh, src = elaborate(path)                     # a miss: elaborated and stored
    assert len(list(cache_dir.glob("*.json"))) == 1
    cached, src2 = elaborate(path)                   # a hit
    assert cached is not fresh
    assert _fingerprint(cached) == _fingerprint(fresh)
    assert list(src2.sources.items()) == list(src.sources.items())   # order too: the checkpoint hashes it


def _spec(tmp_path, body="conv(x, c=4, k=3, p=1)"):
    (tmp_path / "lib.net").write_text(f"block b(x) {{ return {body} }}\n")
    (tmp_path / "m.net").write_text('import "lib.net"\n'
                                    "network m(c = 3) {\n  input x: f32[N, c, 8, 8]\n  y = b(x)\n  output y\n}\n")
    return str(tmp_path / "m.net")


def test_an_edited_import_overrides_and_front_end_change_the_result(tmp_path, cache_dir, monkeypatch):
    path = _spec(tmp_path)
    g, _ = elaborate(path)
    assert elaborate(path)[0].outputs["y"].shape[1] == 4
    _spec(tmp_path, "conv(x, c=5, k=3, p=1)")         # the imported file changes, not the spec
    assert elaborate(path)[0].outputs["y"].shape[1] == 5
    assert elaborate(path, overrides={"c": 7})[0].inputs["x"].shape[1] == 7
    assert elaborate(path)[0].inputs["x"].shape[1] == 3
    n = len(list(cache_dir.glob("*.json")))
    monkeypatch.setattr(graph_cache, "_front_end_digest", "another netdsl")
    elaborate(path)
    assert len(list(cache_dir.glob("*.json"))) == n + 1     # a new key, not the old entry


def test_errors_are_never_cached_and_a_broken_entry_is_a_miss(tmp_path, cache_dir):
    path = _spec(tmp_path, "conv(x, c=4, k=3, p=1) + x")
    for _ in range(2):
        with pytest.raises(NetdslError, match="shapes cannot be combined"):
            elaborate(path)
    assert not cache_dir.exists() or not list(cache_dir.glob("*.json"))
    path = _spec(tmp_path)
    elaborate(path)
    entry, = cache_dir.glob("*.json")
    entry.write_bytes(entry.read_bytes()[:100])
    assert elaborate(path)[0].outputs["y"].shape[1] == 4


def test_a_warm_elaboration_does_not_import_the_parser(tmp_path):
    code = ("import sys\nfrom netdsl.lang.elaborate import elaborate\n"
            "g, _ = elaborate('specs/resnet18.net')\nprint('lark' in sys.modules, len(g.nodes))\n")
    env = dict(os.environ, NETDSL_CACHE_DIR=str(tmp_path))
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
            for _ in range(2)]
    assert [r.returncode for r in runs] == [0, 0], runs[0].stderr + runs[1].stderr
    (cold, n1), (warm, n2) = [r.stdout.split() for r in runs]
    assert (cold, warm) == ("True", "False") and n1 == n2


def test_normal_initialiser_is_normal():
    """init.normal (counter-based Box-Muller, for start-up speed) against the normal
    distribution: moments, tail mass and a KS test on 2M draws, an odd size; Kaiming's
    std is sqrt(2 / fan_out) as in torchvision."""
    from scipy import stats
    from netdsl.runtime.init import _fans, key, normal
    x = normal(key(0, "w"), (1000, 2001), 0.5).astype(np.float64).ravel()
    assert x.size == 2_001_000
    assert abs(x.mean()) < 3 * 0.5 / np.sqrt(x.size) * 2 and abs(x.std() / 0.5 - 1) < 2e-3
    assert abs(stats.kurtosis(x)) < 0.02 and abs(stats.skew(x)) < 0.01
    for k in (1, 2, 3, 4):                  # tail mass beyond k sigma
        assert abs(np.mean(np.abs(x) > k * 0.5) - 2 * stats.norm.sf(k)) < 4e-3 / k ** 2
    assert stats.kstest(x[:200_000] / 0.5, "norm").pvalue > 1e-3
    assert stats.kstest(x[-200_000:] / 0.5, "norm").pvalue > 1e-3
    pairs = x[:2_000_000].reshape(-1, 2)     # a Box-Muller pair's two values are independent
    assert abs(np.corrcoef(pairs[:, 0], pairs[:, 1])[0, 1]) < 5e-3
    assert abs(np.corrcoef(pairs[:, 0] ** 2, pairs[:, 1] ** 2)[0, 1]) < 5e-3
    g = compile_spec("digits_cnn.net")
    p = next(p for p in g.params.values() if p.init == "kaiming_normal_fan_out")
    w = init_params(g, 0)[p.name]
    assert w.dtype == np.float32 and w.shape == p.shape
    assert abs(w.std() / np.sqrt(2.0 / _fans(p.shape)[1]) - 1) < 0.15


def test_uniform_initialiser_and_streams():
    """init.uniform covers [-b, b) evenly; streams of different names or seeds are
    uncorrelated, and a parameter's values depend on the seed and its path alone."""
    from scipy import stats
    from netdsl.runtime.init import key, normal, uniform
    u = uniform(key(0, "b"), (1_000_001,), 0.25).astype(np.float64)
    assert u.min() >= -0.25 and u.max() < 0.25
    assert stats.kstest(u, stats.uniform(-0.25, 0.5).cdf).pvalue > 1e-3
    a, b, c = (normal(key(s, n), (100_000,)) for s, n in ((0, "x.weight"), (0, "y.weight"), (1, "x.weight")))
    assert max(abs(np.corrcoef(a, b)[0, 1]), abs(np.corrcoef(a, c)[0, 1])) < 0.02
    assert np.array_equal(a, normal(key(0, "x.weight"), (100_000,)))
    small, big = compile_spec("resnet18.net"), compile_spec("resnet34.net")   # one more block per stage
    shared = [n for n in small.params if n in big.params and small.params[n].shape == big.params[n].shape]
    ws, wb = init_params(small, 5), init_params(big, 5)
    assert len(shared) > 50 and all(np.array_equal(ws[n], wb[n]) for n in shared)


