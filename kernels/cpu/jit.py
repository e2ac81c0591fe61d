"""`Jit`: numba.njit(cache=True) for netdsl's CPU kernels, served from the native store.

A call whose argument types (native.arg_key) the store holds runs the stored machine
code (kernels/native.py) without importing Numba. On a miss Numba is imported, the
kernel compiled or loaded from Numba's own cache as before, and its object code
stored for later processes.

Kernel modules take `prange` and numba-made globals (`Deferred`) from here rather
than from numba, so that importing them does not import Numba: the placeholders are
swapped for Numba's objects in a module's globals just before Numba first compiles
one of its functions. A Jit called from another kernel types as its dispatcher.
"""
from __future__ import annotations

import pickle
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
    """numba, imported on first need, set up to record the object code it produces."""
    global _numba
    if _numba is None:
        with native._lock:
            if _numba is None:
                import numba
                import numba.np.linalg
                from numba.core import codegen
                from numba.np.ufunc import parallel
                native.adopt(parallel)
                _keep_objects(codegen.CPUCodeLibrary)
                numba.np.linalg.ensure_blas()
                _numba = numba
    return _numba


def _keep_objects(cls):
    """Have every CPU code library remember its object code (`_netdsl_obj`): Numba hands
    it to the JIT engine, which consumes it, whether loaded from its cache or compiled."""
    if getattr(cls, "_netdsl_keeps", False):
        return
    unserialize, compiled = cls._unserialize.__func__, cls._object_compiled_hook.__func__

    def _unserialize(c, codegen, state):
        lib = unserialize(c, codegen, state)
        if state[1] == "object":
            lib._netdsl_obj = state[2][0]
        return lib

    def _object_compiled_hook(c, ll_module, buf):
        compiled(c, ll_module, buf)
        lib = getattr(ll_module, "_CPUCodeLibrary__library", None)
        if lib is not None:
            lib._netdsl_obj = buf
    cls._unserialize = classmethod(_unserialize)
    cls._object_compiled_hook = classmethod(_object_compiled_hook)
    cls._netdsl_keeps = True


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
            f = self._calls.get(key) or (_load(self, key) if key is not None else None)
            if f is None:
                d = self.dispatcher
                out = d(*args)
                if key is not None:
                    _export(self, d, key, args)
                self._calls[key] = d
                return out
            self._calls[key] = f
        return f(*args)

    @property
    def keys(self):
        """The argument keys (native.arg_key) this process has called it with."""
        return list(self._calls)

    @property
    def native_keys(self):
        """Those of them it ran from the store."""
        return [k for k, f in self._calls.items() if f is not self._dispatcher]


def jit(**options):
    """Decorator form of Jit (generated kernel modules use it)."""
    return lambda fn: Jit(fn, **options)


def _load(k: Jit, key):
    st = native.store()
    entry = st.get(k.kid, key) if st is not None else None
    nrt = st.nrt() if entry is not None else None
    if nrt is None:
        return None
    try:
        return native.runtime().load(entry, sys.modules[k.py_func.__module__], k.py_func.__name__, nrt)
    except native.Unavailable:
        return None


def _export(k: Jit, dispatcher, key, args):
    """Store the code Numba ran for these arguments, if it can run without Numba."""
    st = native.store()
    if st is None:
        return
    cres = dispatcher.overloads.get(tuple(dispatcher.typeof_pyval(a) for a in args))
    obj = getattr(cres.library, "_netdsl_obj", None) if cres is not None else None
    # a reload hook other than the parfor one (which starts the threads) would need Numba
    if obj is None or any(f.__name__ != "_reload_parfors" for f in cres.reload_init or ()):
        return
    envs = {cres.fndesc.env_name: cres.environment}
    for e in cres.referenced_envs or cres._find_referenced_environments():
        envs.setdefault(e.env_name, e)
    try:
        defined, undefined = native.elf_symbols(obj)
        entry = {"obj": obj, "wrapper": cres.fndesc.llvm_cpython_wrapper_name, "env": cres.fndesc.env_name,
                 "envs": [(name, pickle.dumps(list(e.consts))) for name, e in envs.items()],
                 "defined": defined, "undefined": undefined}
    except (pickle.PicklingError, TypeError, AttributeError, native.Unavailable):
        return
    try:        # a cache that cannot be written only costs later processes the speed-up
        if st.nrt() is None:
            from numba.core.runtime import nrt
            lib = nrt.rtsys._library
            st.put_nrt(lib._codegen._tm.emit_object(lib._final_module))
        st.put(k.kid, key, entry)
    except OSError:
        pass
