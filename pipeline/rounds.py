"""The run's plan as a stream of chunks, round after round: the fill loop.

The first round is the configured plan (`plan.limit`, `plan.samples_per_topic`); while the
fill targets (`fill.documents`, `fill.tokens`, `fill.documents_per_topic`) are not met, each
further round plans more requests for the topics still short, over the rate their subject's
requests have been kept at so far, so that the kept set stays balanced across subjects as the
first round's stratified sample is (generation/coverage.seeds_for). Requests are made lazily,
`plan.chunk_requests` at a time, so a plan of a million requests never sits in memory; what
is remembered of them is an 8-byte key per planned id (a fill round never plans a request
twice) and a count per topic.

A round ends only once every one of its chunks is filtered and the near-duplicate clusters are
decided over the whole run (pipeline/finalize.tally), so the rounds, and so the dataset, do not
depend on the chunk size.
"""

from __future__ import annotations

import gc
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import numpy as np

from booksmith.generation.coverage import deficit_of, seeds_for, topic_key
from booksmith.generation.ledger import GenerationReport
from booksmith.generation.plan import plan_for
from booksmith.generation.sorted_keys import SortedKeys
from booksmith.pipeline.chunks import Chunk
from booksmith.pipeline.finalize import Tally
from booksmith.pipeline.grounded import MixedPlan, interleave
from booksmith.schemas import GenerationRequest, TopicSeed
from booksmith.schemas.config import RunConfig


def _key(request_id: str) -> int:
    return int(request_id[:16], 16) if len(request_id) >= 16 else hash(request_id) % 2**64


