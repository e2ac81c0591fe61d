"""Cached kernels called without importing Numba (netdsl's ahead-of-time path).

Numba costs a process about a second before its first kernel runs: its import, the
first refresh of its registries, and re-reading each cached kernel's bitcode. The
machine code it caches needs none of that. A kernel for one signature is an ELF
object whose CPython wrapper unboxes the arguments itself; it calls into a few C
runtimes that ship with Numba as extension modules (_helperlib, _dynfunc, NRT, a
threading layer), and those load without Numba's Python package.

So when Numba compiles or loads a kernel, netdsl also keeps the object in a store
(kernels/cpu/jit.py), keyed by the call's arguments (`arg_key`), and runs it from
there, in that process as in later ones, which load the objects with llvmlite's MCJIT
and call them through _dynfunc, as Numba itself does. They import Numba only on a
miss. The store's folder is named by a hash of everything the objects depend on:
Python, Numba, llvmlite and NumPy as installed, the host CPU, and netdsl's kernel
sources. Its files are data: a JSON index, and per kernel a JSON header beside the
object; nothing in it is unpickled, and a damaged or foreign file is a miss. (Its
objects are machine code that runs, as Numba's cache is: the folder must be the
user's own, as `~/.cache` is.)

NETDSL_NATIVE=0 turns this off: every call goes through Numba, and nothing of Numba
is patched (`on_numba_import` is the one place that does).
"""
from __future__ import annotations

import builtins
import ctypes
import hashlib
import importlib.machinery
import importlib.util
import json
import os
import pickle
import re
import struct
import sys
import threading
import types
from pathlib import Path

import numpy as np

from .cache import cache_root, write_atomic

_SCALARS = {int, float, bool, type(None), np.bool_, np.float32, np.float64, np.int8, np.int16, np.int32,
            np.int64, np.uint8, np.uint16, np.uint32, np.uint64}
_ND = np.ndarray
_LAYERS = {"omp": "omppool", "tbb": "tbbpool", "workqueue": "workqueue"}
_lock = threading.RLock()


class Unavailable(Exception):
    """The native path cannot run here (switched off, or an unusual Numba install)."""


def enabled() -> bool:
    return os.environ.get("NETDSL_NATIVE", "1") != "0" and os.environ.get("NUMBA_DISABLE_JIT", "0") == "0"


def arg_key(args):
    """A hashable description of a call's arguments that fixes the signature Numba
    gives them: for arrays, dtype, ndim, contiguity (Numba's layout), writeability
    and alignment; for scalars, their type. None for anything else (those calls go
    through Numba)."""
    key = []
    for x in args:
        t = type(x)
        if t is _ND:
            f = x.flags
            key.append((x.dtype.num, x.ndim, f.c_contiguous, f.f_contiguous, f.writeable, f.aligned))
        elif t in _SCALARS:
            key.append(t)
        else:
            return None
    return tuple(key)


def max_threads() -> int:
    """Numba's NUMBA_NUM_THREADS: the threads its pool launches."""
    env = os.environ.get("NUMBA_NUM_THREADS")
    if env:
        return int(env)
    affinity = getattr(os, "sched_getaffinity", None)     # Linux; elsewhere the CPU count
    return max(1, len(affinity(0)) if affinity else os.cpu_count() or 1)


def _numba_dir() -> Path:
    spec = importlib.util.find_spec("numba")     # locates, does not import
    if spec is None or not spec.origin:
        raise Unavailable("numba is not installed")
    return Path(spec.origin).parent


