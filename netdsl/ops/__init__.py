"""Operator registry; importing this package registers every operator."""
from .registry import OPS, OpDef, Attr, Ctx, REQUIRED, not_runnable  # noqa: F401
from . import elementwise, nn, tensor, recurrent, detection, scan, policy  # noqa: F401  (registration side effects)
