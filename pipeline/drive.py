"""The run's loop: rounds of chunks, generation of one chunk overlapping the filtering of the
one before, so the endpoint never waits for the filters.

Order, for chunks 0, 1, 2 of a round: start generating 0; when 0's answers are in, start 1,
then filter 0 while 1 generates; when 1's are in, start 2 and filter 1; ... Generation itself
stays one chunk at a time, so each chunk starts with the budget the earlier ones left. After a
round's last chunk is filtered, the fill account decides whether another round follows.

The loop knows nothing of Prefect: the flow passes `start` (submit a generation task, return
something with `.result()`), `finish` (the chunk task) and `tally` (what the run keeps so far).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

from booksmith.generation.breaker import EndpointFailing
from booksmith.generation.ledger import GenerationReport
from booksmith.pipeline.chunks import Chunk
from booksmith.pipeline.finalize import Tally
from booksmith.pipeline.rounds import Rounds


class Pending(Protocol):
    def result(self) -> GenerationReport: ...


def overlapped(
    chunks: Iterator[Chunk],
    start: Callable[[Chunk], Pending],
    finish: Callable[[Chunk, GenerationReport], None],
) -> None:
    """Generate each chunk and filter it, chunk k+1 generating while chunk k is filtered."""
    pending: tuple[Chunk, Pending] | None = None
    for chunk in chunks:
        if pending is None:
            pending = (chunk, start(chunk))
            continue
        previous, running = pending
        report = _answered(running)
        pending = (chunk, start(chunk))
        finish(previous, report)
    if pending is not None:
        finish(pending[0], _answered(pending[1]))


def _answered(running: Pending) -> GenerationReport:
    """A chunk's generation report; raises EndpointFailing when the circuit breaker tripped
    in it, before the chunk is filtered and checkpointed, so a rerun resumes at this chunk and
    asks again only for what was not answered (the answers are in the cache)."""
    report = running.result()
    if report.breaker is not None:
        raise EndpointFailing(
            f"{report.breaker}: the run stopped ({report.skipped_breaker} requests not "
            "attempted). The answers so far are cached: fix the endpoint (generation.base_url, "
            "generation.endpoints, the key) and run again with the same config and seed to "
            "resume."
        )
    return report


def run_rounds(
    rounds: Rounds,
    start: Callable[[Chunk], Pending],
    finish: Callable[[Chunk, GenerationReport], None],
    tally: Callable[[], Tally],
    report: Callable[[], GenerationReport],
    *,
    done: int = 0,
    replay: Callable[[Chunk], None] = lambda chunk: None,
) -> None:
    """Every round until the fill account stops the run (`rounds.stop` says why). A resumed
    run passes the chunks it completed before (`done`): they are planned again, handed to
    `replay` (which writes their plan rows) and neither generated nor filtered again."""

    def fresh(chunks: Iterator[Chunk]) -> Iterator[Chunk]:
        for chunk in chunks:
            if chunk.number < done:
                replay(chunk)
            else:
                yield chunk

    chunks: Iterator[Chunk] | None = rounds.first()
    while chunks is not None:
        overlapped(fresh(chunks), start, finish)
        chunks = rounds.next(tally, report())