def _ext(name: str):
    """Numba's extension module `name`, loaded without running numba/__init__.py, and
    registered under its own name so that a later `import numba` reuses it."""
    if name in sys.modules:
        return sys.modules[name]
    base = _numba_dir().joinpath(*name.split(".")[1:])
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = str(base) + suffix
        if os.path.isfile(path):
            break
    else:
        raise Unavailable(f"no extension module {name}")
    loader = importlib.machinery.ExtensionFileLoader(name, path)
    module = importlib.util.module_from_spec(importlib.util.spec_from_file_location(name, path, loader=loader))
    sys.modules[name] = module
    try:
        loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _seed_unpickle(helper):
    """Give _helperlib its unpickler without Numba.

    Compiled code unpickles some constants at run time (boxing a returned array does);
    _helperlib looks the function up once, as numba.core.serialize._numba_unpickle,
    and keeps it. Importing that name imports the numba package, so a stand-in
    package holding a plain memoised unpickler is put in sys.modules for the one
    lookup and taken out again."""
    if "numba.core.serialize" in sys.modules:
        return
    memo = {}

    def _numba_unpickle(address, bytedata, hashed):
        key = (address, hashed)
        if key not in memo:
            memo[key] = pickle.loads(bytedata)
        return memo[key]
    names = ("numba", "numba.core", "numba.core.serialize")
    stand_ins = {n: types.ModuleType(n) for n in names}
    stand_ins["numba.core.serialize"]._numba_unpickle = _numba_unpickle
    sys.modules.update(stand_ins)
    try:
        data = pickle.dumps(None)
        unpickle = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p)(
            helper.c_helpers["unpickle"])
        unpickle(data, len(data), bytes(20))
    finally:
        for n in names:
            if sys.modules.get(n) is stand_ins[n]:
                del sys.modules[n]


class _Runtime:
    """The process's MCJIT engine, with Numba's C runtimes linked in, and its thread pool."""

    def __init__(self):
        if not enabled():
            raise Unavailable("NETDSL_NATIVE=0")
        import llvmlite.binding as ll
        self.ll = ll
        ll.initialize_native_target()
        ll.initialize_native_asmprinter()
        helper, self.dynfunc = _ext("numba._helperlib"), _ext("numba._dynfunc")
        nrt = _ext("numba.core.runtime._nrt_python")
        # The symbols Numba's own start-up installs (core/base.py, core/runtime/nrt.py)
        ll.add_symbol("_Py_NoneStruct", id(None))
        for table in (helper.c_helpers, self.dynfunc.c_helpers):
            for name, addr in table.items():
                ll.add_symbol("numba_" + name, addr)
        for obj in vars(builtins).values():
            if isinstance(obj, type) and issubclass(obj, BaseException):
                ll.add_symbol("PyExc_" + obj.__name__, id(obj))
        for name, addr in nrt.c_helpers.items():
            ll.add_symbol(name if name.startswith("_") else "NRT_" + name, addr)
        nrt.memsys_use_cpython_allocator()
        _seed_unpickle(helper)
        self.pool, self.layer = self._threads()
        for name in ("parallel_for", "do_scheduling_signed", "do_scheduling_unsigned", "allocate_sched",
                     "deallocate_sched", "get_num_threads", "set_num_threads", "get_thread_id",
                     "set_parallel_chunksize", "get_parallel_chunksize", "get_sched_size"):
            ll.add_symbol("numba_parallel_for" if name == "parallel_for" else name, getattr(self.pool, name))
        self._get = ctypes.CFUNCTYPE(ctypes.c_int)(self.pool.get_num_threads)
        self._set = ctypes.CFUNCTYPE(None, ctypes.c_int)(self.pool.set_num_threads)
        tm = ll.Target.from_default_triple().create_target_machine(jit=True)
        self.engine = ll.create_mcjit_compiler(ll.parse_assembly(""), tm)
        self.keep = []          # environments and their constants, alive as long as the code
        self.resolved = set()   # symbols the linked objects define or were found for

    def _threads(self):
        """Numba's thread pool if Numba already launched one, else a pool of its layer."""
        parallel = sys.modules.get("numba.np.ufunc.parallel")
        if parallel is not None and getattr(parallel, "_is_initialized", False):
            return sys.modules["numba.np.ufunc." + _LAYERS[parallel._threading_layer]], parallel._threading_layer
        want = os.environ.get("NUMBA_THREADING_LAYER", "default").lower()
        layers = ("omp", "workqueue") if want == "default" else (want,)
        for layer in layers:
            if layer not in _LAYERS:
                raise Unavailable(f"threading layer {want!r}")
            try:
                pool = _ext("numba.np.ufunc." + _LAYERS[layer])
            except ImportError:
                continue
            ctypes.CFUNCTYPE(None, ctypes.c_int)(pool.launch_threads)(max_threads())
            ctypes.CFUNCTYPE(None, ctypes.c_int)(pool.set_num_threads)(max_threads())
            return pool, layer
        raise Unavailable("no threading layer")

    def _link(self, obj: bytes, defined: set, undefined: set):
        """Add an object to the engine, unless a symbol it needs is missing (MCJIT
        would abort the process on it, not raise)."""
        missing = sorted(s for s in undefined - self.resolved if not self.ll.address_of_symbol(s))
        if missing:
            raise Unavailable(f"unresolved symbols {missing[:3]}")
        self.engine.add_object_file(self.ll.ObjectFileRef.from_data(obj))
        self.engine.finalize_object()
        self.resolved |= defined | undefined

    def load(self, entry, module, name, nrt):
        """The callable for one stored kernel (see `export` for the entry's fields);
        nrt: the object code of Numba's NRT functions, which every kernel links to."""
        if not self.resolved:
            self._link(nrt, *elf_symbols(nrt))
        self._link(entry["obj"], entry["defined"], entry["undefined"])
        env = None
        for env_name, consts in entry["envs"]:
            addr = self.engine.get_global_value_address(env_name)
            if not addr:
                continue
            e = self.dynfunc.Environment(vars(module))
            e.consts[:] = consts
            self.keep.append(e)
            ctypes.c_void_p.from_address(addr).value = id(e)
            if env_name == entry["env"]:
                env = e
        fnptr = self.engine.get_function_address(entry["wrapper"])
        if not fnptr or env is None:
            raise Unavailable(f"stored kernel {name} is incomplete")
        return self.dynfunc.make_function(module, name, "netdsl native kernel", fnptr, env, (self.engine,))


