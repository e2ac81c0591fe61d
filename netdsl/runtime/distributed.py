"""Data-parallel training over MPI: `mpirun -n K netdsl run SPEC --distributed` (docs/mpi.md).

Each of the K ranks holds the whole model and reads its slice of every global batch
of K x batch examples (the loaders' `shard`), so K ranks of batch B take the steps one
process of batch K*B takes, on the same examples in the same order. A step's weight
gradients are summed with MPI allreduce in a few flat buckets, each started
(non-blocking Iallreduce) as soon as the backward pass has produced all of its
gradients; loss sums, metric states and batch-norm running statistics are summed or
averaged across ranks; rank 0's weights, optimiser state, random state and position
are everyone's at the start. Rank 0 alone writes the run directory.

A rank that fails prints its error and calls MPI_Abort, which ends every rank of the
job at once instead of leaving them waiting in the next collective.
"""
from __future__ import annotations

import hashlib
import os
import sys
import traceback

import numpy as np

from ..errors import NetdslError

# set by the launchers (Open MPI, MPICH's hydra, PMIx-based ones such as srun --mpi=pmix)
LAUNCHER_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMI_RANK", "PMIX_RANK", "MPI_LOCALNRANKS")
INSTALL_HINT = "bash scripts/setup.sh --mpi, or pip install 'netdsl[mpi]' (Open MPI and mpi4py wheels; docs/mpi.md)"
LAUNCH_HINT = ("mpirun -n 2 netdsl run SPEC --distributed (as root Open MPI also wants OMPI_ALLOW_RUN_AS_ROOT=1 "
               "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; more ranks than cores: mpirun --oversubscribe); docs/mpi.md")


def connect() -> "DataParallel":
    """The job this process is a rank of; a NetdslError when mpi4py or an MPI launcher is missing."""
    try:
        import mpi4py
    except ImportError:
        raise NetdslError("--distributed needs mpi4py and an MPI library, and mpi4py is not installed",
                          hint=INSTALL_HINT) from None
    if not any(v in os.environ for v in LAUNCHER_VARS):
        raise NetdslError("--distributed trains as one rank of an MPI job, and this process was not started by an "
                          "MPI launcher", hint=LAUNCH_HINT)
    mpi4py.rc.thread_level = "funneled"     # only the main thread calls MPI (kernel threads never do)
    try:
        from mpi4py import MPI
    except (ImportError, RuntimeError) as e:
        raise NetdslError(f"mpi4py cannot load an MPI library ({str(e).strip()[:200]})", hint=INSTALL_HINT) from None
    return DataParallel(MPI.COMM_WORLD, MPI)


