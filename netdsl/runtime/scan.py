"""Running `scan` and `scan_grad`: a step's program once per time step, forward, then its
VJP in reverse over time.

The step graph is planned once as a Program of its own (fused, scheduled, buffers
released as in any graph) and run T times; sequences are fed a time slice at a time,
carries go from one step's outputs to the next step's inputs, and emits are written
into their [N, T, ...] outputs. While training, what the step's backward reads (its
residuals: autodiff.step_grad) and what its kernels saved (state.saved) are kept for
every time step. The backward runs the step's VJP program from T-1 down to 0: the
gradient of the carries entering step t is what flows into step t-1, the sequences'
gradients are written at t, and parameters' and captured tensors' gradients are summed.

On the CPU, a scan whose step is one LSTM or vanilla RNN (layer_match.py) skips all that:
it runs as one layer kernel call each way (_Layer, kernels/cpu/recurrent_layer.py).

Truncated backpropagation through time feeds a chunk's final carries as the next chunk's
initial ones: `state.carry_in` (carry path name -> array) replaces a scan's initial
carries, so no gradient flows into the previous chunk. `state.grad_flow` (a dict) asks
the backward to record, for every carry, the norm of the gradient reaching the state
leaving each step t from the steps after it: the notes' vanishing and exploding
gradients, made visible (`netdsl run --grad-flow`).
"""
from __future__ import annotations

import weakref
import zlib
from contextlib import nullcontext

import numpy as np

from ..autodiff import step_grad, step_inputs, trainable
from ..ir.dims import subs
from ..ops.registry import is_float
from .. import layer_match
from .bindings import array_dtype


class StepState:
    """A time step's view of the run state: the same parameters, dims and phase, its own
    saved tensors, and seeds that include the time index (dropout draws a new mask at
    every step)."""

    def __init__(self, st, t: int):
        self.params, self.dims, self.train, self.seed, self.dtype = st.params, st.dims, st.train, st.seed, st.dtype
        self.step, self.t, self.fuse = st.step, t, getattr(st, "fuse", True)
        self.saved: dict = {}

    def shape_of(self, v) -> tuple:
        return _shape_of(self, v)

    def seed_for(self, node) -> int:
        return zlib.crc32(f"{self.seed}:{self.step}:t{self.t}:{node.path}".encode())


def _shape_of(st, v) -> tuple:
    return tuple(int(subs(d, st.dims)) for d in v.shape)


class CpuArrays:
    """The few array operations a scan needs, on numpy arrays (and the kernels it calls)."""
    from netdsl.kernels import cpu as kernels

    @staticmethod
    def take(a, t):
        return np.ascontiguousarray(a[:, t])

    @staticmethod
    def view(a, t):
        """a[:, t] without a copy, for kernels that read rows at a stride (cell_step)."""
        return a[:, t]

    @staticmethod
    def put(out, t, a):
        out[:, t] = a

    # cell_step_grads multiplies by transposed copies of these weights while it is open
    transposed = staticmethod(kernels.recurrent.transposed_weights)
    joint = True    # a cell's h and x rows side by side: one weight-gradient GEMM (_Cell.keep)
    # an lstm or rnn cell's backward writes its gates' gradient of step t into the kept buffer
    grads_into = staticmethod(kernels.recurrent.gate_grads_into)
    empty = staticmethod(np.empty)
    zeros = staticmethod(np.zeros)
    # a scan whose step is one lstm or rnn (layer_match.py) runs as one kernel call each way (_Layer)
    layer = True

    @staticmethod
    def norm(a) -> float:
        return float(np.sqrt(np.vdot(a, a)))

    @staticmethod
    def add(acc, a):
        """acc + a, reusing acc (an array this module made) when it can."""
        if acc is None:
            return np.array(a, copy=True)
        acc += a
        return acc


CELLS = ("rnn_cell", "lstm_cell", "gru_cell")