_runtime: _Runtime | None = None
_failed: str | None = None


def runtime() -> _Runtime | None:
    """The process's native runtime, created on first use; None where it cannot run."""
    global _runtime, _failed
    if _runtime is None and _failed is None:
        with _lock:
            if _runtime is None and _failed is None:
                try:
                    _runtime = _Runtime()
                except (Unavailable, ImportError, OSError, AttributeError) as e:
                    _failed = str(e)
    return _runtime


def get_num_threads() -> int:
    rt = runtime()
    if rt is None:
        import numba
        return numba.get_num_threads()
    _sync()
    return rt._get()


def set_num_threads(n: int):
    if not 1 <= n <= max_threads():
        raise ValueError(f"threads must be between 1 and {max_threads()}")
    rt = runtime()
    _sync()
    if rt is None:
        import numba
        numba.set_num_threads(n)
    else:
        rt._set(n)


def _sync():
    """If something imported Numba directly (the CUDA target, a test), hand it this pool
    before its own first use launches another and resets the thread count."""
    parallel = sys.modules.get("numba.np.ufunc.parallel")
    if parallel is not None and not getattr(parallel, "_is_initialized", True):
        adopt(parallel)


def adopt(parallel_module):
    """After `import numba`: make Numba use the pool this runtime launched, not a second one."""
    rt = _runtime
    if rt is not None and not parallel_module._is_initialized:
        n = rt._get()
        parallel_module._load_threading_functions(rt.pool)
        parallel_module._threading_layer = rt.layer
        parallel_module._is_initialized = True
        rt._set(n)


def elf_symbols(obj: bytes) -> tuple[set, set]:
    """(defined, undefined) global symbols of an ELF64 little-endian object file."""
    if obj[:6] != b"\x7fELF\x02\x01":
        raise Unavailable("not an ELF64 little-endian object")
    try:
        return _symbols(obj)
    except (struct.error, IndexError, ValueError, ZeroDivisionError) as e:     # truncated or damaged
        raise Unavailable(f"damaged ELF object: {e}") from None


