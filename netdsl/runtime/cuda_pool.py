"""A caching device allocator for the CUDA target (issue 16): a numba-cuda EMM plugin.

Numba's default memory manager does one cuMemAlloc per array and frees lazily: every
tenth dead array triggers a batch of cuMemFree calls, each of which waits for the device.
A training step makes and drops hundreds of arrays, so it paid for both every step.
Here a freed block goes back to a free list keyed by its rounded size, and the next
request of that size takes it: from the second step on a training step does no
cuMemAlloc and no cuMemFree at all.

Reuse without waiting is safe because netdsl issues all its device work from one
thread on one stream (the default stream, or the per-thread default stream when CUDA
graphs are on: docs/cuda.md): work that uses a block after its reuse is queued behind
the work that used it before. Host threads other than the one running the model must
not launch on netdsl's arrays.

Sizes (`round_size`): up to 1 MiB, multiples of 512 bytes; above, the next of 1, 1.25,
1.5 or 1.75 times a power of two (at most 25% over the request, 12% on average), so
shapes that differ a little (a short last batch) still find blocks. A request takes a
free block of its own rounded size, else the smallest free block of at most twice it;
else the device is asked; on out-of-memory every cached free block is returned to the
device (`empty_cache`) and the request retried once before the error is raised.

CUDA graphs (runtime/cuda_graph.py) bake the addresses they use into the graph. While
a graph is being captured, every block alive at its start and every block allocated
during the capture belongs to it (`Block.owners`) until the graph is destroyed: such a
block, when freed, is held back from everyone (a replay may still read or write it).
The one exception is a block both allocated and freed inside the same capture: later
allocations of that capture may take it (a captured stream is one chain of work, so
this reuse is ordered exactly as in an eager step), nobody else.

`Pool` is the logic, with the device behind a small backend (alloc / free / mem_info /
is_oom), so it is tested without a GPU (tests/test_cuda_pool.py); `install()` puts
`NetdslMemoryManager`, the numba plugin, in place. NETDSL_CUDA_POOL=0 keeps numba's.
"""
from __future__ import annotations

import bisect
import os
import threading
import weakref
from collections import deque

SMALL = 1 << 20      # up to here: multiples of 512 bytes
SMALL_STEP = 512
MAX_OVERSIZE = 2     # a request may take a free block of at most twice its rounded size


