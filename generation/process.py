"""A chunk's generation, in the flow's thread or in a process of its own.

The HTTP client is Python: its event loop parses every answer, counts its tokens and writes
it to the response cache. In the flow's process it shares one GIL with the chunk pipeline
(documents, exact dedup, MinHash, the spill), so while chunk k is filtered chunk k+1's
requests wait for the interpreter and the two stages run nearly one after the other.
`GenerationProcess` runs the client in spawned processes instead (one per partition of a
chunk, kept for the whole run, so each starts once): the flow's process filters on one core
while generation answers on the other.

Progress crosses back through a queue: the child sends a copy of its report's counters at
most every PROGRESS_EVERY_S seconds (and once at the end), and a thread in the flow's process
emits them as the usual "generation" events (generation/progress.py), so the CLI's bar moves
as before. A crash point passed in a child kills the flow's process too (schemas/crashpoints.py):
a test's kill stays a kill of the run.
"""

from __future__ import annotations

import asyncio
import dataclasses
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from booksmith.generation import progress
from booksmith.generation.cache import ResponseCache
from booksmith.generation.client import Endpoint
from booksmith.generation.clients import make_client
from booksmith.generation.ledger import GenerationReport
from booksmith.schemas import GenerationRequest, GenerationResult
from booksmith.schemas.config import Budget, RunConfig
from booksmith.schemas.crashpoints import kill_parent_too
from booksmith.shards.version_dir import state_dir

PROGRESS_EVERY_S = 0.25
ORPHAN_POLL_S = 0.05  # how soon a generation process follows its run out

OnResult = Callable[[GenerationResult, GenerationReport], None]


@dataclasses.dataclass(frozen=True)
class GenerationCall:
    """One partition of one chunk against one endpoint: what generating it takes, in the
    flow's thread or a generation process. `limits`: where the endpoint's adaptive limits
    ended before this chunk; `history`: the circuit breaker's window as the chunks before
    left it (outcomes of the last requests, "" for a success)."""

    plan: list[GenerationRequest]
    endpoint: Endpoint
    cfg: RunConfig
    run_id: str
    budget: Budget
    part: str = ""  # "part 2/3" when the chunk has several partitions
    history: Sequence[str] = ()
    limits: dict[str, Any] | None = None


def generate_chunk(call: GenerationCall, on_result: OnResult | None) -> GenerationReport:
    """`call` in the calling thread."""
    cache = ResponseCache(state_dir(call.cfg.output.dir) / "responses.sqlite")
    try:
        client = make_client(
            call.cfg, call.endpoint, cache=cache, run_id=call.run_id, budget=call.budget,
            on_result=on_result, history=call.history, limits=call.limits,
        )  # fmt: skip
        return asyncio.run(client.run(call.plan))
    finally:
        cache.close()


def snapshot(report: GenerationReport) -> GenerationReport:
    """The report's counters without its results: what a progress line needs, small to send."""
    return dataclasses.replace(report, results=[], outcomes=[], rate=[], limits={})


# -- the child's side ----------------------------------------------------------------------------

_events: Any = None  # the child's end of the progress queue


def _init_child(events: Any, parent: int) -> None:
    global _events
    _events = events
    kill_parent_too(parent)
    # A run killed (or crashed) leaves no orphan asking the endpoint: a rerun would ask again
    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()


def _exit_with(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(ORPHAN_POLL_S)
    os.kill(os.getpid(), signal.SIGKILL)


def _ready() -> int:
    return os.getpid()


def _generate_in_child(number: int, call: GenerationCall) -> GenerationReport:
    sent = 0.0

    def on_result(result: GenerationResult, report: GenerationReport) -> None:
        nonlocal sent
        now = time.perf_counter()
        if now - sent >= PROGRESS_EVERY_S:
            sent = now
            _events.put((number, call.part, snapshot(report), False))

    report = generate_chunk(call, on_result)
    _events.put((number, call.part, snapshot(report), True))  # the last: `run` waits for it
    return report


# -- the flow's side -----------------------------------------------------------------------------


class GenerationProcess:
    """`processes` spawned generation processes for one run (see the module docstring)."""

    def __init__(self, processes: int = 1) -> None:
        ctx = multiprocessing.get_context("spawn")  # not fork: the flow's process runs threads
        self._events = ctx.Queue()
        self._pool = ProcessPoolExecutor(
            processes, mp_context=ctx, initializer=_init_child, initargs=(self._events, os.getpid())
        )
        self._lock = threading.Lock()
        self._calls = 0
        self._last: dict[int, threading.Event] = {}  # set when a call's last event is out
        self._shown: dict[int, GenerationReport] = {}
        self._forward = threading.Thread(
            target=self._forward_progress, name="booksmith-generation-progress", daemon=True
        )
        self._forward.start()
        # start the processes now: their imports overlap the run's planning
        self._started = [self._pool.submit(_ready) for _ in range(processes)]

    def pids(self) -> list[int]:
        """The generation processes (started by then)."""
        return sorted({f.result() for f in self._started})

    def run(self, call: GenerationCall) -> GenerationReport:
        """`generate_chunk(call)` in a generation process; returns once its last progress
        event is out, so none arrives after the caller reports the chunk generated."""
        with self._lock:
            self._calls += 1
            number = self._calls
            self._last[number] = threading.Event()
        try:
            report = self._pool.submit(_generate_in_child, number, call).result()
            self._last[number].wait(timeout=10)
            return report
        finally:
            with self._lock:
                self._last.pop(number, None)
                self._shown.pop(number, None)

    def _forward_progress(self) -> None:
        """Each call's snapshots update one report object, which the listeners see as the
        same partition's report (the CLI sums the latest report of each)."""
        while True:
            item = self._events.get()
            if item is None:
                return
            number, part, snap, last = item
            with self._lock:
                done = self._last.get(number)
                if done is None:  # its `run` gave up on it (the child died)
                    continue
                shown = self._shown.setdefault(number, snap)
                if shown is not snap:
                    shown.__dict__.update(snap.__dict__)
            progress.emit("generation", result=None, report=shown, part=part)
            if last:
                done.set()

    def close(self) -> None:
        self._pool.shutdown(cancel_futures=True)
        self._events.put(None)
        self._forward.join(timeout=5)
        self._events.close()

    def __enter__(self) -> GenerationProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
