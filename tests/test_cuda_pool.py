"""The caching device allocator (runtime/cuda_pool.py) without a GPU: its Pool over a
fake device that counts alloc/free calls, and the numba plugin over that fake.

On a GPU, scripts/gpu-check's graph section checks the pool for real (no device
allocation in a steady-state step, the pool's peak beside torch's)."""
import gc
import json
import os
import subprocess
import sys

import pytest

from netdsl.runtime.cuda_pool import MAX_OVERSIZE, Pool, round_size


class OOM(Exception):
    pass


class FakeDevice:
    """A device of `capacity` bytes: counts alloc and free, fails with OOM when full."""

    def __init__(self, capacity=1 << 40):
        self.capacity, self.used, self.next = capacity, 0, 0x1000
        self.allocs = self.frees = self.syncs = 0
        self.live: dict[int, int] = {}

    def alloc(self, n):
        if self.used + n > self.capacity:
            raise OOM(n)
        self.allocs += 1
        self.used += n
        p, self.next = self.next, self.next + n + 256
        self.live[p] = n
        return p

    def free(self, p):
        self.frees += 1
        self.used -= self.live.pop(p)

    def mem_info(self):
        return self.capacity - self.used, self.capacity

    def sync(self):
        self.syncs += 1

    @staticmethod
    def is_oom(e):
        return isinstance(e, OOM)


def step(pool, sizes):
    """One 'training step': arrays made in order, each dropped after the next is made
    (a chain of activations), the last kept until the step ends."""
    prev = None
    for s in sizes:
        p = pool.malloc(s)
        if prev is not None:
            pool.release(prev)
        prev = p
    pool.release(prev)


SIZES = [4, 1000, 513, 1 << 20, (1 << 20) + 1, 3 << 20, 5_000_000, 123_456_789]


def test_round_size_as_documented():
    assert [round_size(n) for n in (1, 512, 513, 1000, 1 << 20)] == [512, 512, 1024, 1024, 1 << 20]
    # above 1 MiB: 1, 1.25, 1.5 or 1.75 times a power of two
    assert round_size((1 << 20) + 1) == 1.25 * (1 << 20)
    assert round_size(3 << 20) == 3 << 20
    assert round_size(5_000_000) == 5 * (1 << 20)      # 4.77 MiB -> 5 MiB (1.25 x 4 MiB)
    for n in SIZES:
        r = round_size(n)
        assert r >= n and (r - n < 512 if n <= 1 << 20 else r <= 1.25 * n)
        assert r % 512 == 0 and round_size(r) == r


def test_second_identical_step_allocates_nothing():
    dev = FakeDevice()
    pool = Pool(dev)
    sizes = [3 * 64 * 32 * 32 * 4, 64 * 64 * 32 * 32 * 4, 512, 64 * 1000 * 4, 4, 64 * 64 * 32 * 32 * 4, 4]
    step(pool, sizes)
    first = dev.allocs
    assert first > 0 and pool.allocated == 0
    for _ in range(3):
        step(pool, sizes)
    assert dev.allocs == first and dev.frees == 0
    s = pool.stats()
    assert s["device_allocs"] == first and s["hits"] + s["misses"] == 4 * len(sizes) and s["misses"] == first
    assert s["reserved"] == sum(b.size for b in pool.blocks.values()) and s["cached_free"] == s["reserved"]


def test_a_larger_free_block_serves_up_to_twice_the_request():
    dev = FakeDevice()
    pool = Pool(dev)
    big = pool.malloc(4096)
    pool.release(big)
    assert pool.malloc(2048) == big                 # 4096 <= 2 x 2048
    pool.release(big)
    small = pool.malloc(1024)                       # 4096 > 2 x 1024: a block of its own
    assert small != big and dev.allocs == 2 and MAX_OVERSIZE == 2


def test_double_free_is_refused():
    pool = Pool(FakeDevice())
    p = pool.malloc(100)
    pool.release(p)
    with pytest.raises(RuntimeError, match="twice"):
        pool.release(p)


def test_out_of_memory_empties_the_cache_and_retries_once():
    dev = FakeDevice(capacity=10_000)
    pool = Pool(dev)
    a, b = pool.malloc(4096), pool.malloc(4096)
    pool.release(a)
    pool.release(b)                                 # 8192 cached, free to the pool but not the device
    c = pool.malloc(6144)                           # no cached block fits (4096 < 6144): OOM, retry
    assert dev.frees == 2 and dev.syncs == 1 and pool.reserved == 6144 and c in dev.live
    with pytest.raises(OOM):                        # still too big after emptying: the error is raised
        pool.malloc(8192)
    assert pool.allocated == 6144


def test_empty_cache_reports_and_returns_only_free_blocks():
    dev = FakeDevice()
    pool = Pool(dev)
    keep, drop = pool.malloc(1 << 20), pool.malloc(2 << 20)
    pool.release(drop)
    assert pool.empty_cache() == 2 << 20 and dev.frees == 1 and pool.reserved == 1 << 20
    assert keep in dev.live and pool.stats()["peak_reserved"] == 3 << 20


