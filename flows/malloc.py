"""How booksmith's processes allocate: fewer glibc arenas, big blocks mapped, Arrow on malloc.

A run's flow process hands chunks of documents between many threads (the HTTP client's event
loop, Prefect's, the shard writer's), chunk after chunk, and its resident memory crept up with
every chunk although what it held did not (BENCHMARKS.md, run_scale):

- glibc gives each thread that allocates concurrently its own arena (up to 8 per core), and
  freed memory stays in the arena that held it: two arenas (`MALLOC_ARENA_MAX`) took the growth
  from 4.3 to about 2 KB a request between a 4,000- and a 40,000-request run.
- glibc raises its mmap threshold each time a mapped block is freed (up to 32 MB), so a chunk's
  big arrays and strings moved into the heap and fragmented it as the run went on; a fixed
  threshold of 128 KB (`MALLOC_MMAP_THRESHOLD_`) maps them and gives them back when freed.
- Arrow's default pool (mimalloc) kept what the final pass freed; on the system allocator
  (`ARROW_DEFAULT_MEMORY_POOL=system`) its buffers follow the two rules above.

Together, in a probe of 4,000 and 40,000 requests: about 1 KB a request and a base 135 MB
lower, where the arena cap alone gave 2.4 KB. Each is set for this process now (before threads
start) and for its children through the environment they inherit (filter workers, the embedded
model's server); a user's own setting of any of them wins.
"""

from __future__ import annotations

import contextlib
import ctypes
import os

ARENAS = 2
MMAP_THRESHOLD = 128 * 1024
M_ARENA_MAX, M_MMAP_THRESHOLD = -8, -3  # glibc's mallopt parameters


def limit_arenas() -> None:
    """Set the three (see the module docstring) for this process and its children."""
    libc: ctypes.CDLL | None = None
    with contextlib.suppress(OSError, AttributeError):  # not glibc (macOS, musl): no tuning
        libc = ctypes.CDLL("libc.so.6")
    for name, value, param in (
        ("MALLOC_ARENA_MAX", ARENAS, M_ARENA_MAX),
        ("MALLOC_MMAP_THRESHOLD_", MMAP_THRESHOLD, M_MMAP_THRESHOLD),
    ):
        if name in os.environ:
            continue  # the user's choice; glibc read it at start
        os.environ[name] = str(value)
        if libc is not None:
            with contextlib.suppress(AttributeError):
                libc.mallopt(param, value)
    if "ARROW_DEFAULT_MEMORY_POOL" not in os.environ:
        os.environ["ARROW_DEFAULT_MEMORY_POOL"] = "system"
        import pyarrow as pa

        pa.set_memory_pool(pa.system_memory_pool())
