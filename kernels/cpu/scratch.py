"""Workspace of one kernel call (im2col columns, padded images, per-thread partials),
carved from one buffer kept across calls.

From malloc, each call's workspace was freed between long-lived activations, and the
holes it left did not fit the next call's: on a ResNet-18 step the heap grew ~10 MiB
past what was live. Here a call takes its buffers at the top of a stack (`frame`
gives them back on return, so nested calls stack); the first call that needs more
than the buffer holds gets new arrays, and the buffer grows to the high-water mark
when the outermost call returns. Nothing taken here may outlive its call.
"""
import contextlib
import math
import threading

import numpy as np

ALIGN = 64


class Scratch(threading.local):       # one stack per thread that calls kernels
    def __init__(self):
        self.buf = np.empty(0, np.uint8)
        self.top = 0
        self.high = 0

    @contextlib.contextmanager
    def frame(self):
        top = self.top
        try:
            yield self
        finally:
            self.top = top
            if top == 0 and self.buf.size < self.high:
                self.buf = np.empty(0, np.uint8)         # release the old buffer first
                self.buf = np.empty(self.high, np.uint8)

    def take(self, shape, dtype, zero=False) -> np.ndarray:
        shape = tuple(int(d) for d in (shape if isinstance(shape, tuple) else (shape,)))
        start = -(-self.top // ALIGN) * ALIGN
        end = start + math.prod(shape) * np.dtype(dtype).itemsize
        self.top, self.high = end, max(self.high, end)
        if end <= self.buf.size:
            a = self.buf[start:end].view(dtype).reshape(shape)
        else:
            a = np.empty(shape, dtype)
        if zero:
            a.fill(0)
        return a


SCRATCH = Scratch()
