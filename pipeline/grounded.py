"""A run's first round when it has sources: grounded requests, mixed with topic requests by the
configured shares, as one lazy stream (the chunks of pipeline/rounds.py take it as they take
the topic plan).

Which passages a source gives a run: every passage gets a draw, a hash of the run seed and the
passage's key (generation/source_state.py); passages earlier runs planned are skipped (unless
`grounding.repeat: any`), and the run takes those with the smallest draws. That needs two
passes over the source, never the source in memory: the first cuts passages, sums the
checksum and keeps the `oversample` x wanted smallest draws (one integer each, with the
ordinal of its record); the second reads again, cuts only the records holding those
candidates, and sends the candidates, a batch at a time, through the pre-generation filters
(filters/source_gate.py), planning the survivors in the source's order until the run has its
share. When the filters leave it short, another round (two more passes) takes the next
smallest draws. So the same seed, config and sources give the same plan, and a resumed run
plans again exactly what it planned before the kill.

Cutting is what a pass costs (counting tokens); reading and parsing records is about a
twentieth of it. The run's estimate plans the first round before the run does
(flows/nightly.py): the run's plan is then `again()`, which keeps the estimate's selections
(each round's largest draw and its records' ordinals) and the filters' verdicts on its
candidates, and does only the second passes, filtering nothing again.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import math
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from booksmith.filters.source_gate import GateResult, SourceGate
from booksmith.filters.sources import Checksum, Source, SourceRecord
from booksmith.generation.coverage import MIN_KEEP_RATE
from booksmith.generation.grounded_requests import GroundedRequests
from booksmith.generation.passages import Passage, cut_passages
from booksmith.generation.plan import plan_for
from booksmith.generation.source_state import (
    contains,
    is_taken_down,
    passage_key,
    planned_passages,
    taken_down_records,
)
from booksmith.schemas import GenerationRequest, TopicSeed
from booksmith.schemas.config import ConfigError, RunConfig
from booksmith.schemas.records import Grounding
from booksmith.shards.encodings import get_encoding
from booksmith.shards.version_dir import state_dir

GATE_BATCH = 256  # candidate passages filtered together
# Rounds of candidates a source gets when the filters reject more than `oversample` allows for
# (each round two passes over the source).
MAX_ROUNDS = 8


def _draw(seed: int, key: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class SourcePlan:
    """One source's requests for one run, and its account for the manifest."""

    def __init__(
        self, source: Source, cfg: RunConfig, seed: int, wanted: int | None, gate: SourceGate,
        exclude: np.ndarray | None = None,
    ) -> None:  # fmt: skip
        self.source, self.cfg, self.seed, self.gate = source, cfg, seed, gate
        g = cfg.grounding
        # wanted requests -> passages (each passage makes recipes_per_passage requests)
        self.passages_wanted = None if wanted is None else math.ceil(wanted / g.recipes_per_passage)
        enc = get_encoding(cfg.output.encoding)
        self.count = lambda text: len(enc.encode_ordinary(text))
        self.before = (
            planned_passages(cfg.output.dir) if g.repeat == "new" else np.empty(0, np.uint64)
        )
        if exclude is not None:  # a fill round: not the passages this run planned already
            self.before = np.union1d(self.before, exclude)
        self.taken_down = taken_down_records(cfg.output.dir)  # never planned again
        self.keys: list[int] = []  # passages this run planned (recorded once it is published)
        self.counts: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self.recipes: Counter[str] = Counter()
        self.licenses: Counter[str] = Counter()
        self.checksum = ""
        # Each round's selection: (above, limit, ordinals of the records holding candidates,
        # None: every record), kept for `again()`; `replay` is another plan's, taken in turn.
        self.selections: list[tuple[int, int | None, np.ndarray | None]] = []
        self.replay: list[tuple[int, int | None, np.ndarray | None]] = []
        # The filters' verdict on each batch of candidates, kept for `again()` like the
        # selections (the batches come again, the same, in the same order): its size, the
        # kept indexes and scores as arrays (12 bytes a candidate, not a list's 60) and the
        # rejections by reason.
        self.verdicts: list[tuple[int, np.ndarray, np.ndarray, Counter[str]]] = []
        self.replay_verdicts: Iterator[tuple[int, np.ndarray, np.ndarray, Counter[str]]] = iter(())

    def again(self) -> SourcePlan:
        """A plan of the same requests that takes this one's selections instead of reading
        the source to select again (call once this plan's requests were all taken)."""
        plan = SourcePlan.__new__(SourcePlan)
        plan.__dict__.update(self.__dict__)
        plan.keys, plan.replay, plan.selections = [], list(self.selections), []
        plan.replay_verdicts, plan.verdicts = iter(list(self.verdicts)), []
        first = ("records", "passages", "planned_before", "taken_down")  # the first pass's
        plan.counts = Counter({k: n for k, n in self.counts.items() if k in first})
        plan.rejected, plan.recipes, plan.licenses = Counter(), Counter(), Counter()
        return plan

    def _passages(
        self, checksum: Checksum | None = None, only: np.ndarray | None = None
    ) -> Iterator[tuple[int, SourceRecord, list[Passage], np.ndarray]]:
        """Each record's ordinal, the record, its passages and their keys, passages planned
        before left out (counted while `checksum` is summed: on the first pass). `only`:
        the sorted ordinals of the records to cut; the others are read and passed over."""
        g, name = self.cfg.grounding, self.source.name
        targets = iter(only.tolist() if only is not None else ())
        target = next(targets, None)
        ordinal = -1
        for batch in self.source.batches():
            for record in batch:
                ordinal += 1
                if checksum is not None:
                    checksum.update(record)
                if only is not None:  # (ordinals ascend, as `only` does)
                    if ordinal != target:
                        continue
                    target = next(targets, None)
                if self.taken_down and is_taken_down(self.taken_down, name, record.id):
                    if checksum is not None:
                        self.counts["taken_down"] += 1
                    continue
                passages = cut_passages(record.text, self.count, g.min_tokens, g.max_tokens)
                keys = np.fromiter(
                    (passage_key(name, record.id, p.start, p.end) for p in passages), np.uint64,
                    len(passages),
                )  # fmt: skip
                fresh = ~contains(self.before, keys)
                if checksum is not None:
                    self.counts["records"] += 1
                    self.counts["passages"] += len(passages)
                    self.counts["planned_before"] += len(passages) - int(fresh.sum())
                kept = [p for p, f in zip(passages, fresh, strict=True) if f]
                yield ordinal, record, kept, keys[fresh]

    def _select(self, above: int) -> tuple[int | None, np.ndarray | None]:
        """A selecting pass: the largest draw of the next `oversample` x (passages still
        wanted) draws above `above` (None: every one above it is a candidate), and the sorted
        ordinals of the records holding the draws up to it (None: every record). The first
        pass also sums the checksum and counts the source."""
        first = not self.checksum
        checksum = Checksum() if first else None
        heap: list[int] = []  # the smallest draws, negated (a max-heap)
        # draw -> ordinals of the records holding it, for every draw up to the heap's largest
        # (equal draws, one passage key in two records, all stay: the second pass takes them)
        where: dict[int, list[int]] = {}
        size = None
        if self.passages_wanted is not None:
            still = self.passages_wanted - len(self.keys)
            size = max(1, math.ceil(still * self.cfg.grounding.oversample))
        for ordinal, _, _, keys in self._passages(checksum):
            if size is None:
                continue
            for key in keys.tolist():
                draw = _draw(self.seed, key)
                if draw <= above:
                    continue
                if len(heap) < size:
                    heapq.heappush(heap, -draw)
                elif draw < -heap[0]:
                    largest = -heapq.heapreplace(heap, -draw)
                    if -heap[0] < largest:  # no draw of that value is left in the heap
                        del where[largest]
                elif draw > -heap[0]:
                    continue
                where.setdefault(draw, []).append(ordinal)
        if checksum is not None:
            self.checksum = checksum.hexdigest()
        if size is None or len(heap) < size:
            return None, None
        return -heap[0], np.unique(np.fromiter(itertools.chain(*where.values()), np.int64))

    def requests(self) -> Iterator[GenerationRequest]:
        """Rounds of a selecting pass then a planning pass (candidates through the filters,
        survivors into requests), each round over the next smallest draws, until the source
        has given its share or every fresh passage was a candidate."""
        if self.passages_wanted == 0:  # its share of a small plan rounded to nothing
            return
        maker = GroundedRequests(self.cfg, self.seed, self.source.name)
        above = -1
        for round_ in range(MAX_ROUNDS):
            if round_ < len(self.replay):  # the estimate's plan selected this round already
                recorded, limit, only = self.replay[round_]
                assert recorded == above, "a replayed plan took another course"
            else:
                limit, only = self._select(above)
            self.selections.append((above, limit, only))
            yield from self._plan_pass(above, limit, only, maker)
            if limit is None or self._done():
                return
            above = limit
        self.counts["rounds_exhausted"] = 1  # the filters rejected nearly every candidate

    def _plan_pass(
        self, above: int, limit: int | None, only: np.ndarray | None, maker: GroundedRequests
    ) -> Iterator[GenerationRequest]:
        pending: list[tuple[SourceRecord, Passage, int]] = []
        for _, record, passages, keys in self._passages(only=only):
            for passage, key in zip(passages, keys.tolist(), strict=True):
                draw = _draw(self.seed, key)
                if above < draw and (limit is None or draw <= limit):
                    pending.append((record, passage, key))
            if len(pending) >= GATE_BATCH:
                yield from self._gated(pending, maker)
                pending = []
                if self._done():
                    return
        yield from self._gated(pending, maker)

    def _done(self) -> bool:
        return self.passages_wanted is not None and len(self.keys) >= self.passages_wanted

    def _gated(
        self, pending: list[tuple[SourceRecord, Passage, int]], maker: GroundedRequests
    ) -> Iterator[GenerationRequest]:
        if not pending or self._done():
            return
        recorded = next(self.replay_verdicts, None)
        if recorded is None:
            verdict = self.gate.run([p.text for _, p, _ in pending])
        else:
            size, kept, scores, rejected = recorded
            assert size == len(pending), "a replayed plan took another course"
            verdict = GateResult(kept.tolist(), scores.tolist(), rejected)
        self.verdicts.append((len(pending), np.array(verdict.kept, np.int32),
                              np.array(verdict.scores, np.float64), verdict.rejected))  # fmt: skip
        self.counts["candidates"] += len(pending)
        self.rejected.update(verdict.rejected)
        for i, score in zip(verdict.kept, verdict.scores, strict=True):
            if self._done():
                return
            record, passage, key = pending[i]
            made = maker.for_passage(passage, score, self._provenance(record, passage),
                                     record.title)  # fmt: skip
            if not made:
                self.rejected["route:no_band"] += 1
                continue
            self.keys.append(key)
            self.recipes.update(r.recipe or "" for r in made)
            self.licenses[made[0].license or "unknown"] += 1
            yield from made

    def _provenance(self, record: SourceRecord, passage: Passage) -> Grounding:
        return Grounding(
            source_id=record.id,
            source_passage=passage.index,
            source_start=passage.start,
            source_end=passage.end,
            source_name=self.source.name,
            source_checksum=self.checksum,
            license=record.license or self.source.spec.license,
        )

    def account(self) -> dict[str, Any]:
        """The manifest's entry for this source (counts.plan.sources[name])."""
        return {
            "path": self.source.location,
            "checksum": self.checksum,
            "share": self.source.spec.share,
            "scorer": self.gate.scorer,
            **dict(self.counts),
            "planned": len(self.keys),
            "requests": sum(self.recipes.values()),
            "rejected": dict(self.rejected),
            "recipes": dict(self.recipes),
            "licenses": dict(self.licenses),
        }