class DataParallel:
    def __init__(self, comm, MPI):
        self.comm, self.MPI = comm, MPI
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.model = self.reducer = None
        self.started = False
        self.last_n = 0

    @property
    def root(self) -> bool:
        return self.rank == 0

    # ---- failures

    def guarded(self, run, render):
        """run(), ending every rank when this one fails: print the error (render(e) for a
        NetdslError), then MPI_Abort, so that no rank waits forever in a collective.
        One rank alone fails as a plain process does."""
        if self.size == 1:
            return run()
        try:
            return run()
        except BaseException as e:      # KeyboardInterrupt and SystemExit too: the others would hang
            if isinstance(e, SystemExit) and not e.code:
                raise
            code = 2 if isinstance(e, NetdslError) else 130 if isinstance(e, KeyboardInterrupt) else 1
            why = render(e) if isinstance(e, NetdslError) else "".join(traceback.format_exception(e)).rstrip()
            sys.stdout.flush()
            print(f"netdsl: rank {self.rank} of {self.size} failed, stopping every rank:\n{why}",
                  file=sys.stderr, flush=True)
            self.comm.Abort(code)

    # ---- the start: everyone takes rank 0's state

    def attach(self, trainer) -> None:
        """Called by the Trainer: rank r > 0 draws its dropout and sampling masks from a
        seed of its own (the same masks on every rank would correlate their examples)."""
        self.model = trainer.model
        if self.rank:
            self.model.seed = f"{self.model.seed}:rank{self.rank}"

    def start(self, trainer) -> None:
        """Rank 0's parameters, buffers, optimiser state, random-generator state, epoch
        and step on every rank (rank 0 alone read a checkpoint or weights file)."""
        if self.started:
            return
        self.started = True
        for name in trainer.model.g.params:
            a = trainer.model.params[name]
            self.comm.Bcast(_contiguous(a, name), root=0)
        state = self.comm.bcast((trainer.opt.state_dict(), trainer.rng.bit_generator.state, trainer.epoch,
                                 trainer.model.step) if self.root else None, root=0)
        if not self.root:
            opt, rng, trainer.epoch, trainer.model.step = state
            trainer.opt.load_state_dict(opt)
            trainer.rng.bit_generator.state = rng
        self.reducer = GradReducer(self, trainer.model)

    # ---- a training step

    def train_step(self, feeds: dict, n: int, extra=(), carry=None):
        """The model's train_step on this rank's n examples, with the gradients averaged over
        the global batch (weighted by each rank's count: a short last batch splits unevenly).
        Returns (total loss, {loss: value}, outputs, gradients) with the losses averaged over
        the global batch; the global count is left in self.last_n."""
        r = self.reducer
        r.begin(n)
        try:
            if n:
                total, losses, outs, grads = self.model.train_step(feeds, extra=extra, carry=carry)
            else:       # this rank's part of a short last batch is empty: it sends zeros
                self.model.step += 1
                total, losses, outs, grads = 0.0, {l.name: 0.0 for l in self.model.g.losses}, {}, None
        finally:
            self.model.grad_ready = None
        names = list(losses)
        sums, grads = r.finish(grads, [n, n * total, *(n * losses[k] for k in names)])
        self.last_n = int(round(sums[0]))
        return sums[1] / self.last_n, {k: v / self.last_n for k, v in zip(names, sums[2:])}, outs, grads

    # ---- sums over the ranks

    def sum(self, values) -> list[float]:
        a = np.asarray(values, dtype=np.float64)
        self.comm.Allreduce(self.MPI.IN_PLACE, a, op=self.MPI.SUM)
        return a.tolist()

    def merge_metrics(self, metrics) -> None:
        """Every rank's metric state summed into each (what reset() sets: counts, a confusion
        matrix), so result() is the metric of every rank's examples together."""
        scalars = []
        for m in metrics:
            for k in _state_names(m):
                v = getattr(m, k)
                if isinstance(v, np.ndarray):
                    self.comm.Allreduce(self.MPI.IN_PLACE, _contiguous(v, k), op=self.MPI.SUM)
                else:
                    scalars.append((m, k, float(v)))
        total = self.sum([v for _, _, v in scalars])
        for (m, k, _), v in zip(scalars, total):
            setattr(m, k, v)

    def end_epoch(self, trainer) -> str:
        """Batch-norm running statistics averaged over the ranks (each rank's follow its own
        batches, as in PyTorch DDP without SyncBatchNorm); then every rank's weights checked
        identical by digest (they are updated from the same averaged gradients). Returns
        the digest."""
        model = trainer.model
        for name, p in model.g.params.items():
            if p.role == "buffer":
                a = _contiguous(model.params[name], name)
                if a.dtype.kind == "f":
                    self.comm.Allreduce(self.MPI.IN_PLACE, a, op=self.MPI.SUM)
                    a *= a.dtype.type(1.0 / self.size)
                else:
                    self.comm.Bcast(a, root=0)
        d = digest(model.host_params())
        every = self.comm.allgather(d)
        if len(set(every)) > 1:     # not expected; rank 0's state is made everyone's again
            trainer.log(f"warning: weights differ between ranks after epoch {trainer.epoch + 1} "
                        f"({len(set(every))} versions); every rank takes rank 0's")
            self.started = False
            self.start(trainer)
            d = digest(model.host_params())
        return d