def test_capture_owns_its_blocks_until_the_graph_is_destroyed():
    dev = FakeDevice()
    pool = Pool(dev)
    before = pool.malloc(1024)          # alive when the capture starts: the graph may read it
    old = pool.malloc(2048)
    pool.release(old)                   # free before: anyone's
    graph = object()
    pool.begin_capture(graph)
    t1 = pool.malloc(2048)              # may take the free block (it was dead at capture start)
    assert t1 == old
    pool.release(t1)
    t2 = pool.malloc(2048)              # allocated and freed inside this capture: reused inside it
    assert t2 == t1
    pool.release(before)                # alive at capture start, freed during it: held back
    t3 = pool.malloc(1024)
    assert t3 != before
    out = pool.malloc(512)              # an output the graph keeps
    pool.release(t2)
    pool.release(t3)
    pool.end_capture()
    # after the capture nobody else gets the graph's blocks, freed or not
    others = [pool.malloc(s) for s in (1024, 2048, 512, 1024)]
    assert not {before, t1, t3, out} & set(others)
    pool.release(out)
    assert pool.malloc(512) != out
    n = dev.allocs
    pool.release_owner(graph)           # the graph is destroyed: its free blocks are anyone's again
    again = {pool.malloc(s) for s in (1024, 2048, 1024, 512)}
    assert again == {before, t1, t3, out} and dev.allocs == n


def test_no_device_free_while_capturing():
    dev = FakeDevice(capacity=4096)
    pool = Pool(dev)
    p = pool.malloc(4096)
    pool.release(p)
    pool.begin_capture("g")
    with pytest.raises(OOM):            # no empty_cache (cuMemFree) inside a capture: the OOM stands
        pool.malloc(2048 + 512 * 5)
    assert pool.empty_cache() == 0 and dev.frees == 0
    pool.release_owner("g")
    assert pool.capturing is None


PLUGIN = r"""
import gc, json, os, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[1])))
from test_cuda_pool import FakeDevice
from netdsl.runtime import cuda_pool
from netdsl.runtime.cuda_pool import Pool, _plugin_class
from numba.cuda.cudadrv import driver
r = {}
os.environ["NETDSL_CUDA_POOL"] = "0"                # the opt-out leaves numba's manager
r["opt_out"] = [cuda_pool.install(), driver._memory_manager]
os.environ["NETDSL_CUDA_POOL"] = "1"
r["installed"] = [cuda_pool.install(), getattr(driver._memory_manager, "__name__", None)]


class Ctx:
    pass
ctx = Ctx()
mgr = _plugin_class()(context=ctx)                   # the plugin over a fake device
dev = FakeDevice(capacity=1 << 30)
mgr.pool = Pool(dev)
m = mgr.memalloc(1000)
ptr = int(m.device_pointer)
r["first"] = [ptr in dev.live, m.size]
del m
gc.collect()
r["freed"] = mgr.pool.allocated
m2 = mgr.memalloc(900)                               # the same rounded size: the same block
r["reused"] = [int(m2.device_pointer) == ptr, dev.allocs]
info = mgr.get_memory_info()
r["info"] = [info.total, info.free]
r["version"] = mgr.interface_version
print(json.dumps(r))
"""


def test_numba_plugin_install_and_opt_out():
    """In a process of its own (it sets numba's memory manager): NETDSL_CUDA_POOL=0 keeps
    numba's, install() puts the plugin in place, and the plugin hands out MemoryPointers
    whose finalizer gives the block back to the pool."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    out = subprocess.run([sys.executable, "-c", PLUGIN, __file__], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["opt_out"] == [False, None]
    assert r["installed"] == [True, "NetdslMemoryManager"]
    assert r["first"] == [True, 1000] and r["freed"] == 0
    assert r["reused"] == [True, 1] and r["version"] == 1
    assert r["info"] == [1 << 30, (1 << 30) - 1024]     # device free + the pool's cached free


def test_a_free_inside_malloc_is_queued_not_interleaved():
    """A finalizer run by the garbage collector in the middle of malloc (same thread) must not
    change the free lists under it: the free is applied when malloc is done."""
    dev = FakeDevice()
    pool = Pool(dev)
    a = pool.malloc(1024)
    inner = []
    alloc = dev.alloc

    def alloc_with_gc(n):          # a 'collection' during the device call frees a and drops a graph
        pool.release(a)
        pool.release_owner("gone")
        inner.append(pool.allocated)
        return alloc(n)
    dev.alloc = alloc_with_gc
    b = pool.malloc(4096)
    dev.alloc = alloc
    assert inner == [1024]                          # not applied inside malloc
    assert pool.stats()["allocated"] == 4096        # applied after
    assert pool.malloc(1024) == a and b != a
