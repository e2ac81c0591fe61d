"""`Jit`: numba.njit(cache=True) for netdsl's CPU kernels, served from the native store.

A call whose argument types (native.arg_key) the store holds runs the stored machine
code (kernels/native.py) without importing Numba. On a miss Numba is imported, the
kernel compiled or loaded from Numba's own cache for those types (not run), its object
code stored, and the stored code is what runs, now and in every later process: Numba's
own dispatch of a fresh compile can run other code (see native.export) and round
differently. Without the native layer (NETDSL_NATIVE=0, or where it cannot run) every
call goes through Numba, and nothing of Numba is patched.

Kernel modules take `prange` and numba-made globals (`Deferred`) from here rather
than from numba, so that importing them does not import Numba: the placeholders are
swapped for Numba's objects in a module's globals just before Numba first compiles
one of its functions. A Jit called from another kernel types as its dispatcher.
"""
from __future__ import annotations

import sys

from .. import native


class Deferred:
    """A module global made from the numba module once it is imported."""

    def __init__(self, make):
        self.make = make


prange = Deferred(lambda numba: numba.prange)

_numba = None
_patched: set[int] = set()


def numba_module():
    """numba, imported on first need (and handed to the native layer, if it is on)."""
    global _numba
    if _numba is None:
        with native._lock:
            if _numba is None:
                import numba
                import numba.np.linalg
                native.on_numba_import()
                numba.np.linalg.ensure_blas()
                _numba = numba
    return _numba


def _patch(module_globals: dict, numba):
    if id(module_globals) not in _patched:
        _patched.add(id(module_globals))
        for name, v in list(module_globals.items()):
            if isinstance(v, Deferred):
                module_globals[name] = v.make(numba)


class Jit:
    """`numba.njit(cache=True, **options)(fn)`, Numba deferred (see the module doc)."""

    def __init__(self, fn, **options):
        self.py_func, self.options = fn, options
        norm = {k: sorted(v) if isinstance(v, (set, frozenset)) else v for k, v in sorted(options.items())}
        self.kid = f"{fn.__module__}:{fn.__qualname__}:{norm!r}"
        self._calls = {}        # arg key -> stored kernel or Numba dispatcher
        self._found = []        # the keys found in the store (run without Numba)
        self._dispatcher = None

    @property
    def dispatcher(self):
        if self._dispatcher is None:
            numba = numba_module()
            _patch(self.py_func.__globals__, numba)
            self._dispatcher = numba.njit(cache=True, **self.options)(self.py_func)
        return self._dispatcher

    @property
    def _numba_type_(self):         # how Numba types this object as a global of a kernel
        return self.dispatcher._numba_type_

    def __call__(self, *args):
        f = self._calls.get(native.arg_key(args))
        return self._first(args) if f is None else f(*args)

    def _first(self, args):
        key = native.arg_key(args)
        with native._lock:
            f = self._calls.get(key)
            if f is None and key is not None:
                f = native.load(self.kid, key, sys.modules[self.py_func.__module__], self.py_func.__name__)
                if f is not None:
                    self._found.append(key)
            if f is None:
                d = f = self.dispatcher
                if key is not None and native.store() is not None:
                    sig = tuple(d.typeof_pyval(a) for a in args)
                    d.compile(sig)          # compiled or loaded from Numba's cache, not run
                    f = native.export(self.kid, key, d.overloads.get(sig), sys.modules[self.py_func.__module__],
                                      self.py_func.__name__) or d
            self._calls[key] = f
        return f(*args)

    @property
    def keys(self):
        """The argument keys (native.arg_key) this process has called it with."""
        return list(self._calls)

    @property
    def native_keys(self):
        """Those of them it found in the store, so ran without Numba compiling or loading them."""
        return list(self._found)


def jit(**options):
    """Decorator form of Jit (generated kernel modules use it)."""
    return lambda fn: Jit(fn, **options)
