"""A CUDA training step captured as one CUDA graph and replayed (issue 16, "Means" 3).

The first step of a program runs eagerly (it compiles or loads every kernel and warms
the allocator); the second is captured with cuStreamBeginCapture into a graph, which
is then launched; every later step copies its batch into the captured step's input
buffers and launches the graph: one driver call instead of ~270 kernel launches, each
of which costs numba several microseconds of host time. Losses and outputs are read
after the launch, as in an eager step (runtime/model.py). The optimiser update,
clipping and the finite check stay eager after it (a few launches): their scalars
(learning rate, Adam's bias corrections, the clipping factor) change from step to step,
and a graph replays the arguments it captured.

Which stream. numba-cuda 0.30.4 launches every kernel, and makes every copy, on stream
handle 0 unless a stream is passed at the call; netdsl's ~50 kernel modules pass none.
Handle 0 is the legacy default stream, which cannot be captured. With the environment
variable CUDA_PYTHON_CUDA_PER_THREAD_DEFAULT_STREAM=1 (read by cuda-bindings, numba's
driver layer, when it loads the driver; numba's own NUMBA_CUDA_PER_THREAD_DEFAULT_STREAM
is ignored with those bindings) handle 0 means the calling thread's per-thread default
stream, an ordinary stream that can be captured. `prepare()` sets it when this module
is imported by runtime/cuda.py, before numba.cuda is; `ptds_ok()` proves on the device
that it took effect (a probe kernel launched on handle 0 must land in a capture of
CU_STREAM_PER_THREAD), and graphs are refused with that reason when it did not. The
other way, an explicit stream passed to every launch and copy, would touch every kernel
module; docs/cuda.md says why this one was taken.

Capture runs in relaxed mode, so that an allocation that misses the pool (cuMemAlloc)
may happen inside it. The pool (runtime/cuda_pool.py) keeps every block the graph
uses for the graph alone until the graph is destroyed.

A plan is capturable only if no step of it does host work during a step (reads a device
value back, samples on the host, uploads a table from the host, has a shape that depends
on data, or passes a value that changes every step, such as a dropout seed): `HOST_WORK`
marks those kernel bindings, `host_work(nodes)` names the first, and such a program
runs eagerly with the reason kept (Model.graph_status; printed once to stderr). A
failure during capture (a binding not marked that copies to or from the host makes the
driver refuse) ends the capture, keeps the driver's message as the reason, and the step
is run eagerly. NETDSL_CUDA_GRAPHS=0 forces eager steps; a batch of another shape (a short
last batch) runs eagerly; under the CUDA simulator graphs are refused.
"""
from __future__ import annotations

import os
import sys
import weakref

PTDS = "CUDA_PYTHON_CUDA_PER_THREAD_DEFAULT_STREAM"


def enabled() -> bool:
    return os.environ.get("NETDSL_CUDA_GRAPHS", "1") != "0"


def prepare() -> None:
    """Before numba.cuda is imported: make stream handle 0 the per-thread default stream
    (capturable), unless graphs are off or the user chose otherwise."""
    if enabled() and os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
        os.environ.setdefault(PTDS, "1")


# ---- which bindings do host work inside a step (op name -> reason, or node -> reason or None)

_INDEX = "uploads index tables from the host on every call (kernels/cuda/tensor.py copy_view)"
_SEED = "draws with a seed that changes every step, passed as a kernel argument a graph would replay"


def _dropout(n):
    return _SEED if n.attrs.get("p", 0) != 0 else None


def _ce(n):     # 4-d logits are transposed to rows (an index table upload), 2-d are not
    x = n.inputs[1] if n.op.endswith("_grad") else n.inputs[0]
    return _INDEX + " to transpose 4-d logits" if x is not None and len(x.shape) == 4 else None


