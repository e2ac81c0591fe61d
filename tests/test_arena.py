"""The planned workspace (netdsl/runtime/arena.py) and the kernels' scratch (kernels/cpu/scratch.py)."""
import numpy as np

from helpers import compile_spec, compile_text
from netdsl.runtime.arena import layout
from netdsl.autodiff import build
from netdsl.kernels.cpu.scratch import Scratch
from netdsl.plan import nbytes, plan
from netdsl.runtime import cpu
from netdsl.runtime.model import Model


def _resnet18_layout():
    tg = build(compile_spec("resnet18.net"))
    p = plan(tg.nodes, tg.keep(), {"N": 4})
    kinds = lambda s: "into" if s.fused else cpu.KERNELS[s.nodes[0].op].writes
    return p, layout(p, kinds, lambda v: nbytes(v, p.dims))


def _spans(p):
    """id(value) -> (first step, last step it is read at) for every step output."""
    last = {id(v): i for i, free in enumerate(p.free_after) for v in free}
    return {id(v): (i, last.get(id(v), len(p.steps))) for i, s in enumerate(p.steps) for v in s.outputs}


def test_values_alive_at_the_same_step_never_share_bytes():
    p, lay = _resnet18_layout()
    spans = _spans(p)
    slots = sorted((spans[k], off, off + n) for k, (off, n) in lay.slots.items())
    assert len(slots) > 60
    for i, ((a0, a1), lo, hi) in enumerate(slots):
        for (b0, b1), lo2, hi2 in slots[i + 1:]:
            if b0 > a1:
                break
            assert hi <= lo2 or hi2 <= lo, "two live values overlap in the workspace"


def test_the_workspace_is_close_to_the_most_its_values_need_at_once():
    p, lay = _resnet18_layout()
    spans = _spans(p)
    live = [0] * len(p.steps)
    for k, (_, n) in lay.slots.items():
        a, b = spans[k]
        for i in range(a, b + 1):
            live[i] += n
    assert max(live) <= lay.size <= 1.15 * max(live)


OUT_VIEW_SPEC = """
network outview() {
  input image: f32[N, 1, 6, 6]
  input label: i64[N]
  a = image -> conv(2, k=3, p=1)
  f = flatten(a)                 # a view of a's buffer, handed back as an output
  logits = f -> linear(3)
  output f
  loss ce = cross_entropy(logits, label)
}
"""


def test_an_output_that_is_a_view_is_not_in_the_workspace(tmp_path):
    m = Model(compile_text(tmp_path, OUT_VIEW_SPEC), seed=0)
    rng = np.random.default_rng(0)
    y = np.array([0, 1])
    _, _, outs, _ = m.train_step({"image": rng.standard_normal((2, 1, 6, 6)).astype(np.float32), "label": y})
    first = outs["f"].copy()
    m.train_step({"image": rng.standard_normal((2, 1, 6, 6)).astype(np.float32), "label": y})
    np.testing.assert_array_equal(outs["f"], first)     # the next step did not write over it


def test_scratch_frames_stack_and_the_buffer_grows_to_the_high_water_mark():
    s = Scratch()
    with s.frame():
        a = s.take((10, 10), np.float32, zero=True)
        with s.frame():
            b = s.take(1000, np.float64)     # does not fit: a new, larger buffer
            assert not np.may_share_memory(a, b)
            b[:] = 1
        c = s.take(1000, np.float64)       # b's bytes, given back by its frame
        assert np.shares_memory(b, c)
        assert (a == 0).all()               # a, in the old buffer, is untouched
    assert s.buf.size >= 400 + 8000
    with s.frame():
        d = s.take((10, 10), np.float32)
        e = s.take(1000, np.float64)
        assert np.shares_memory(d, s.buf) and np.shares_memory(e, s.buf)   # no new allocation
        assert not np.may_share_memory(d, e)


def test_pages_without_transparent_huge_pages(monkeypatch):
    """A kernel built without them refuses MADV_HUGEPAGE (EINVAL): plain pages instead."""
    import mmap

    from netdsl.kernels.cpu import memory

    class NoHugePages(mmap.mmap):
        def madvise(self, *args):
            raise OSError(22, "Invalid argument")
    monkeypatch.setattr(memory.mmap, "mmap", NoHugePages)
    a = memory.pages(3 << 20, huge=True)
    a[:] = 7
    assert a.size == 3 << 20 and a.sum() == 7 * (3 << 20)


def test_a_network_without_parameters_runs_and_trains(tmp_path):
    """Its parameter and gradient buffers are empty (0 bytes: mmap still maps a byte)."""
    g = compile_text(tmp_path, "network n() {\n  input x: f32[N, 4]\n  input y: f32[N, 4]\n  z = relu(x)\n"
                               "  output z\n  loss l = l2(z, y)\n}\n")
    m = Model(g)
    x, y = np.array([[1, -1, 2, 0]], np.float32), np.zeros((1, 4), np.float32)
    np.testing.assert_array_equal(m.infer({"x": x, "y": y})["z"], [[1, 0, 2, 0]])
    total, _, _, grads = m.train_step({"x": x, "y": y})
    assert grads == {} and np.isfinite(total)
