"""The live client's cache writer (generation/cache_writer.py): an answer is committed when its
`put` returns (another connection reads it), answers that arrive during a commit share the
next one, and a commit that fails raises in every worker that waited on it."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from booksmith.generation.cache import ResponseCache
from booksmith.generation.cache_writer import CacheWriter
from booksmith.schemas import GenerationResult


def _answers(n: int) -> list[GenerationResult]:
    return [GenerationResult(request_id=f"r{i:04d}", text=f"answer {i}") for i in range(n)]


def test_an_answer_is_committed_when_its_put_returns(tmp_path: Path) -> None:
    cache = ResponseCache(tmp_path / "c.sqlite")
    other = ResponseCache(tmp_path / "c.sqlite")  # another connection, as a rerun would open
    seen: list[bool] = []

    async def worker(writer: CacheWriter, result: GenerationResult) -> None:
        await writer.put(result)
        seen.append(other.get(result.request_id) is not None)

    async def main() -> None:
        async with CacheWriter(cache) as writer:
            await asyncio.gather(*(worker(writer, r) for r in _answers(50)))

    asyncio.run(main())
    assert seen == [True] * 50
    assert len(other) == 50


def test_answers_that_arrive_during_a_commit_share_the_next(tmp_path: Path) -> None:
    cache = ResponseCache(tmp_path / "c.sqlite")

    async def main() -> int:
        async with CacheWriter(cache) as writer:
            with cache._lock:  # a commit under way: the writer waits, answers queue up
                puts = [asyncio.ensure_future(writer.put(r)) for r in _answers(100)]
                await asyncio.sleep(0.05)
            await asyncio.gather(*puts)
            return writer.commits

    # the first answer may have been taken before the others arrived: two commits at most
    assert asyncio.run(main()) <= 2
    assert len(cache) == 100


def test_a_failed_commit_raises_in_every_waiting_worker(tmp_path: Path) -> None:
    cache = ResponseCache(tmp_path / "c.sqlite")
    cache._db.execute("DROP TABLE failures")  # the second statement of the transaction fails

    async def main() -> list[BaseException | None]:
        async with CacheWriter(cache) as writer:
            return await asyncio.gather(
                *(writer.put(r) for r in _answers(5)), return_exceptions=True
            )

    outcomes = asyncio.run(main())
    assert all(isinstance(o, sqlite3.OperationalError) for o in outcomes), outcomes
    assert len(cache) == 0  # rolled back: no answer half-stored
    with pytest.raises(sqlite3.OperationalError, match="no such table: failures"):
        cache.put(_answers(1)[0])