class GradReducer:
    """Weight gradients summed across ranks in a few flat buckets, in backward order.

    The model calls `ready(values, arrays)` after each step of its training program
    (Model.grad_ready): a gradient is copied, scaled by this rank's example count, into
    its bucket as soon as it is made, and a bucket whose gradients are all in starts its
    Iallreduce while the backward pass goes on. Buckets start strictly in order (every
    rank must post the same collectives in the same order); `finish` starts what is
    left, waits, and scales the sums into averages. With NETDSL_DIST_OVERLAP=0 every
    bucket starts after the backward pass (the comparison the benchmark makes)."""

    MIN_BUCKET, MAX_BUCKET = 256 << 10, 25 << 20      # bytes; a quarter of the gradients in between

    def __init__(self, dist: DataParallel, model, bucket_bytes: int | None = None):
        self.dist, self.model = dist, model
        self.overlap = os.environ.get("NETDSL_DIST_OVERLAP", "1") != "0"
        grads = model.training_graph.grads
        names = [n for n in reversed(list(model.g.params)) if n in grads]   # about the order backward makes them
        shapes = {n: tuple(int(d) for d in model.g.params[n].shape) for n in names}
        dtype = np.dtype(model.dtype)
        total = sum(int(np.prod(s)) for s in shapes.values()) * dtype.itemsize
        cap = bucket_bytes or min(self.MAX_BUCKET, max(self.MIN_BUCKET, total // 4))
        groups, cur, size = [], [], 0
        for n in names:
            cur.append(n)
            size += int(np.prod(shapes[n])) * dtype.itemsize
            if size >= cap:
                groups.append(cur)
                cur, size = [], 0
        if cur:
            groups.append(cur)
        self.buffers, self.views, self.bucket_of = [], {}, {}
        for b, group in enumerate(groups):
            buf = np.empty(sum(int(np.prod(shapes[n])) for n in group), dtype)
            at = 0
            for n in group:
                k = int(np.prod(shapes[n]))
                self.views[n] = buf[at:at + k].reshape(shapes[n])
                self.bucket_of[n] = b
                at += k
            self.buffers.append(buf)
        self.groups = groups
        self.value_name = {id(grads[n]): n for n in names}
        self.bytes = total

    def begin(self, n: int) -> None:
        self.scale = self.model.dtype.type(n)
        self.filled = [set() for _ in self.groups]
        self.requests, self.next = [], 0
        self.model.grad_ready = self.ready if self.overlap and n else None

    def ready(self, values, arrays) -> None:
        hit = False
        for v, a in zip(values, arrays):
            name = self.value_name.get(id(v))
            if name is not None:
                np.multiply(a, self.scale, out=self.views[name])
                self.filled[self.bucket_of[name]].add(name)
                hit = True
        if hit:
            self._start(lambda b: len(self.filled[b]) == len(self.groups[b]))
        if self.requests:   # Open MPI moves a non-blocking collective on only inside MPI calls
            self.dist.MPI.Request.Testall(self.requests)

    def _start(self, ready) -> None:
        MPI = self.dist.MPI
        while self.next < len(self.groups) and ready(self.next):
            self.requests.append(self.dist.comm.Iallreduce(MPI.IN_PLACE, self.buffers[self.next], op=MPI.SUM))
            self.next += 1

    def finish(self, grads: dict | None, sums: list[float]) -> tuple[list[float], dict]:
        """Start the buckets not yet started (their missing gradients from `grads`; zeros
        from a rank with no examples), then the sum of `sums` (whose first entry is the
        example count), wait for all, and return (the sums, the averaged gradients: views
        into the buckets, overwritten by the next step). The order in which collectives
        are posted is the same on every rank, whatever each rank's backward did."""
        for b in range(self.next, len(self.groups)):
            for name in self.groups[b]:
                if name in self.filled[b]:
                    continue
                if grads is None:
                    self.views[name][...] = 0
                else:
                    np.multiply(grads[name], self.scale, out=self.views[name])
        self._start(lambda b: True)
        MPI = self.dist.MPI
        totals = np.asarray(sums, dtype=np.float64)
        self.requests.append(self.dist.comm.Iallreduce(MPI.IN_PLACE, totals, op=MPI.SUM))
        MPI.Request.Waitall(self.requests)
        inv = self.model.dtype.type(1.0 / totals[0])
        for buf in self.buffers:
            buf *= inv
        return totals.tolist(), self.views


def digest(params: dict) -> str:
    """SHA-256 of the parameters by sorted name (tests/test_distributed.py recomputes it
    from the checkpoint)."""
    h = hashlib.sha256()
    for k in sorted(params):
        h.update(k.encode())
        h.update(np.ascontiguousarray(params[k]).tobytes())
    return h.hexdigest()


def _contiguous(a, name: str) -> np.ndarray:
    if not (isinstance(a, np.ndarray) and a.flags.c_contiguous):
        raise TypeError(f"{name}: MPI reads and writes CPU arrays in place, got {type(a).__name__}")
    return a


def _state_names(metric) -> list[str]:
    """The attributes metric.reset() sets: what the metric accumulates."""
    class Recorder:
        def __init__(self):
            object.__setattr__(self, "names", [])

        def __getattr__(self, k):
            return getattr(metric, k)

        def __setattr__(self, k, v):
            self.names.append(k)

    r = Recorder()
    type(metric).reset(r)
    return r.names
