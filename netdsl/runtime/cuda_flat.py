"""A CUDA model's trainable parameters, their gradients and the optimiser's state, each
kind in one device buffer with the same layout (issue 16, "fewer kernels").

Every trainable parameter's array is a view into the parameter buffer; the gradient
kernels write each parameter's final gradient into its view of the gradient buffer
(bindings' `_grad_out`, `every`), and the optimiser keeps its state in buffers laid out
the same way. One launch of the update kernel over the whole buffer then updates
every parameter (instead of one launch per parameter), the gradient norm for clipping
is one reduction, and the finite check one kernel. Per element the arithmetic is the
per-parameter kernels', so results are the same bit for bit.

Offsets are multiples of 256 bytes (what cuMemAlloc aligns an allocation to), so a
view is aligned like an array of its own. The gaps are zeros in every buffer and stay
zeros: SGD and Adam map a zero parameter with a zero gradient and zero state to zeros.
Whatever does not fit the layout (a gradient that is a sum of several, written by a
kernel with no output argument; arrays replaced from outside) falls back to the
per-parameter path, which is always correct.
"""
from __future__ import annotations

import math

import numpy as np

from netdsl.kernels import cuda as K

ALIGN = 256     # bytes


class FlatLayout:
    """Trainable parameters side by side: names in order, their shapes and offsets."""

    def __init__(self, shapes: dict, dtype):
        self.dtype = np.dtype(dtype)
        per = ALIGN // self.dtype.itemsize
        self.shapes, self.at, top = dict(shapes), {}, 0
        for name, shape in self.shapes.items():
            self.at[name] = top
            top += -(-math.prod(shape) // per) * per
        self.size = top

    def buffer(self):
        """A zeroed device buffer of this layout."""
        return K.zeros((self.size,), self.dtype)

    def view(self, buf, name):
        n = math.prod(self.shapes[name])
        return buf[self.at[name]:self.at[name] + n].reshape(self.shapes[name])

    def views(self, buf) -> dict:
        return {name: self.view(buf, name) for name in self.shapes}


class DeviceParams:
    """A CUDA model's trainable parameters in one buffer, and their gradients in another.

    Serves as the run's `grad_buffers`: `get(value, like)` is the view a gradient kernel
    writes parameter `like`'s final gradient into."""
    every = True        # every parameter's gradient has a place here, not only the big weights'

    def __init__(self, host: dict, dtype):
        self.layout = FlatLayout({k: tuple(v.shape) for k, v in host.items()}, dtype)
        self.buf = self.layout.buffer()
        self.params = self.layout.views(self.buf)
        for k, v in host.items():   # host arrays go up; device arrays are copied on the device
            self.params[k].copy_to_device(v if hasattr(v, "copy_to_host") else np.ascontiguousarray(v))
        self.grad_buf = None
        self.grads: dict = {}
        self.final: dict = {}   # gradient value id -> parameter name

    def bind(self, grads: dict) -> "DeviceParams":
        """Take the training graph's {parameter: final gradient value}; the gradient
        buffer is made on the first step (inference never needs it)."""
        self.final = {id(v): name for name, v in grads.items() if name in self.params}
        if self.grad_buf is None:
            self.grad_buf = self.layout.buffer()
            self.grads = self.layout.views(self.grad_buf)
        return self

    def get(self, v, like):
        g = self.grads.get(self.final.get(id(v)))
        if g is None or tuple(g.shape) != tuple(like.shape) or g.dtype != like.dtype:
            return None
        return g

    def holds(self, params: dict, grads: dict) -> bool:
        """Whether params are exactly this model's parameter views and grads exactly their
        gradient views (all of them): then one launch over the buffers updates them all."""
        names = self.layout.shapes
        return (self.grad_buf is not None and len(params) == len(names) and len(grads) == len(names)
                and all(params.get(k) is self.params[k] and grads.get(k) is self.grads[k] for k in names))

    def holds_grads(self, grads: dict) -> bool:
        names = self.layout.shapes
        return (self.grad_buf is not None and len(grads) == len(names)
                and all(grads.get(k) is self.grads[k] for k in names))
