"""Fewer glibc malloc arenas for booksmith's processes.

glibc gives each thread that allocates concurrently its own arena (up to 8 per core), and freed
memory stays in the arena that held it. A run's flow process has many threads (the HTTP
client's event loop, Prefect's, the shard writer's) handing chunks of documents to each other,
so its resident memory crept up with every chunk: 4.3 KB per request between a 4,000- and a
40,000-request run against the fake server. With two arenas it is 1.9 KB (BENCHMARKS.md,
run_scale), at no cost in speed we could measure. A user's own MALLOC_ARENA_MAX wins.
"""

from __future__ import annotations

import contextlib
import ctypes
import os

ARENAS = 2
M_ARENA_MAX = -8  # glibc's mallopt parameter


def limit_arenas() -> None:
    """Cap this process's arenas now (threads not started yet) and its children's through the
    environment they inherit (filter workers, the embedded model's server)."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return  # the user's choice; glibc read it at start
    os.environ["MALLOC_ARENA_MAX"] = str(ARENAS)
    with contextlib.suppress(OSError, AttributeError):  # not glibc (macOS, musl): no cap
        ctypes.CDLL("libc.so.6").mallopt(M_ARENA_MAX, ARENAS)
