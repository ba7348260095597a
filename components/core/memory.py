"""Keep a long process's memory at what its current step needs.

`lensflow run` runs every stage in one process. What a stage frees stays mapped by the
allocator that held it (glibc's free lists; Arrow's default mimalloc pool, which keeps its
pages even when asked to release them) and sits under every later stage: the run's peak
becomes the sum of what each stage left behind instead of the largest stage's own need.
So Arrow (parquet, pandas' strings) allocates from jemalloc with no decay delay, which hands
freed pages back at once, and each stage hands back what glibc kept when it ends.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import sys


def stage(fn):
    """`fn` as one stage of a long process: Arrow on the returning allocator before it, and
    what it freed given back after it."""

    @functools.wraps(fn)
    def run_as_stage(*args, **kwargs):
        use_returning_allocator()
        keep_out_of_collections()
        try:
            return fn(*args, **kwargs)
        finally:
            release_freed()

    return run_as_stage


def use_returning_allocator() -> None:
    """Arrow on jemalloc, returning freed pages at once; the system allocator where pyarrow
    was built without jemalloc (`release_freed` trims that one)."""
    import pyarrow

    try:
        pyarrow.jemalloc_set_decay_ms(0)
        pool = pyarrow.jemalloc_memory_pool()
    except NotImplementedError:
        pool = pyarrow.system_memory_pool()
    pyarrow.set_memory_pool(pool)


def keep_out_of_collections() -> None:
    """Leave every object alive now (the imported libraries, most of them) out of later
    garbage collections: `release_freed` then walks what the stages made, in milliseconds,
    not the whole heap of torch, Prefect and MLflow (a third of a second each time)."""
    global _frozen
    if not _frozen:
        gc.freeze()
        _frozen = True


_frozen = False


def release_freed() -> None:
    """Return the memory freed so far (cycles included) to the operating system."""
    gc.collect()
    if "pyarrow" in sys.modules:
        sys.modules["pyarrow"].default_memory_pool().release_unused()
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc's; others keep no free lists
    if trim is not None:
        trim(0)
