"""Fresh memory mapped apart from malloc's heap, for the kernels' scratch and the
runtime's workspace, parameters and gradients (netdsl/runtime/arena.py)."""
import mmap

import numpy as np

ALIGN = 64      # bytes: a cache line, so no two values share one


def pages(nbytes: int, huge: bool = False) -> np.ndarray:
    """nbytes of fresh anonymous memory, mapped apart from malloc's heap (where a large
    block's hole, once freed, is left for whatever comes next) and unmapped when the
    last view of it dies; only the pages written count as resident.

    huge: in huge pages where the kernel offers them (transparent huge pages in
    "madvise" mode), for buffers that are written whole (parameters, gradients), which
    otherwise fault in a page at a time. Not for partly used ones, whose untouched pages
    khugepaged may fill in (and count as step memory)."""
    m = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if huge and hasattr(mmap, "MADV_HUGEPAGE"):      # Linux
        try:
            m.madvise(mmap.MADV_HUGEPAGE)
        except OSError:     # a kernel built without transparent huge pages: EINVAL
            pass
    return np.frombuffer(m, np.uint8)[:nbytes]      # (mmap needs a byte; 0 bytes views as any dtype)