def split_by_shares(total: int | None, shares: list[float]) -> list[int | None]:
    """`total` requests split by shares (largest remainders), or None each when unlimited."""
    if total is None:
        return [None] * len(shares)
    exact = [total * s / sum(shares) for s in shares]
    out = [math.floor(x) for x in exact]
    order = sorted(range(len(shares)), key=lambda i: out[i] - exact[i])
    for i in order[: total - sum(out)]:
        out[i] += 1
    return list[int | None](out)


class MixedPlan:
    """The first round: topic requests and each source's, interleaved by share."""

    def __init__(self, cfg: RunConfig, seeds: list[TopicSeed], seed: int) -> None:
        self.cfg, self.seeds, self.seed = cfg, seeds, seed
        sources = [Source(spec) for spec in cfg.sources]
        names = [s.name for s in sources]
        if len(set(names)) < len(names):
            raise ConfigError(f"sources: two sources are named alike ({names}); give each a `name`")
        shares = [s.spec.share for s in sources]
        if cfg.plans_topics:
            shares.append(cfg.grounding.topics_share)
        wanted = split_by_shares(cfg.plan.limit, shares)
        self.gate = SourceGate(cfg.filters, state_dir(cfg.output.dir))
        self.sources = [
            SourcePlan(s, cfg, seed, n, self.gate) for s, n in zip(sources, wanted, strict=False)
        ]
        self.fills: list[SourcePlan] = []  # the fill rounds' plans
        self.shares = shares
        self.topic_limit = wanted[-1] if cfg.plans_topics else 0

    def requests(self) -> Iterator[GenerationRequest]:
        streams: list[Iterator[GenerationRequest]] = [s.requests() for s in self.sources]
        if self.cfg.plans_topics and self.topic_limit != 0:
            plan = self.cfg.plan
            streams.append(plan_for(self.cfg, self.seeds, self.seed,
                                    samples_per_topic=plan.samples_per_topic,
                                    limit=self.topic_limit))  # fmt: skip
        return interleave(streams, self.shares[: len(streams)])

    def split_fill(
        self, need: int, kept: Mapping[str, int], planned: Mapping[str, int]
    ) -> tuple[int, dict[str, int]]:
        """A fill round's run-wide need split by shares: (documents the topics still owe,
        requests per source), each source asked over the rate its requests were kept at."""
        parts = split_by_shares(need, self.shares)
        asks = {}
        for plan, part in zip(self.sources, parts, strict=False):
            prefix = plan.source.name + " / "  # its documents' topic keys (GroundedRequests)
            k = sum(n for key, n in kept.items() if key.startswith(prefix))
            p = sum(n for key, n in planned.items() if key.startswith(prefix))
            rate = max(k / p if p else 1.0, MIN_KEEP_RATE)
            asks[plan.source.name] = math.ceil((part or 0) * self.cfg.fill.oversample / rate)
        return (parts[-1] or 0) if self.cfg.plans_topics else 0, asks

    def again(self) -> MixedPlan:
        """The same first round planned again without selecting again: what the run plans
        after its estimate planned it (call once this plan's requests were all taken)."""
        plan = MixedPlan.__new__(MixedPlan)
        plan.__dict__.update(self.__dict__)
        plan.sources = [s.again() for s in self.sources]
        plan.fills = []
        return plan

    def more(self, asks: Mapping[str, int]) -> Iterator[GenerationRequest]:
        """A fill round's grounded requests: further passages of each source, none this run
        planned before (call once the earlier rounds' requests are all taken)."""
        taken = np.unique(np.fromiter(self.keys(), np.uint64))
        plans = [
            SourcePlan(p.source, self.cfg, self.seed, asks[p.source.name], self.gate, taken)
            for p in self.sources
            if asks.get(p.source.name, 0) > 0
        ]
        self.fills += plans
        return interleave([p.requests() for p in plans], [p.source.spec.share for p in plans])

    def account(self) -> dict[str, Any]:
        """Each source's account, its fill rounds' added in."""
        out = {s.source.name: s.account() for s in self.sources}
        for plan in self.fills:
            _add(out[plan.source.name], plan.account())
        return out

    def keys(self) -> list[int]:
        return [k for s in [*self.sources, *self.fills] for k in s.keys]


def _add(total: dict[str, Any], more: dict[str, Any]) -> None:
    """A fill round's account added to a source's (numbers summed, counters merged)."""
    for key in ("candidates", "planned", "requests", "rounds_exhausted"):
        if key in more:
            total[key] = total.get(key, 0) + more[key]
    for key in ("rejected", "recipes", "licenses"):
        merged = Counter(total.get(key, {}))
        merged.update(more.get(key, {}))
        total[key] = dict(merged)


def interleave(streams: list[Iterator[GenerationRequest]], shares: list[float]) -> Iterator[
        GenerationRequest]:  # fmt: skip
    """Requests from each stream in turn, each stream as often as its share (the one furthest
    behind its share next), until all are spent."""
    taken = [0] * len(streams)
    live = list(range(len(streams)))
    while live:
        i = min(live, key=lambda k: ((taken[k] + 1) / shares[k], k))
        request = next(streams[i], None)
        if request is None:
            live.remove(i)
            continue
        taken[i] += 1
        yield request