class _Deferred:
    """A node of the step whose weight gradients are formed once for all T steps: the
    step's backward leaves, per step, the gradient rows and the input rows they multiply
    in st.hoisted_grad (see the cell and linear bindings), and after the loop each weight
    gradient is one GEMM over N*T rows instead of T GEMMs over N rows adding into it."""
    seq = None

    def __init__(self, node, roles):
        self.node = node
        self.p = {r: (q.name if (q := node.params.get(r)) is not None else None) for r in roles}
        self.names = {n for n in self.p.values() if n}

    @staticmethod
    def keep(A, bufs, t, T, got, x=None):
        """Put step t's rows into [R, T, ...] buffers, made at the first step the backward
        runs (a None row is not kept); x: the scanned sequence a cell reads, if any."""
        if bufs is None:
            bufs = [None if a is None else A.empty((a.shape[0], T) + a.shape[1:], a.dtype) for a in got]
        for b, a in zip(bufs, got):
            if b is not None:
                A.put(b, t, a)
        return bufs

    @staticmethod
    def rows(a):
        return a.reshape(a.shape[0] * a.shape[1], a.shape[2])


class _Linear(_Deferred):
    """A linear layer of the step (the notes' written-out cells: linear(concat(h, x_t)))."""

    def __init__(self, node):
        super().__init__(node, ("weight", "bias"))

    def backward(self, K, st, x, bufs, need_gx: bool):
        gy, xs = bufs
        w, b = self.p["weight"], self.p["bias"]
        out = {}
        out[w], gb = K.weight_grad(self.rows(gy), self.rows(xs), need_gb=b is not None)
        if b:
            out[b] = gb
        return out, None


class _TimeMajor(list):
    """A cell's kept [gxp, None, [h | x], None] laid out [T, N, ...] (_Cell.keep): step t's
    rows are one contiguous block, written in place by the cell's backward (a time slice
    of [N, T, 4H] has its rows 800 KB apart, on the same cache sets)."""