HOST_WORK = {
    "reinforce": "reads the log-probabilities and the reward back to the host",
    "reinforce_grad": "reads the loss gradient back to the host",
    "dropout": _dropout, "drop_path": _dropout,
    "sample_categorical": _SEED + ", and reads the samples back to check them",
    "sample_anchors": "samples anchors on the host (labels read back)",
    "sample_rois": "samples RoIs on the host (RoIs and ground truth read back)",
    "hard_negatives": "picks hard negatives on the host (losses read back)",
    "match_gather": "reads the matches back to gather rows", "mask_targets": "reads the matches back",
    "keypoint_targets": "reads the matches back", "yolo_targets": "reads the ground truth back",
    "proposals": "keeps a data-dependent number of boxes (the count read back)",
    "nms": "keeps a data-dependent number of boxes (the count read back)",
    "anchors": "uploads its anchor table from the host", "default_boxes": "uploads its boxes from the host",
    "box_encode": "uploads the coder's weights from the host", "box_decode": "uploads the coder's weights from the host",
    "coords": "uploads its coordinate grid from the host",
    "transpose": _INDEX, "concat": _INDEX, "split": _INDEX, "slice": _INDEX, "slice_grad": _INDEX, "pad": _INDEX,
    "cross_entropy": _ce, "cross_entropy_grad": _ce,
    "scan": "steps through time on the host, slicing each step out and writing it back with index tables "
            "uploaded per step",
    "scan_grad": "steps back through time on the host (index tables uploaded per step)",
}


def host_work(nodes) -> str | None:
    """Why these nodes (a plan's, in order) cannot be captured: the first one whose
    binding does host work inside a step, or None."""
    first, others = None, []
    for n in nodes:
        why = HOST_WORK.get(n.op)
        if callable(why):
            why = why(n)
        if not why:
            continue
        if first is None:
            first = f"{n.op} ({n.path}) {why}"
        elif n.op not in others and not first.startswith(n.op + " "):
            others.append(n.op)
    return first if not others else f"{first}; also {', '.join(others)}"


def plan_reason(plan) -> str | None:
    return host_work(n for s in plan.steps for n in s.nodes)


# ---- the driver (numba-cuda's wrapper: errors raise CudaAPIError)

def _drv():
    from numba.cuda.cudadrv.driver import binding, driver
    return driver, binding


def _stream():
    _, binding = _drv()
    return binding.CUstream(binding.CU_STREAM_PER_THREAD)


def _begin():
    driver, binding = _drv()
    driver.cuStreamBeginCapture(_stream(), binding.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_RELAXED)


def _end():
    """End the capture on the per-thread stream; returns the graph (raises if the capture was invalidated)."""
    driver, _ = _drv()
    return driver.cuStreamEndCapture(_stream())


def _abandon():
    """End a capture that failed, whatever state it is in, and drop its graph."""
    driver, _ = _drv()
    try:
        g = driver.cuStreamEndCapture(_stream())
        if g is not None and int(g):
            driver.cuGraphDestroy(g)
    except Exception:   # an invalidated capture ends with an error: nothing to keep
        pass


def _nodes(graph) -> int:
    """Nodes in a graph (for the status line; -1 if the driver would not say)."""
    driver, _ = _drv()
    try:
        r = driver.cuGraphGetNodes(graph, 0)
        return int(r[1] if isinstance(r, tuple) else r)
    except Exception:
        return -1


def _destroy(exe, graph) -> None:
    driver, _ = _drv()
    try:
        driver.cuCtxSynchronize()   # a replay may still be running
        driver.cuGraphExecDestroy(exe)
        driver.cuGraphDestroy(graph)
    except Exception:   # interpreter shutdown: the context may be gone already
        pass


_ptds: str | None | bool = False     # False: not probed yet; None: fine; str: why not


