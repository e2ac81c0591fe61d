"""`scan`: a step graph applied over time, and its gradient `scan_grad`.

The elaborator makes scan nodes from `scan step(...)` (netdsl/lang/elaborator.py):
inputs are the scanned sequences [N, T, ...], the carries' initial values, then every
outer tensor the step reads (captures, e.g. the image features of captioning with
attention), so liveness keeps them and gradients reach them; outputs are each emit
stacked over time [N, T, ...], then each carry's final value. The step's parameters
belong to the scan (autodiff.trainable), under their block paths.

The gradient is one `scan_grad` node: the VJP of the step graph (autodiff.step_grad),
run in reverse over time from values the forward saved at each step, summing the
parameters' gradients over the steps (runtime/scan.py runs both).
"""
from __future__ import annotations

from .registry import OpDef, _like_inputs, register


def _made_by_the_elaborator(ctx):
    raise RuntimeError("scan nodes are made by the elaborator from `scan step(...)`")


def _scan_vjp(b, node, gys):
    from ..autodiff import kernel_vjp, step_grad
    step_grad(node)     # built here, once, so the forward knows what to save per step
    return kernel_vjp(b, node, gys)


register(OpDef("scan", ("*ins",), (), _made_by_the_elaborator, kind="recurrent", vjp=_scan_vjp,
               doc="apply a step over the T axis of its sequences, carrying state"))
# its gradient: inputs are the outputs' gradients, the scan's inputs and the step's parameters
register(OpDef("scan_grad", ("*ins",), (), _like_inputs, kind="grad", differentiable=False,
               doc="gradient of scan: the step's VJP run in reverse over time"))
