"""Named points where a test can kill the process, to prove a run survives SIGKILL anywhere.

Set `BOOKSMITH_CRASH_AT=<point>[:<n>]` and the process kills itself with SIGKILL the n-th time
(default the first) it passes `<point>`. Unset, `crash_point` is a dictionary lookup: it costs
nothing in real runs. The points, in the order a nightly run passes them:

    generate.result        after a generation result is in the response cache (once each)
    filter.done            after each chunk's filters, before its spill is written
    chunk.done             after each chunk's checkpoint (its spill written)
    shards.file            after each shard file of the version is renamed into place
    shards.manifest        after every shard, before the card and manifest
    index.commit           after the manifest, before the MinHash index commit
    index.committed        after the index commit, before the report
"""

from __future__ import annotations

import os
import signal
import threading
from collections import Counter

ENV = "BOOKSMITH_CRASH_AT"
_passed: Counter[str] = Counter()
_lock = threading.Lock()
_parent: int | None = None  # a worker process's run, killed with it


def kill_parent_too(pid: int) -> None:
    """In a worker process of a run (generation/process.py): a crash point passed here kills
    the run's process first, as a power cut would kill both."""
    global _parent
    _parent = pid


def crash_point(name: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point != name:
        return
    with _lock:
        _passed[name] += 1
        hit = _passed[name] == int(nth or 1)
    if hit:
        if _parent is not None:
            os.kill(_parent, signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
