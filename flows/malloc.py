"""Allocator settings for booksmith's processes, so a run's memory does not creep with its size.

- **Two glibc arenas** (`MALLOC_ARENA_MAX=2`). glibc gives each thread that allocates
  concurrently its own arena (up to 8 per core), and freed memory stays in the arena that held
  it. A run's flow process has many threads (Prefect's, the shard writer's) handing chunks of
  documents to each other, so its resident memory crept up with every chunk: 4.3 KB per request
  between a 4,000- and a 40,000-request run against the fake server; 1.9 KB with two arenas.
- **A fixed mmap threshold of 128 KB** (`MALLOC_MMAP_THRESHOLD_=131072`). glibc raises the
  threshold as large blocks are freed (up to 32 MB), after which a chunk's large buffers come
  from the heap, where what is freed is rarely given back.
- **Arrow on the system allocator** (`ARROW_DEFAULT_MEMORY_POOL=system`), so that its buffers
  follow the same rule: pyarrow's default (mimalloc) kept what the final pass freed.

The last two together (BENCHMARKS.md, run_scale): 994 bytes per additional request from 4,000
to 40,000 requests instead of 2,327, and a peak 200 MB lower, at the same speed; the threshold
alone did worse (its final-pass spike grew). The system pool once made `booksmith verify`
abort at exit: Arrow threads still reading a Python file object as the interpreter finished
(apache/arrow#34314), gone since local shards are opened by path (shards/fs.open_parquet).

Children (filter workers, the generation process, the embedded model's server) inherit the
settings through the environment. A user's own setting of any of them wins.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys

SETTINGS = {
    "MALLOC_ARENA_MAX": "2",
    "MALLOC_MMAP_THRESHOLD_": "131072",
    "ARROW_DEFAULT_MEMORY_POOL": "system",
}
# glibc's mallopt parameters for the two it read at this process's start
MALLOPT = {"MALLOC_ARENA_MAX": -8, "MALLOC_MMAP_THRESHOLD_": -3}


def tune_allocators() -> None:
    """Apply SETTINGS to this process now (before its threads start) and to its children
    through the environment they inherit; leave alone any the user set."""
    mine = {k: v for k, v in SETTINGS.items() if k not in os.environ}
    os.environ.update(mine)
    with contextlib.suppress(OSError, AttributeError):  # not glibc (macOS, musl): no change
        libc = ctypes.CDLL("libc.so.6")
        for name, value in mine.items():
            if name in MALLOPT:
                libc.mallopt(MALLOPT[name], int(value))
    if "ARROW_DEFAULT_MEMORY_POOL" in mine and "pyarrow" in sys.modules:
        # Arrow read the variable when it was imported: switch this process's pool by hand
        import pyarrow as pa

        pa.set_memory_pool(pa.system_memory_pool())
