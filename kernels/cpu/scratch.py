"""Workspace of one kernel call (im2col columns, padded images, per-thread partials),
carved from one buffer kept across calls.

From malloc, each call's workspace was freed between long-lived activations, and the
holes it left did not fit the next call's: on a ResNet-18 step the heap grew well
past what was live. Here a call takes its buffers at the top of a stack (`frame`
gives them back on return, so nested calls stack). A take that does not fit maps a
buffer twice as large (or as large as needed) and goes on there; the old one is
unmapped when the views into it die. Only pages written count as resident, so the
resident size is the high-water mark of what calls took. Nothing taken here may
outlive its call.
"""
import contextlib
import math
import threading

import numpy as np

from .memory import ALIGN, pages


class Scratch(threading.local):       # one stack per thread that calls kernels
    def __init__(self):
        self.buf = np.empty(0, np.uint8)
        self.top = 0

    @contextlib.contextmanager
    def frame(self):
        top = self.top
        try:
            yield self
        finally:
            self.top = top

    def take(self, shape, dtype, zero=False) -> np.ndarray:
        shape = tuple(int(d) for d in (shape if isinstance(shape, tuple) else (shape,)))
        start = -(-self.top // ALIGN) * ALIGN
        end = start + math.prod(shape) * np.dtype(dtype).itemsize
        if end > self.buf.size:
            self.buf = pages(max(2 * self.buf.size, end))
        self.top = end
        a = self.buf[start:end].view(dtype).reshape(shape)
        if zero:
            a.fill(0)
        return a


SCRATCH = Scratch()