def round_size(n: int) -> int:
    """The block size a request of n bytes gets (see the module docstring)."""
    n = max(int(n), 1)
    if n <= SMALL:
        return -(-n // SMALL_STEP) * SMALL_STEP
    quarter = 1 << (n.bit_length() - 3)     # a quarter of the power of two below n
    return -(-n // quarter) * quarter


class Block:
    __slots__ = ("ptr", "size", "free", "owners", "born")

    def __init__(self, ptr: int, size: int):
        self.ptr, self.size = ptr, size
        self.free = False
        self.owners: set = set()    # graphs that replay with this block's address
        self.born = None            # the capture that allocated it, if any


class _Owner:
    """A queued release_owner (see Pool._dead)."""
    __slots__ = ("owner",)

    def __init__(self, owner):
        self.owner = owner


class Pool:
    """Size-rounded free lists over a device backend.

    backend: alloc(nbytes) -> int address (raises on failure), free(address),
    mem_info() -> (free, total) bytes, is_oom(exception) -> bool, and sync() (wait for
    the device before memory goes back to it)."""

    def __init__(self, backend):
        self.backend = backend
        self.blocks: dict[int, Block] = {}          # address -> block, every block held from the device
        self._free: dict[int, list[Block]] = {}     # size -> free blocks anyone may take
        self._sizes: list[int] = []                 # sorted keys of _free with blocks in them
        self._private: dict[object, dict[int, list[Block]]] = {}  # capture -> its own free blocks
        self.capturing = None                       # the graph being captured, if any
        self.reserved = 0           # bytes held from the device
        self.allocated = 0          # bytes handed out and not yet freed
        self.peak_reserved = self.peak_allocated = 0
        self.device_allocs = self.device_frees = 0
        self.hits = self.misses = 0
        # Frees come from finalizers: at any allocation the garbage collector may run one in the
        # middle of malloc (same thread), or another thread may. They are queued and applied
        # by whoever holds the lock next, so the lists are never changed under a running method.
        self._dead: deque = deque()
        self._lock = threading.Lock()

    # ---- taking and giving back

    def malloc(self, nbytes: int) -> int:
        with self._lock:
            self._drain()
            return self._malloc(nbytes)

    def release(self, ptr: int) -> None:
        """Give a block back (a finalizer calls this; safe from any thread, and re-entrantly)."""
        self._dead.append(ptr)
        self._try_drain()

    def _try_drain(self) -> None:
        """Apply the queued frees now unless someone holds the lock (they will)."""
        if self._lock.acquire(blocking=False):
            try:
                self._drain()
            finally:
                self._lock.release()

    def _drain(self) -> None:
        while self._dead:
            x = self._dead.popleft()
            if isinstance(x, _Owner):
                self._release_owner(x.owner)
            else:
                self._release(x)

    def _malloc(self, nbytes: int) -> int:
        size = round_size(nbytes)
        b = self._take_private(size) if self.capturing is not None else None
        if b is None:
            b = self._take(size)
        if b is None:
            self.misses += 1
            b = Block(self._device_alloc(size), size)
            self.blocks[b.ptr] = b
        else:
            self.hits += 1
        b.free = False
        if self.capturing is not None:
            b.owners.add(self.capturing)
            if b.born is None:
                b.born = self.capturing
        self.allocated += b.size
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        return b.ptr

    def _release(self, ptr: int) -> None:
        b = self.blocks[ptr]
        if b.free:
            raise RuntimeError(f"device block {ptr:#x} freed twice")
        b.free = True
        self.allocated -= b.size
        if self.capturing is not None and b.born is self.capturing and b.owners == {self.capturing}:
            self._private.setdefault(self.capturing, {}).setdefault(b.size, []).append(b)
        elif not b.owners:
            self._put(b)
        # else: held until every graph that uses its address is destroyed

    def _device_alloc(self, size: int) -> int:
        try:
            ptr = self.backend.alloc(size)
        except Exception as e:
            if not self.backend.is_oom(e) or self.capturing is not None:
                raise           # (no cuMemFree while a stream is being captured)
            self._empty_cache()                 # (malloc holds the lock)
            ptr = self.backend.alloc(size)      # a second failure is the caller's
        self.device_allocs += 1
        self.reserved += size
        self.peak_reserved = max(self.peak_reserved, self.reserved)
        return ptr

    def _take(self, size: int):
        i = bisect.bisect_left(self._sizes, size)
        if i == len(self._sizes) or self._sizes[i] > size * MAX_OVERSIZE:
            return None
        s = self._sizes[i]
        lst = self._free[s]
        b = lst.pop()
        if not lst:
            del self._free[s]
            self._sizes.pop(i)
        return b

    def _take_private(self, size: int):
        lst = self._private.get(self.capturing, {}).get(size)
        return lst.pop() if lst else None

    def _put(self, b: Block) -> None:
        lst = self._free.get(b.size)
        if lst is None:
            lst = self._free[b.size] = []
            bisect.insort(self._sizes, b.size)
        lst.append(b)

    # ---- graphs

    def begin_capture(self, owner) -> None:
        """Every block alive now belongs to `owner` from here on (the graph may read it)."""
        with self._lock:
            self._drain()
            if self.capturing is not None:
                raise RuntimeError("a capture is already in progress")
            self.capturing = owner
            for b in self.blocks.values():
                if not b.free:
                    b.owners.add(owner)

    def end_capture(self) -> None:
        with self._lock:
            self._drain()
            self.capturing = None

    def release_owner(self, owner) -> None:
        """The graph `owner` is destroyed (or its capture failed): its blocks are free for anyone.
        (Queued like a free: a graph's finalizer may call it.)"""
        self._dead.append(_Owner(owner))
        self._try_drain()

    def _release_owner(self, owner) -> None:
        if self.capturing is owner:
            self.capturing = None
        self._private.pop(owner, None)
        for b in self.blocks.values():
            if owner in b.owners:
                b.owners.discard(owner)
                if b.born is owner:
                    b.born = None
                if b.free and not b.owners:
                    self._put(b)

    # ---- returning memory to the device

    def empty_cache(self) -> int:
        """Give every cached free block (that no graph holds) back to the device; returns bytes freed."""
        with self._lock:
            self._drain()
            return self._empty_cache()

    def _empty_cache(self) -> int:
        if self.capturing is not None or not self._free:
            return 0
        self.backend.sync()     # blocks may still be in use by queued work
        freed = 0
        for lst in self._free.values():
            for b in lst:
                self.backend.free(b.ptr)
                del self.blocks[b.ptr]
                self.device_frees += 1
                freed += b.size
        self._free.clear()
        self._sizes.clear()
        self.reserved -= freed
        return freed

    def cached_free(self) -> int:
        """Bytes held in free blocks that a request may take."""
        return sum(b.size for lst in self._free.values() for b in lst)

    def stats(self) -> dict:
        self._try_drain()
        return {"reserved": self.reserved, "allocated": self.allocated, "cached_free": self.cached_free(),
                "peak_reserved": self.peak_reserved, "peak_allocated": self.peak_allocated,
                "device_allocs": self.device_allocs, "device_frees": self.device_frees,
                "hits": self.hits, "misses": self.misses, "blocks": len(self.blocks)}

    def reset_peaks(self) -> None:
        self.peak_reserved, self.peak_allocated = self.reserved, self.allocated


# ---------------------------------------------------------------- the numba plugin

class DriverBackend:
    """The device through numba-cuda's driver wrapper (errors raise CudaAPIError)."""

    def __init__(self, context):
        from numba.cuda.cudadrv.driver import driver
        self.driver, self.context = driver, context

    def alloc(self, nbytes: int) -> int:
        return int(self.driver.cuMemAlloc(nbytes))

    def free(self, ptr: int) -> None:
        from numba.cuda.cudadrv.driver import binding
        self.driver.cuMemFree(binding.CUdeviceptr(ptr))

    def mem_info(self):
        return self.driver.cuMemGetInfo()

    def sync(self) -> None:
        self.driver.cuCtxSynchronize()

    @staticmethod
    def is_oom(e) -> bool:
        from numba.cuda.cudadrv.driver import CudaAPIError, binding
        return isinstance(e, CudaAPIError) and e.code == binding.CUresult.CUDA_ERROR_OUT_OF_MEMORY


def _plugin_class():
    """NetdslMemoryManager, made on first need (numba.cuda is imported late)."""
    from numba.cuda.cudadrv.driver import (GetIpcHandleMixin, HostOnlyCUDAMemoryManager, MemoryInfo,
                                           MemoryPointer, binding)

    class NetdslMemoryManager(GetIpcHandleMixin, HostOnlyCUDAMemoryManager):
        """numba's EMM interface over `Pool` (device memory only; pinned host memory is numba's)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.pool = Pool(DriverBackend(self.context)) if self.context is not None else None

        def initialize(self):
            pass

        def memalloc(self, size):
            ptr = self.pool.malloc(size)
            release = self.pool.release
            return MemoryPointer(weakref.proxy(self.context), binding.CUdeviceptr(ptr), size,
                                 finalizer=lambda: release(ptr))

        def get_memory_info(self):
            """The device's free memory plus the pool's free cached blocks (they are free to a request)."""
            free, total = self.pool.backend.mem_info()
            return MemoryInfo(free=free + self.pool.cached_free(), total=total)

        def reset(self):
            super().reset()
            if self.pool is not None:
                self.pool.empty_cache()

        @property
        def interface_version(self):
            return 1

    return NetdslMemoryManager


def enabled() -> bool:
    return os.environ.get("NETDSL_CUDA_POOL", "1") != "0" and os.environ.get("NUMBA_ENABLE_CUDASIM") != "1"


_installed = False


def install() -> bool:
    """Make netdsl's allocator numba's memory manager (before the first allocation: called when
    the CUDA target is first used). A context that already exists gets it too. False when
    NETDSL_CUDA_POOL=0 or under the simulator (which has no device memory to manage)."""
    global _installed
    if _installed or not enabled():
        return _installed
    from numba.cuda.cudadrv import driver
    cls = _plugin_class()
    driver.set_memory_manager(cls)
    # a context made before netdsl was imported keeps numba's manager for what it already
    # allocated (those pointers carry their own finalizers) and takes ours for the rest.
    # (driver.devices holds the devices numba has opened; reading it opens none.)
    for dev in list(driver.driver.__dict__.get("devices", {}).values()):
        ctx = getattr(dev, "primary_context", None)
        if ctx is not None and not isinstance(ctx.memory_manager, cls):
            ctx.memory_manager = cls(context=ctx)
    _installed = True
    return True


def pool():
    """The current context's Pool, or None (numba's manager, or no GPU)."""
    if not _installed:
        return None
    from numba import cuda
    return getattr(cuda.current_context().memory_manager, "pool", None)


def memory_stats() -> dict | None:
    """The pool's figures (bytes, counts), or None without it."""
    p = pool()
    return p.stats() if p is not None else None


def empty_cache() -> int:
    p = pool()
    return p.empty_cache() if p is not None else 0