def _symbols(obj: bytes) -> tuple[set, set]:
    (shoff,), (shentsize, shnum) = struct.unpack_from("<Q", obj, 0x28), struct.unpack_from("<HH", obj, 0x3A)
    # section headers: name, type, flags, addr, offset, size, link, info, addralign, entsize
    secs = [struct.unpack_from("<IIQQQQIIQQ", obj, shoff + i * shentsize) for i in range(shnum)]
    defined, undefined = set(), set()
    for _, typ, _, _, off, size, link, _, _, entsize in secs:
        if typ != 2:        # SHT_SYMTAB
            continue
        strtab = secs[link][4]
        for j in range(1, size // entsize):
            st_name, st_info, _, st_shndx = struct.unpack_from("<IBBH", obj, off + j * entsize)
            if st_info >> 4 == 0 or not st_name:       # STB_LOCAL
                continue
            start = strtab + st_name
            name = obj[start:obj.index(b"\0", start)].decode()
            (undefined if st_shndx == 0 else defined).add(name)
    return defined, undefined


# ---------------------------------------------------------------- Numba's side

def on_numba_import():
    """Called once Numba is imported: if this layer is on, share its thread pool and have
    Numba's code libraries keep their object code; with NETDSL_NATIVE=0 (or where the
    store cannot run) Numba is left as it is."""
    if store() is None:
        return
    from numba.core import codegen
    from numba.np.ufunc import parallel
    adopt(parallel)
    _keep_objects(codegen.CPUCodeLibrary)


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


def load(kid: str, key, module, name):
    """The stored kernel `kid` for arguments `key`, callable; None on a miss."""
    st = store()
    entry = st.get(kid, key) if st is not None else None
    nrt = st.nrt() if entry is not None else None
    if nrt is None:
        return None
    try:
        return runtime().load(entry, module, name, nrt)
    except Unavailable:
        return None


def export(kid: str, key, cres, module, name):
    """Store the code Numba made for one signature (cres: its compile result) and return
    it loaded from there, callable; None if it cannot run without Numba.

    The stored code is then what runs in this process too. Numba's own dispatch of a
    fresh compile can run other code: a parallel kernel's loop body is compiled as a
    library of its own, registered with Numba's engine, and also linked into the
    kernel, as a weak copy that the engine resolves to the registered one. Optimised
    again there, under fast-math 'reassoc', the copy can round differently (a fused
    batch-norm kernel did, by 1 ulp), so a first run and a later one would not agree."""
    st = store()
    obj = getattr(cres.library, "_netdsl_obj", None) if cres is not None and st is not None else None
    # a reload hook other than the parfor one (which starts the threads) would need Numba
    if obj is None or any(f.__name__ != "_reload_parfors" for f in cres.reload_init or ()):
        return None
    envs = {cres.fndesc.env_name: cres.environment}
    for e in cres.referenced_envs or cres._find_referenced_environments():
        envs.setdefault(e.env_name, e)
    try:
        defined, undefined = elf_symbols(obj)
        entry = {"obj": obj, "wrapper": cres.fndesc.llvm_cpython_wrapper_name, "env": cres.fndesc.env_name,
                 "envs": [[env_name, [_const(c) for c in e.consts]] for env_name, e in envs.items()],
                 "defined": sorted(defined), "undefined": sorted(undefined)}
    except (TypeError, AttributeError, Unavailable):
        return None
    nrt = st.nrt()
    try:        # a cache that cannot be written only costs later processes the speed-up
        if nrt is None:
            from numba.core.runtime import nrt as numba_nrt
            lib = numba_nrt.rtsys._library
            nrt = lib._codegen._tm.emit_object(lib._final_module)
            st.put_nrt(nrt)
        st.put(kid, key, entry)
    except OSError:
        pass
    try:
        return runtime().load(_decode(json.loads(json.dumps(_header(entry))), obj), module, name, nrt)
    except (Unavailable, ValueError):
        return None


def _const(c):
    """An environment constant as JSON (the dtypes kernels allocate with, plain scalars);
    TypeError for anything else (that kernel then runs through Numba)."""
    if isinstance(c, np.dtype) and c.fields is None and c.subdtype is None:
        return {"dtype": c.str}
    if c is None or type(c) in (bool, int, float, str):
        return {"value": c}
    raise TypeError(f"constant {type(c).__name__}")


def _unconst(c):
    if set(c) == {"dtype"} and isinstance(c["dtype"], str):
        return np.dtype(c["dtype"])
    if set(c) == {"value"} and (c["value"] is None or type(c["value"]) in (bool, int, float, str)):
        return c["value"]
    raise ValueError("bad constant")


# ---------------------------------------------------------------- the store

def _stamp(path: Path) -> str:
    st = path.stat()
    return f"{path}:{st.st_size}:{st.st_mtime_ns}"


_MAGIC = b"netdsl-kernel-1\n"
_FILE = re.compile(r"[0-9a-f]{24}\.kernel")


def _header(entry) -> dict:
    return {k: entry[k] for k in ("wrapper", "env", "envs", "defined", "undefined")} | {
        "obj_sha256": hashlib.sha256(entry["obj"]).hexdigest()}


def _decode(h, obj: bytes) -> dict:
    """An entry from its header and object, every field checked (ValueError if not as written)."""
    names = lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)
    if not (isinstance(h, dict) and isinstance(h.get("wrapper"), str) and isinstance(h.get("env"), str)
            and names(h.get("defined")) and names(h.get("undefined")) and isinstance(h.get("envs"), list)
            and all(isinstance(e, list) and len(e) == 2 and isinstance(e[0], str) and isinstance(e[1], list)
                    and all(isinstance(c, dict) for c in e[1]) for e in h["envs"])
            and h.get("obj_sha256") == hashlib.sha256(obj).hexdigest()):
        raise ValueError("damaged kernel entry")
    return {"obj": obj, "wrapper": h["wrapper"], "env": h["env"],
            "envs": [(n, [_unconst(c) for c in cs]) for n, cs in h["envs"]],
            "defined": set(h["defined"]), "undefined": set(h["undefined"])}


