"""Filters: one module per rule family; each a plain class with `run(docs) -> StageOutput`."""

from filters.base import ChainResult, Filter, StageOutput, run_chain
from filters.empty import EmptyFilter


def default_chain() -> list[Filter]:
    """The filters a nightly run applies, in order."""
    return [EmptyFilter()]


__all__ = ["ChainResult", "EmptyFilter", "Filter", "StageOutput", "default_chain", "run_chain"]