class _Cell(_Deferred):
    """A fused cell of the step (keeps gxp, ghp unless it is gxp (not gru), h, and x unless
    it is a sequence of the scan). When its input is one of the
    scanned sequences (`seq` its index), its input projection x W_ih^T + b_ih is also one
    GEMM before the loop, and each step runs only the recurrent GEMM and the gates."""

    def __init__(self, cell, seq):
        super().__init__(cell, ("weight_ih", "bias_ih", "weight_hh", "bias_hh"))
        self.seq = seq
        self.w, self.b = self.p["weight_ih"], self.p["bias_ih"]

    def project(self, K, st, x):
        N, T, D = x.shape
        xp = K.project(x.reshape(N * T, D), st.params[self.w], st.params[self.b] if self.b else None)
        return xp.reshape(N, T, xp.shape[1])

    def keep(self, A, bufs, t, T, got, x=None):
        """As _Deferred.keep, but when the input and recurrent pre-activations share their
        gradient (lstm, rnn: ghp is gxp) and x is a scanned sequence, h's rows are kept
        with x's columns beside them ([T, N, H + D], x copied in once): W_hh's and W_ih's
        gradients are then one GEMM gxp^T [h | x] (a K = 64 GEMM of its own ran at two
        thirds of the speed) and the two bias gradients one column sum. These buffers are
        _TimeMajor; gxp is not copied when the cell's backward wrote it in place (into)."""
        if bufs is None and getattr(A, "joint", False) and x is not None and got[1] is None and got[3] is None:
            bufs = self._joint(A, got[0].shape[1], got[2], x, T)
        if isinstance(bufs, _TimeMajor):
            if getattr(got[0], "base", None) is not bufs[0]:
                bufs[0][t] = got[0]
            bufs[2][t, :, :got[2].shape[1]] = got[2]
            return bufs
        return _Deferred.keep(A, bufs, t, T, got)

    @staticmethod
    def _joint(A, G, h, x, T):
        """_TimeMajor buffers: gxp [T, N, G] and [h | x] [T, N, H + D] with x copied in."""
        hx = A.empty((T, h.shape[0], h.shape[1] + x.shape[2]), h.dtype)
        hx[:, :, h.shape[1]:] = x.transpose(1, 0, 2)
        return _TimeMajor([A.empty((T, h.shape[0], G), h.dtype), None, hx, None])

    def into(self, A, st, x, T):
        """(w_hh, the joint buffers made before the loop) for an lstm or rnn cell (whose
        input and recurrent pre-activations share their gradient) reading a scanned
        sequence: its backward writes that gradient straight into them (A.grads_into).
        Else None."""
        if self.node.op not in ("lstm_cell", "rnn_cell") or x is None or not getattr(A, "grads_into", None):
            return None
        w = st.params[self.p["weight_hh"]]
        if x.dtype != w.dtype:
            return None
        return w, self._joint(A, w.shape[0], A.empty((x.shape[0], w.shape[1]), w.dtype), x, T)

    def backward(self, K, st, x, bufs, need_gx: bool):
        """{param name: gradient} of the cell over all steps, and gx [N, T, D] of a
        sequence input (or None)."""
        gxp, ghp, h, xs = bufs
        rows, out, gx = self.rows, {}, None
        wh, bh = self.p["weight_hh"], self.p["bias_hh"]
        H = st.params[wh].shape[1]
        if isinstance(bufs, _TimeMajor):     # [h | x] rows (keep): one GEMM for both weights
            gw, gb = K.weight_grad(rows(gxp), rows(h), need_gb=bool(self.b or bh))
            out[wh], out[self.w] = np.ascontiguousarray(gw[:, :H]), np.ascontiguousarray(gw[:, H:])
            if self.b:
                out[self.b] = gb
            if bh:
                out[bh] = gb.copy() if self.b else gb
            if need_gx:     # rows (t, n): [N, T, D] seen through a transpose
                gx = K.matmul_rows(rows(gxp), st.params[self.w]).reshape(gxp.shape[:2] + (-1,)).transpose(1, 0, 2)
            return out, gx
        if self.seq is not None:
            gx, out[self.w], gb = K.project_backward(rows(gxp), rows(x), st.params[self.w], need_gx=need_gx)
            gx = gx.reshape(x.shape) if gx is not None else None
        else:
            out[self.w], gb = K.weight_grad(rows(gxp), rows(xs), need_gb=self.b is not None)
        if self.b:
            out[self.b] = gb
        out[wh], gbh = K.weight_grad(rows(ghp if ghp is not None else gxp), rows(h), need_gb=bh is not None)
        if bh:
            out[bh] = gbh
        return out, gx


