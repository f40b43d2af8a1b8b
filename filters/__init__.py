"""Filters: one module per rule family; each a plain class with `run(docs) -> StageOutput`."""

from __future__ import annotations

from pathlib import Path

from booksmith.filters.base import ChainResult, Filter, StageOutput, run_chain
from booksmith.filters.chain import build_chain
from booksmith.filters.dedup import DedupIndex, DedupSettings, ExactDedup, MinHashDedup
from booksmith.filters.empty import EmptyFilter
from booksmith.schemas.filter_settings import FilterError, FilterSettings


def nightly_chain(
    settings: FilterSettings | None = None,
    dedup: DedupSettings | None = None,
    index: DedupIndex | None = None,
    *,
    state: Path | None = None,
) -> list[Filter]:
    """The filters a nightly run applies, in order: exact dedup first (cheapest, and it spares
    the rules work), the quality chain, then MinHash last, so a near-duplicate cluster keeps
    its best document by the quality score the classifier just set."""
    d = dedup or DedupSettings()
    chain: list[Filter] = [ExactDedup(index)] if d.exact else []
    chain += build_chain(settings, state=state)
    if d.minhash:
        chain.append(MinHashDedup(d, index))
    return chain


__all__ = [
    "ChainResult",
    "EmptyFilter",
    "Filter",
    "FilterError",
    "FilterSettings",
    "StageOutput",
    "build_chain",
    "nightly_chain",
    "run_chain",
]