def _ident(kid: str, key) -> str:
    """The index's name for a kernel and an argument key (scalar types by their names)."""
    return json.dumps([kid, [list(k) if isinstance(k, tuple) else f"{k.__module__}.{k.__qualname__}"
                             for k in key]])


class Store:
    """Stored kernels, a file each (a JSON header line, then the ELF object), and a JSON
    index {kernel id and argument key: file}. What does not read back as written is a miss."""

    def __init__(self, folder: Path):
        self.dir = folder
        self.index_path = folder / "index.json"
        self.index = self._read_index()

    def _read_index(self) -> dict:
        try:
            data = json.loads(self.index_path.read_text())
        except (OSError, ValueError):
            return {}
        if not (isinstance(data, dict) and data.get("format") == "netdsl-native-index"
                and isinstance(data.get("kernels"), dict)):
            return {}
        return {k: v for k, v in data["kernels"].items() if isinstance(v, str) and _FILE.fullmatch(v)}

    def get(self, kid, key):
        name = self.index.get(_ident(kid, key))
        return None if name is None else self.read(name)

    def read(self, name: str):
        """The entry in file `name` (an index value); None if it does not read back."""
        try:
            data = (self.dir / name).read_bytes()
            if not data.startswith(_MAGIC):
                return None
            head, _, obj = data[len(_MAGIC):].partition(b"\n")
            return _decode(json.loads(head), obj)
        except (OSError, ValueError, UnicodeDecodeError):
            return None

    def nrt(self) -> bytes | None:
        try:
            obj = (self.dir / "nrt.o").read_bytes()
        except OSError:
            return None
        return obj if obj[:6] == b"\x7fELF\x02\x01" else None

    def _mkdir(self):
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)

    def put_nrt(self, obj: bytes):
        self._mkdir()
        write_atomic(self.dir / "nrt.o", obj)

    def put(self, kid, key, entry):
        ident = _ident(kid, key)
        head = json.dumps(_header(entry), separators=(",", ":")).encode()
        name = hashlib.sha256(ident.encode()).hexdigest()[:24] + ".kernel"
        with _lock:
            self._mkdir()
            write_atomic(self.dir / name, _MAGIC + head + b"\n" + entry["obj"])
            # merge with what other processes wrote meanwhile; a lost race costs one re-export
            index = self._read_index()
            index.update(self.index)
            index[ident] = name
            write_atomic(self.index_path, json.dumps({"format": "netdsl-native-index", "kernels": index}))
            self.index = index


_store: Store | None = None


# Stored code is only valid for the kernel sources it was compiled from (a helper in
# one file is compiled into the kernels of another): all of them name the store.
_KERNELS = Path(__file__).resolve().parent
SOURCES = sorted(p for d in (_KERNELS, _KERNELS / "cpu", _KERNELS / "codegen") for p in d.glob("*.py"))


def store() -> Store | None:
    """The store for this installation and netdsl's kernel sources; None if unavailable."""
    global _store
    if _store is None:
        rt = runtime()
        if rt is None:
            return None
        nb, ll = _numba_dir(), Path(rt.ll.__file__).parent
        h = hashlib.sha256()
        for part in (sys.version, np.__version__, _stamp(nb / "__init__.py"), _stamp(nb / "_version.py"),
                     *(_stamp(p) for p in sorted(ll.glob("libllvmlite*"))),
                     rt.ll.get_host_cpu_name(), rt.ll.get_host_cpu_features().flatten(), rt.layer):
            h.update(part.encode())
        for p in SOURCES:
            h.update(p.read_bytes())
        _store = Store(cache_root() / "native" / h.hexdigest()[:24])
    return _store
