"""Which topics a run takes, and how much each still needs: the nightly rotation and fill targets.

Coverage is read from the dataset versions already written (the `topic_path` column of their
text shards), so it needs no state of its own and follows deletions and takedowns.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import pyarrow.parquet as pq

from booksmith.schemas import Document, TopicSeed
from booksmith.schemas.config import FillSettings, PlanSettings
from booksmith.shards.version_dir import list_versions, read_manifest


def topic_key(path: Sequence[str]) -> str:
    return " / ".join(path)


def coverage(out: Path) -> Counter[str]:
    """Kept documents per topic path over every dataset version under `out`."""
    counts: Counter[str] = Counter()
    for version in list_versions(out):
        for rel in read_manifest(version).shard_paths("text"):
            column = pq.read_table(version / rel, columns=["topic_path"])
            counts.update(topic_key(p) for p in column.column(0).to_pylist())
    return counts


def select_topics(
    seeds: Sequence[TopicSeed], plan: PlanSettings, out: Path
) -> tuple[list[TopicSeed], dict[str, object]]:
    """The run's topics and an account of the choice (for the manifest)."""
    n = plan.topics_per_run
    if n is None or n >= len(seeds):
        return list(seeds), {"rotation": None, "topics": len(seeds)}
    if plan.rotation == "window":
        # The window moves by n per written version, wrapping around the topic list.
        start = (len(list_versions(out)) * n) % len(seeds)
        picked = [seeds[(start + i) % len(seeds)] for i in range(n)]
        return picked, {"rotation": "window", "start": start, "topics": n}
    have = coverage(out)
    # Least covered first; ties keep the seed file's order (a stable sort).
    order = sorted(range(len(seeds)), key=lambda i: have[topic_key(seeds[i].topic_path)])
    picked = [seeds[i] for i in sorted(order[:n])]
    uncovered = sum(1 for s in seeds if not have[topic_key(s.topic_path)])
    return picked, {"rotation": "uncovered", "topics": n, "uncovered_before": uncovered}


def deficit(
    fill: FillSettings, kept: Sequence[Document], topics: Sequence[TopicSeed]
) -> dict[str, int]:
    """Documents still wanted, per topic key ("*" for run-wide targets); empty when met."""
    per_topic = Counter(topic_key(d.topic_path) for d in kept)
    return deficit_of(fill, per_topic, len(kept), sum(d.n_tokens for d in kept), topics)


def deficit_of(
    fill: FillSettings,
    per_topic: Mapping[str, int],
    documents: int,
    tokens: int,
    topics: Sequence[TopicSeed],
) -> dict[str, int]:
    """`deficit` from counts of what is kept (a streaming run holds no documents)."""
    need: dict[str, int] = {}
    if fill.documents_per_topic:
        for t in topics:
            missing = fill.documents_per_topic - per_topic.get(topic_key(t.topic_path), 0)
            if missing > 0:
                need[topic_key(t.topic_path)] = missing
    run_wide = 0
    if fill.documents:
        run_wide = max(run_wide, fill.documents - documents)
    if fill.tokens and tokens < fill.tokens:
        mean = tokens / documents if documents else 0
        run_wide = max(run_wide, math.ceil((fill.tokens - tokens) / mean) if mean else 1)
    if run_wide > sum(need.values()):
        need["*"] = run_wide - sum(need.values())
    return need


def seeds_for(
    need: dict[str, int],
    topics: Sequence[TopicSeed],
    oversample: float,
    kept: Mapping[str, int],
    planned: Mapping[str, int],
) -> list[tuple[TopicSeed, int]]:
    """(topic, requests) for the next round. A topic's own need (`documents_per_topic`) is
    asked over the rate its subject's requests have been kept at so far. The run-wide need
    ("*") keeps the subjects balanced: the target is the first round's, an equal share of the
    kept total per subject (as the stratified sample plans), so each subject asks for what
    it lacks of that share, over its own keep rate (a subject whose documents the filters
    reject more gets more requests), spread over its topics least-planned first. `kept` and
    `planned` count documents and requests so far by topic key."""
    by_key = {topic_key(t.topic_path): t for t in topics}
    subjects: dict[str, list[str]] = {}
    for key, t in by_key.items():
        subjects.setdefault(_subject(t), []).append(key)

    def rate(subject: str) -> float:
        k = sum(kept.get(key, 0) for key in subjects[subject])
        p = sum(planned.get(key, 0) for key in subjects[subject])
        if not p:  # nothing asked yet: the run's rate
            k, p = sum(kept.values()), sum(planned.values())
        return max(k / p if p else 1.0, MIN_KEEP_RATE)

    out: Counter[str] = Counter()
    for key, n in need.items():
        if key != "*" and key in by_key:
            out[key] += math.ceil(n * oversample / rate(_subject(by_key[key])))
    if "*" in need and subjects:
        target = (sum(kept.values()) + need["*"]) / len(subjects)
        for subject, keys in subjects.items():
            short = target - sum(kept.get(key, 0) for key in keys)
            if short <= 0:
                continue
            asks = math.ceil(short * oversample / rate(subject))
            # least planned first, then the seed file's order: a subject's topics take turns
            order = sorted(keys, key=lambda k: planned.get(k, 0) + out[k])
            for i in range(asks):
                out[order[i % len(order)]] += 1
    return [(by_key[k], n) for k, n in out.items() if n > 0]


MIN_KEEP_RATE = 0.05  # a subject that kept nothing yet is asked 1/0.05 = 20 times its need


def _subject(t: TopicSeed) -> str:
    """A topic's subject, as the stratified sample groups it (plan.stratified_sample)."""
    return t.subject or (t.path[0] if t.path else "")