class _Layer:
    """A scan whose step is one LSTM or vanilla RNN reading the scanned sequence, carrying
    its state and emitting h (layer_match.py: lib/rnn.net's `lstm` and `rnn` steps fused,
    and its `lstm` written out): run over all T steps by one kernel call each way
    (kernels/cpu/recurrent_layer.py) instead of the step's programs once per time step,
    with the same numbers (tests/test_recurrent_layer.py)."""

    ROLES = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")

    def __init__(self, lay: layer_match.Layer):
        m = lay.node
        self.kind, self.written = lay.kind, lay.written
        self.order = "ifog" if lay.written else m.attrs.get("order", "ifog")
        names = {r: (q.name if (q := m.params.get(r)) is not None else None) for r in (*self.ROLES, "weight", "bias")}
        self.p = names

    @staticmethod
    def match(node) -> "_Layer | None":
        lay = layer_match.match(node)
        return _Layer(lay) if lay is not None else None

    def _params(self, st, H):
        """(w_ih, w_hh, b_ih, b_hh) of the layer kernel."""
        get = lambda r: st.params[self.p[r]] if self.p[r] else None
        if self.written:        # one W over [h; x]
            w = get("weight")
            return w[:, H:], w[:, :H], get("bias"), None
        return tuple(get(r) for r in self.ROLES)

    def usable(self, A, st, x) -> bool:
        w = st.params[self.p["weight" if self.written else "weight_hh"]]
        return getattr(A, "layer", False) and getattr(st, "grad_flow", None) is None and x.dtype == w.dtype

    def forward(self, A, st, x, carry, ne):
        """The scan's outputs (hs if emitted, then the final carries) and, training, what
        the backward reads."""
        c0 = carry[1] if self.kind == "lstm" else None
        hs, h, c, saved = A.kernels.layer_forward(self.kind, x, carry[0], c0, *self._params(st, carry[0].shape[1]),
                                                  self.order, st.train)
        return [hs] * ne + [h] + ([c] if self.kind == "lstm" else []), saved

    def backward(self, A, st, saved, gemit, gcarry, need_gx):
        """(gx or None, the initial carries' gradients, {param name: gradient})."""
        gc = gcarry[1] if self.kind == "lstm" else None
        gx, gh0, gc0, gwi, gwh, gb = A.kernels.layer_backward(saved, gemit, gcarry[0], gc, need_gx)
        p = self.p
        if self.written:
            grads = {p["weight"]: np.concatenate([gwh, gwi], axis=1)}
            if p["bias"]:
                grads[p["bias"]] = gb
        else:
            grads = {p["weight_ih"]: gwi, p["weight_hh"]: gwh}
            if p["bias_ih"]:
                grads[p["bias_ih"]] = gb
            if p["bias_hh"]:
                grads[p["bias_hh"]] = gb.copy() if p["bias_ih"] else gb
        return gx, [gh0] + ([gc0] if self.kind == "lstm" else []), grads


class _LayerSaved(tuple):
    """What _Layer.forward kept for its backward (st.saved of the scan node)."""


def _hoists(node, sg) -> list[_Deferred]:
    """The step's fused cells and linear layers whose parameters nothing else in the step
    uses (and, training, whose parameter gradients are their own grad node's)."""
    seqs = [node.body.inputs[n] for n in node.attrs["seq"]]
    out = []
    for m in node.body.nodes:
        if m.op in CELLS:
            h = _Cell(m, next((i for i, v in enumerate(seqs) if m.inputs[0] is v), None))
        elif m.op == "linear" and sg is not None:
            h = _Linear(m)
        else:
            continue
        if sg is None or all(sg.param_grads[n].producer.fwd is m for n in h.names if n in sg.param_grads):
            out.append(h)
    return out


class _Runner:
    """One scan node's step programs for one set of dims and phase."""

    def __init__(self, node, dims, train: bool, fuse: bool, target: str):
        from .executor import Program      # (the executor imports the kernel tables, which import this)
        body = node.body     # (no reference to the node itself: it is the cache's weak key)
        self.ins = step_inputs(node)
        self.ns, self.nc = len(node.attrs["seq"]), len(body.carries)
        self.outs = list(body.outputs.values()) + [c.step_out for c in body.carries]
        self.names = [c.name for c in body.carries]
        self.sg = step_grad(node) if train else None
        self.hoists = _hoists(node, self.sg)
        self.layer = _Layer.match(node)
        keep = self.outs + (self.sg.residuals if train else [])
        self.fwd = Program(body.nodes, keep, dims, fuse, target)
        self.bwd = None
        if train:
            sg = self.sg
            grads = [g for g in sg.input_grads if g is not None] + list(sg.param_grads.values())
            self.bwd = Program(sg.nodes, grads, dims, fuse, target)


_RUNNERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _runner(node, st, target) -> _Runner:
    fuse = getattr(st, "fuse", True)
    key = (tuple(sorted(st.dims.items())), bool(st.train), fuse, target)
    per_node = _RUNNERS.setdefault(node, {})
    r = per_node.get(key)
    if r is None:
        r = per_node[key] = _Runner(node, st.dims, st.train, fuse, target)
    return r


