"""Keep a long process's memory at what its current step needs.

`lensflow run` runs every stage in one process. What a stage frees stays mapped by the
allocator that held it (glibc's free lists, Arrow's mimalloc pool, which keeps its pages even
when asked to release them) and sits under every later stage: the run's peak becomes the sum
of what each stage left behind instead of the largest stage's own need. So Arrow allocates
from the system allocator, and each stage hands back what it freed when it ends.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys


def use_system_allocator() -> None:
    """Arrow buffers (pandas' strings, parquet reads) from malloc, which `release_freed` trims."""
    import pyarrow

    system = pyarrow.system_memory_pool()
    if pyarrow.default_memory_pool().backend_name != system.backend_name:
        pyarrow.set_memory_pool(system)


def release_freed() -> None:
    """Return the memory freed so far to the operating system."""
    gc.collect()
    if "pyarrow" in sys.modules:
        sys.modules["pyarrow"].default_memory_pool().release_unused()
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        if hasattr(libc, "malloc_trim"):  # glibc; other C libraries have no free lists to trim
            libc.malloc_trim(0)
