"""Static memory for a plan: every intermediate a kernel can write into a given buffer
gets an offset in one workspace, and values whose lifetimes do not overlap share bytes.

Released arrays go back to malloc, which then has to fit the next step's differently
sized tensors around whatever small objects outlived a step: on ResNet-18 that heap
grew well past the planned peak. Offsets fixed at plan time reuse exactly the
same bytes every step, so a step's activations cost the planned peak and no more.

Placement is greedy by size (as TFLite's arena planner): largest value first, each at
the lowest offset clear of every placed value alive at any of the same steps.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..kernels.cpu.memory import ALIGN, pages
from ..plan import Plan, Step


@dataclass
class Layout:
    size: int                               # bytes of workspace the plan needs
    slots: dict[int, tuple[int, int]]       # id(value) -> (offset, bytes)

    def views(self, buf: np.ndarray, steps: list[Step], shape_dtype) -> list[dict]:
        """Per step, {output index: array in buf} for its outputs that have a slot."""
        per = []
        for s in steps:
            out = {}
            for j, v in enumerate(s.outputs):
                slot = self.slots.get(id(v))
                if slot is not None and j not in s.inplace:
                    shape, dtype = shape_dtype(v)
                    out[j] = buf[slot[0]:slot[0] + slot[1]].view(dtype).reshape(shape)
            per.append(out)
        return per


def pack(counts: dict, dtype) -> tuple[np.ndarray, dict]:
    """Arrays of counts[name] elements side by side in one buffer of huge pages (written
    whole: parameters, gradients), each at a cache-line boundary: (the flat buffer of
    dtype, {name: offset in elements})."""
    itemsize = np.dtype(dtype).itemsize
    per, top, at = ALIGN // itemsize, 0, {}
    for name, n in counts.items():
        at[name] = top
        top += -(-n // per) * per
    return pages(top * itemsize, huge=True).view(dtype), at


class Workspace:
    """The buffer a model's programs lay their values out in, one program at a time:
    kept from step to step (as a caching allocator keeps its blocks), grown to the
    largest layout asked for. Each program's views into it are kept with it, and
    dropped with the buffer when it grows (so no program holds on to an old one)."""

    def __init__(self):
        self.buf = np.empty(0, np.uint8)
        self._views: dict = {}

    def views(self, program, size: int, make):
        """make(buf) for `program` (its arrays in a buffer of at least size bytes),
        made once per buffer."""
        if self.buf.size < size:
            self._views.clear()
            self.buf = np.empty(0, np.uint8)      # release the old one first
            self.buf = pages(size)
        v = self._views.get(program)
        if v is None:
            v = self._views[program] = make(self.buf)
        return v


def layout(p: Plan, writes, size_of) -> Layout:
    """Offsets for the outputs of steps whose kernels write into given buffers
    (writes(step) == "into"). Kernels that may return views of their inputs ("views")
    extend a slot's life to that of every value computed from it through them; a slot
    one of those values outlives the step as (an output, a loss) is dropped: its value
    is allocated as before. Kernels returning new arrays ("new") end the chain."""
    last: dict[int, int] = {id(v): i for i, free in enumerate(p.free_after) for v in free}
    end: list[int] = []                      # slot -> last step it is read at (-1: never freed)
    owner: list = []                         # slot -> (value, bytes)
    holds: dict[int, set] = {}               # id(value) -> slots it may be (a view of)
    for i, s in enumerate(p.steps):
        kind = writes(s)
        into = kind == "into"
        shared = set().union(*(holds.get(id(u), set()) for u in s.inputs)) if kind == "views" else set()
        for j, v in enumerate(s.outputs):
            if into and j in s.inplace:
                h = holds.get(id(s.inputs[s.inplace[j]]), set())
            elif into and (nbytes := size_of(v)):
                h = {len(end)}
                end.append(i)
                owner.append((v, nbytes))
            else:
                h = shared
            holds[id(v)] = h
            for k in h:
                end[k] = -1 if id(v) not in last or end[k] == -1 else max(end[k], last[id(v)])
    start = {id(v): i for i, s in enumerate(p.steps) for v in s.outputs}
    spans = [(nbytes, start[id(v)], e, id(v)) for (v, nbytes), e in zip(owner, end) if e >= 0]
    spans.sort(key=lambda t: -t[0])
    placed = np.zeros((0, 4), np.int64)      # rows: offset, end offset, first step, last step
    slots, size = {}, 0
    for nbytes, a, b, vid in spans:
        nb = -(-nbytes // ALIGN) * ALIGN
        live = placed[(placed[:, 2] <= b) & (a <= placed[:, 3])]
        off = 0
        for lo, hi in sorted(live[:, :2].tolist()):
            if off + nb <= lo:
                break
            off = max(off, hi)
        slots[vid] = (off, nbytes)
        placed = np.vstack([placed, [(off, off + nb, a, b)]])
        size = max(size, off + nb)
    return Layout(size, slots)