def bind(table: dict, target: str, A) -> None:
    """Bind scan and scan_grad into a target's kernel table; A holds its array operations."""
    from .bindings import registrar
    kernel = registrar(table)

    @kernel("scan", writes="new")
    def scan(n, ins, st):
        r = _runner(n, st, target)
        T = int(subs(n.attrs["length"], st.dims))
        ns, nc = r.ns, r.nc
        seqs, carry, caps = ins[:ns], list(ins[ns:ns + nc]), list(ins[ns + nc:])
        given = getattr(st, "carry_in", None) or {}
        carry = [given.get(name, c) for name, c in zip(r.names, carry)]
        ne = len(r.outs) - nc
        if r.layer is not None and r.layer.usable(A, st, seqs[0]):
            outs, saved = r.layer.forward(A, st, seqs[0], carry, ne)
            if st.train:
                st.saved[id(n)] = _LayerSaved(saved)
            return outs
        emits = [A.empty(_shape_of(st, v), array_dtype(v.dtype, st.dtype)) for v in n.outputs[:ne]]
        projected = [(h, h.project(A.kernels, st, seqs[h.seq])) for h in r.hoists if h.seq is not None]
        saved = []
        view = getattr(A, "view", A.take)      # the projected rows of step t, in place where A can
        for t in range(T):
            sst = StepState(st, t)
            sst.hoisted = {id(h.node): view(xp, t) for h, xp in projected}
            env = r.fwd.run(sst, dict(zip(map(id, r.ins), [A.take(s, t) for s in seqs] + carry + caps)))
            for e, v in zip(emits, r.outs[:ne]):
                A.put(e, t, env[id(v)])
            carry = [env[id(v)] for v in r.outs[ne:]]
            if st.train:
                saved.append(({id(v): env[id(v)] for v in r.sg.residuals}, sst.saved))
        if st.train:
            st.saved[id(n)] = saved
        return emits + carry

    @kernel("scan_grad", writes="new")
    def scan_grad(g, ins, st):
        n = g.fwd
        r = _runner(n, st, target)
        sg = r.sg
        T = int(subs(n.attrs["length"], st.dims))
        k, nin = g.attrs["ngrads"], len(n.inputs)
        floats = [i for i, v in enumerate(n.outputs) if is_float(v.dtype)]
        gy = dict(zip(floats, ins[:k]))
        fwd_in = ins[k:k + nin]
        ns, nc = r.ns, r.nc
        ne = len(r.outs) - nc
        caps = fwd_in[ns + nc:]
        like = g.attrs["like"]
        want = {j - k for j in like if j < k + nin}
        # gradients of the step's outputs: the emits' time slices, then the carries leaving it
        gcarry = [gy.get(ne + j) for j in range(nc)]
        saved = st.saved.pop(id(n))
        if isinstance(saved, _LayerSaved):
            gx, gcarry, gpar = r.layer.backward(A, st, saved, gy.get(0) if ne else None, gcarry, 0 in want)
            return _grads_out(A, st, n, like, k, ns, nc, {0: gx}, gcarry, {}, gpar)
        gseq = {i: A.zeros(_shape_of(st, n.inputs[i]), array_dtype(n.inputs[i].dtype, st.dtype))
                for i in range(ns) if i in want}
        gcap: dict[int, object] = {}
        gpar: dict[str, object] = {}
        per_cell = [None] * len(r.hoists)     # each hoisted cell's [N, T, ...] rows for its weight GEMMs
        deferred = {name for h in r.hoists for name in h.names}
        flow = getattr(st, "grad_flow", None)     # carry path -> |dL/dh_t| per t (--grad-flow)
        if flow is not None:
            flow.update({name: [0.0] * T for name in r.names})
        held = getattr(A, "transposed", None)    # (the CPU's: the step GEMM of the cells' backward)
        w_hh = [st.params[h.p["weight_hh"]] for h in r.hoists if isinstance(h, _Cell)]
        seqx = [fwd_in[h.seq] if h.seq is not None else None for h in r.hoists]
        into = [h.into(A, st, x, T) if isinstance(h, _Cell) else None for h, x in zip(r.hoists, seqx)]
        with held(w_hh) if held else nullcontext():
            for t in range(T - 1, -1, -1):
                for w_b in into:
                    if w_b is not None:     # the cell's gates' gradient of step t straight into its buffer
                        A.grads_into(w_b[0], w_b[1][0][t])
                if flow is not None:    # what reaches the state leaving step t from the steps after it
                    for name, c in zip(r.names, gcarry):
                        flow[name][t] = A.norm(c) if c is not None else 0.0
                res, kept = saved[t]
                sst = StepState(st, t)
                sst.saved = kept
                sst.hoisted_grad = {id(h.node): h.seq is not None for h in r.hoists}
                feeds = dict(res)
                for j, s in enumerate(sg.seeds):
                    a = A.take(gy[j], t) if j < ne and j in gy else (gcarry[j - ne] if j >= ne else None)
                    if a is not None:
                        feeds[id(s)] = a
                feeds.update(zip(map(id, r.ins[ns + nc:]), caps))
                env = r.bwd.run(sst, feeds)
                for i in gseq:
                    if sg.input_grads[i] is not None:
                        A.put(gseq[i], t, env[id(sg.input_grads[i])])
                gcarry = [None if sg.input_grads[ns + j] is None else env[id(sg.input_grads[ns + j])]
                          for j in range(nc)]
                for j in range(len(caps)):
                    gv = sg.input_grads[ns + nc + j]
                    if ns + nc + j in want and gv is not None:
                        gcap[j] = A.add(gcap.get(j), env[id(gv)])
                for name, gv in sg.param_grads.items():
                    if name not in deferred:
                        gpar[name] = A.add(gpar.get(name), env[id(gv)])
                for i, h in enumerate(r.hoists):
                    got = sst.hoisted_grad[id(h.node)]
                    if isinstance(got, tuple):      # (a cell no loss depends on has no backward)
                        bufs = per_cell[i] if per_cell[i] is not None or into[i] is None else into[i][1]
                        per_cell[i] = h.keep(A, bufs, t, T, got, seqx[i])
            for w_b in into:
                if w_b is not None:
                    A.grads_into(w_b[0], None)
        for h, bufs in zip(r.hoists, per_cell):     # the weight gradients: one GEMM each over all steps
            if bufs is None:
                continue
            x = fwd_in[h.seq] if h.seq is not None else None
            grads, gx = h.backward(A.kernels, st, x, bufs, h.seq in gseq)
            if gx is not None:
                gseq[h.seq] = A.add(gseq[h.seq], gx)
            for name, gv in grads.items():
                gpar[name] = A.add(gpar.get(name), gv)
        return _grads_out(A, st, n, like, k, ns, nc, gseq, gcarry, gcap, gpar)


def _grads_out(A, st, n, like, k, ns, nc, gseq, gcarry, gcap, gpar) -> list:
    """scan_grad's outputs in its `like` order: the sequences', carries', captures' and
    parameters' gradients (zeros where none reached them)."""
    roles = [role for role, _ in trainable(n)]
    nin = len(n.inputs)
    out = []
    for j in like:
        i = j - k
        if i < ns:
            out.append(gseq[i])
        elif i < ns + nc:
            c = gcarry[i - ns]
            out.append(c if c is not None else A.zeros(_shape_of(st, n.inputs[i]), st.dtype))
        elif i < nin:
            c = gcap.get(i - ns - nc)
            out.append(c if c is not None else A.zeros(_shape_of(st, n.inputs[i]), st.dtype))
        else:
            name = roles[i - nin]
            c = gpar.get(name)
            out.append(c if c is not None else A.zeros(st.params[name].shape, st.dtype))
    return out