def ptds_ok() -> str | None:
    """None if work issued on stream handle 0 lands in a capture of the per-thread default
    stream (probed once on the device), else why not. The probe kernel writes 1: inside the
    capture it must not run, and the graph's launch must run it."""
    global _ptds
    if _ptds is not False:
        return _ptds
    import numpy as np
    from netdsl.kernels import cuda as K
    driver, _ = _drv()
    a = K.zeros((1,), np.float32)           # (also compiles or loads the probe kernel, outside the capture)
    err, ran_early, ran = None, None, None
    try:
        _begin()
        try:
            K.launch(K._fill, 1, a, np.float32(1))
        finally:
            g = _end()
        ran_early = float(a.copy_to_host()[0]) != 0.0
        exe = driver.cuGraphInstantiate(g, 0)
        driver.cuGraphLaunch(exe, _stream())
        ran = float(a.copy_to_host()[0]) == 1.0
        _destroy(exe, g)
    except Exception as e:
        _abandon()
        err = e
    ok = err is None and ran and not ran_early
    _ptds = None if ok else (
        f"kernels do not launch on the per-thread default stream ({PTDS}=1 was not in effect when the "
        "CUDA driver was loaded; netdsl sets it when netdsl.runtime.cuda is imported before numba.cuda)"
        + (f": {type(err).__name__}: {err}" if err else f" (probe ran during capture: {ran_early}, "
                                                      f"by the graph: {ran})"))
    return _ptds


# ---- one captured step

class StepGraph:
    """A program's step captured once: its input buffers, the values it leaves (losses,
    outputs, gradients) and the instantiated graph that rewrites them on every launch."""

    def __init__(self, exe, graph, inputs: dict, env: dict, params: tuple, nodes: int, owner):
        self.exe, self.graph, self.inputs, self.env, self.params, self.nodes = exe, graph, inputs, env, params, nodes
        self.owner = owner
        from . import cuda_pool
        pool = cuda_pool.pool()
        weakref.finalize(self, _release, exe, graph, pool, owner)

    def launch(self, host_feeds: dict) -> dict:
        for vid, buf in self.inputs.items():
            buf.copy_to_device(host_feeds[vid])     # on the same stream: after the last replay read it
        driver, _ = _drv()
        driver.cuGraphLaunch(self.exe, _stream())
        return dict(self.env)