@dataclass
class Rounds:
    """Chunks of the first round, then of each fill round (see the module docstring)."""

    seeds: list[TopicSeed]
    cfg: RunConfig
    seed: int
    planned: int = 0
    next_chunk: int = 0
    rounds: list[dict[str, Any]] = field(default_factory=list)
    need: dict[str, int] = field(default_factory=dict)
    stop: str | None = None
    # Each round's end as decided: replayed on resume instead of decided again from a later
    # state (the checkpoint keeps them).
    decisions: list[dict[str, Any]] = field(default_factory=list)
    _ids: SortedKeys = field(default_factory=SortedKeys)  # every planned request's key
    # requests planned so far by topic key: the fill rounds' keep rate per subject
    planned_by_topic: Counter[str] = field(default_factory=Counter)
    _round_planned: int = 0
    _first_round: int = 0  # requests the first round planned (the cap's unit)
    # The first round's grounded requests (a run with sources): their account and passages
    # (given: the estimate's plan to replay).
    grounded: MixedPlan | None = None

    def first(self) -> Iterator[Chunk]:
        plan = self.cfg.plan
        if self.cfg.sources:  # fill rounds plan topics only: the sources' share is planned once
            if self.grounded is None:  # (else the estimate's plan, replayed)
                self.grounded = MixedPlan(self.cfg, self.seeds, self.seed)
            return self._chunks(self.grounded.requests())
        requests = plan_for(
            self.cfg, self.seeds, self.seed, samples_per_topic=plan.samples_per_topic,
            limit=plan.limit,
        )  # fmt: skip
        return self._chunks(requests)

    def next(self, tally: Callable[[], Tally], report: GenerationReport) -> Iterator[Chunk] | None:
        """The next round's chunks, or None when the run stops (`stop` says why)."""
        fill = self.cfg.fill
        done = len(self.rounds)
        if done == 0:
            self._first_round = self._round_planned  # the unit of the request cap
        if done < len(self.decisions):  # resumed: this round's end was decided before the kill
            decision = self.decisions[done]
        else:
            kept = tally()
            need = (
                deficit_of(fill, kept.per_topic, kept.documents, kept.tokens, self.seeds)
                if fill.enabled
                else {}
            )
            decision = {"kept_total": kept.documents, "need": need, "wanted": []}
            before = self.decisions[-1]["kept_total"] if self.decisions else 0
            progress = kept.documents > before
            decision["stop"] = stop = self._stop_reason(need, report, done + 1, progress)
            if stop is None:
                need, decision["sources"] = self._grounded_need(need, kept.per_topic)
                per_topic, planned = kept.per_topic, self.planned_by_topic
                if self.grounded is not None:  # a grounded document's key names its source
                    topics = {topic_key(t.topic_path) for t in self.seeds}
                    per_topic, planned = _only(per_topic, topics), _only(planned, topics)
                wanted = seeds_for(need, self.seeds, fill.oversample, per_topic, planned)
                decision["wanted"] = [[topic_key(t.topic_path), n] for t, n in wanted]
            self.decisions.append(decision)
        self.rounds.append({"planned": self._round_planned, "kept_total": decision["kept_total"]})
        self._round_planned = 0
        self.need, self.stop = decision["need"], decision["stop"]
        if self.stop is not None:
            return None
        by_key = {topic_key(t.topic_path): t for t in self.seeds}
        seeds = [by_key[k].model_copy(update={"weight": float(n)}) for k, n in decision["wanted"]]
        requests = plan_for(
            self.cfg, seeds, self.seed, samples_per_topic=1, salt=f"-fill-{len(self.rounds)}"
        )
        asks = decision.get("sources") or {}
        if self.grounded is not None and any(asks.values()):
            grounded = self.grounded.more(asks)
            topic_asks = sum(n for _, n in decision["wanted"])
            requests = interleave([grounded, requests], [sum(asks.values()), topic_asks or 1])
        fresh = (r for r in requests if _key(r.id) not in self._ids)
        chunks = self._chunks(islice(fresh, max(0, self.max_requests - self.planned)))
        first = next(chunks, None)
        if first is None:
            self.stop = decision["stop"] = "nothing_to_plan"
            return None

        def round_chunks() -> Iterator[Chunk]:
            yield first
            yield from chunks

        return round_chunks()

    def _grounded_need(
        self, need: dict[str, int], kept: Counter[str]
    ) -> tuple[dict[str, int], dict[str, int]]:
        """With sources, the run-wide need is split by shares: (what the topics still owe,
        requests per source); per-topic needs stay the topics'."""
        if self.grounded is None or "*" not in need:
            return need, {}
        topics, asks = self.grounded.split_fill(need["*"], kept, self.planned_by_topic)
        rest = {k: n for k, n in need.items() if k != "*"}
        return ({**rest, "*": topics} if topics else rest), asks

    @property
    def max_requests(self) -> int:
        """The most requests the fill rounds may plan in all, the first round included."""
        return self.cfg.fill.request_cap(self._first_round, len(self.seeds))

    def _stop_reason(
        self, need: dict[str, int], report: GenerationReport, rounds: int, progress: bool
    ) -> str | None:
        fill = self.cfg.fill
        if not fill.enabled:
            return "single_round"
        if not need:
            return "target_met"
        if report.budget_exhausted:
            return "budget_exhausted"
        if not progress:  # a round that kept nothing new: more of the same would not either
            return "no_progress"
        if rounds >= fill.max_rounds:
            return "max_rounds"
        if self.planned >= self.max_requests:
            return "max_requests"
        return None

    def _chunks(self, requests: Iterator[GenerationRequest]) -> Iterator[Chunk]:
        size = self.cfg.plan.chunk_requests
        while True:
            # The plan allocates many small acyclic objects: the cyclic collector would walk
            # them again and again for nothing while a chunk is planned.
            gc.disable()
            try:
                plan = list(islice(requests, size))
            finally:
                gc.enable()
            if not plan:
                return
            planned = np.fromiter((_key(r.id) for r in plan), dtype=np.uint64, count=len(plan))
            self._ids.add(planned, np.zeros(len(plan), dtype=np.int64))
            self.planned_by_topic.update(topic_key(r.topic_path) for r in plan)
            self.planned += len(plan)
            self._round_planned += len(plan)
            chunk = Chunk(self.next_chunk, plan)
            self.next_chunk += 1
            yield chunk

    def account(self) -> dict[str, Any]:
        """The manifest's fill account."""
        return {"stopped": self.stop, "rounds": self.rounds, "short": self.need}


def _only(counts: Counter[str], keys: set[str]) -> Counter[str]:
    """The counts of these topic keys only."""
    return Counter({k: n for k, n in counts.items() if k in keys})