def _same(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


def _release(exe, graph, pool, owner):
    _destroy(exe, graph)
    if pool is not None:
        pool.release_owner(owner)


_told: set = set()     # decisions already printed by this process


class CaptureFailed(Exception):
    pass


def _where(e) -> str:
    """' at OP (PATH)': the plan step that was running when e was raised (the innermost
    executor frame of its traceback), or ''."""
    from .executor import Program
    step, tb = None, e.__traceback__
    while tb is not None:
        f = tb.tb_frame
        if f.f_code is Program.run.__code__ and hasattr(f.f_locals.get("s"), "nodes"):
            step = f.f_locals["s"]
        tb = tb.tb_next
    if step is None:
        return ""
    n = step.nodes[0]
    return f" at {'a fused elementwise step from ' if step.fused else ''}{n.op} ({n.path})"


def capture(prog, st, inputs: dict, params: tuple) -> StepGraph:
    """Capture prog.run(st, inputs) into a graph (nothing runs: launch it after). The pool
    is required: without it, blocks the graph uses could be handed to others."""
    from . import cuda_pool
    pool = cuda_pool.pool()
    owner = object()
    pool.begin_capture(owner)
    try:
        _begin()
        try:
            env = prog.run(st, inputs)
        except BaseException:
            _abandon()
            raise
        graph = _end()
    except BaseException as e:
        pool.release_owner(owner)
        if not isinstance(e, Exception):
            raise       # (an interrupt)
        raise CaptureFailed(f"capture failed{_where(e)}: {type(e).__name__}: {e}") from e
    finally:
        pool.end_capture()
    st.saved.clear()        # the graph's blocks now (held by the pool for it)
    driver, _ = _drv()
    try:
        exe = driver.cuGraphInstantiate(graph, 0)
    except Exception as e:
        driver.cuGraphDestroy(graph)
        pool.release_owner(owner)
        raise CaptureFailed(f"graph instantiation failed: {e}") from e
    return StepGraph(exe, graph, dict(inputs), env, params, _nodes(graph), owner)


# ---- per model: eager, capture, replay

class GraphSteps:
    """A CUDA model's training steps: which program is captured, and why others are not.

    status: program -> "graph (N nodes)" or the reason it runs eagerly."""

    def __init__(self):
        self.status: dict = {}
        self.graph: StepGraph | None = None
        self.graph_prog = None
        self._seen: set = set()
        self._plan_ok: set = set()     # programs whose plan does no host work
        from .cuda_arena import ArenaSteps
        self.arena = ArenaSteps()       # steps not captured: replayed from launch records (cuda_arena.py)

    def reason(self, prog, st, runtime_why) -> tuple[str | None, bool]:
        """(why this step runs eagerly or None, whether that holds for this step only)."""
        from . import cuda_pool
        if not enabled():
            return "NETDSL_CUDA_GRAPHS=0", False
        if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
            return "the CUDA simulator cannot capture graphs", False
        if cuda_pool.pool() is None:
            return "netdsl's device allocator is off (NETDSL_CUDA_POOL=0): a graph's memory could be reused", False
        if prog in self.status and not self.status[prog].startswith("graph"):
            return self.status[prog], False     # the plan's marks, or a capture that failed
        if prog not in self._plan_ok:
            why = plan_reason(prog.plan)
            if why is not None:
                return why, False
            self._plan_ok.add(prog)
        if runtime_why:
            return runtime_why, True
        if prog.profile is not None:
            return "NETDSL_PROFILE times every kernel (synchronising around each)", True
        if getattr(st, "grad_ready", None) is not None:
            return "gradient hooks (distributed all-reduce) run host code between kernels", True
        if self.graph_prog is not None and prog is not self.graph_prog:
            return "a batch of another shape than the captured step's (a short last batch) runs eagerly", True
        return None, False

    def run(self, prog, st, host_feeds: dict, upload, params: tuple, runtime_why=None) -> dict:
        """One training step of `prog`: eager, captured or replayed. host_feeds: value id ->
        host array; upload(host_feeds) -> value id -> device array."""
        why, transient = self.reason(prog, st, runtime_why)
        if why is not None:
            self._note(prog, why, transient)
            if transient:
                self._seen.add(prog)     # (it warmed the kernels all the same)
                return prog.run(st, upload(host_feeds))
            return self.arena.run(prog, st, host_feeds, upload, params, runtime_why)  # eager, or its records
        g = self.graph if self.graph_prog is prog else None
        if g is not None and not _same(g.params, params):   # parameters replaced from outside: capture again
            self.graph = g = None
            self._seen.discard(prog)
        if g is not None:
            return g.launch(host_feeds)
        if prog not in self._seen:                   # first step: compile, load, warm up
            self._seen.add(prog)
            return prog.run(st, upload(host_feeds))
        why = ptds_ok()
        if why is None:
            try:
                g = capture(prog, st, upload(host_feeds), params)
            except CaptureFailed as e:
                why = str(e)
        if why is not None:
            self._note(prog, why)
            st.saved.clear()
            return prog.run(st, upload(host_feeds))
        self.graph, self.graph_prog = g, prog
        self._note(prog, f"graph ({g.nodes} nodes)")
        return g.launch(host_feeds)

    def _note(self, prog, status: str, transient: bool = False) -> None:
        """Keep the decision; say it on stderr once a process (`netdsl run --device cuda` shows it)."""
        if not transient:
            self.status[prog] = status
        if status not in _told:
            _told.add(status)
            print("netdsl: CUDA training step: " + ("replayed as one CUDA graph " + status[6:]
                  if status.startswith("graph") else f"eager: {status}"), file=sys.stderr)
