"""The topic tree grows night by night (`expansion.grow`): after a run is published, the leaves
whose documents fared best (most kept, and most kept of what was planned) are expanded by the
LLM, and their new children join the tree the next night plans from.

The grown tree lives in the output's state, `<out>/_state/topics.jsonl` (written atomically),
layered over the seed file: the seed file is never rewritten. Each grown node records the run
that added it (`added_by`). Researchers seed a subject once and the corpus widens by itself.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from booksmith.generation.coverage import topic_key
from booksmith.generation.seeds import SeedFileError
from booksmith.generation.topics import TopicNode
from booksmith.schemas import TopicSeed
from booksmith.shards.files import write_bytes_atomically
from booksmith.shards.version_dir import state_dir

GROWN = "topics.jsonl"


def grown_path(out: Path) -> Path:
    return state_dir(out) / GROWN


def load_grown(out: Path) -> list[tuple[TopicSeed, str]]:
    """The grown nodes (seed, the run that added it), oldest first; none before the first
    night that grew."""
    path = grown_path(out)
    if not path.is_file():
        return []
    nodes = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            added_by = str(row.pop("added_by"))
            nodes.append((TopicSeed.model_validate(row), added_by))
        except (ValueError, KeyError, TypeError) as e:
            raise SeedFileError(path, n, f"not a grown topic ({e}); remove the line") from None
    return nodes


def with_grown(seeds: list[TopicSeed], out: Path) -> list[TopicSeed]:
    """The seed file's topics and, after them, the tree grown so far (no topic twice)."""
    have = {topic_key(s.topic_path) for s in seeds}
    grown = [s for s, _ in load_grown(out) if topic_key(s.topic_path) not in have]
    return [*seeds, *grown]


def leaves_to_grow(
    seeds: Sequence[TopicSeed], kept: Counter[str], planned: Counter[str], n: int
) -> list[TopicSeed]:
    """The `n` leaves (topics with no child in the tree) whose documents fared best: most
    kept, then the larger share of what was planned, then the seed order. Leaves that kept
    nothing are not grown (nothing says they are worth more)."""
    parents = {topic_key(s.path) for s in seeds if s.path}
    leaves = [s for s in seeds if topic_key(s.topic_path) not in parents]

    def score(item: tuple[int, TopicSeed]) -> tuple[int, float, int]:
        i, s = item
        key = topic_key(s.topic_path)
        return (-kept[key], -kept[key] / max(1, planned[key]), i)

    ranked = [s for _, s in sorted(enumerate(leaves), key=score) if kept[topic_key(s.topic_path)]]
    return ranked[:n]


def as_node(seed: TopicSeed) -> TopicNode:
    return TopicNode(topic=seed.topic, path=list(seed.path), depth=len(seed.path))


def add_grown(
    out: Path, leaves: Sequence[TopicSeed], nodes: Sequence[TopicNode], run_id: str, limit: int
) -> list[TopicSeed]:
    """Append up to `limit` of the new nodes (the leaves' children) to the grown tree, marked
    by `run_id`, each with its leaf's subject; returns the seeds added."""
    subject = {topic_key(s.topic_path): s.subject or (s.path[0] if s.path else s.topic)
               for s in leaves}  # fmt: skip
    have = {topic_key(s.topic_path) for s, _ in load_grown(out)}
    rows: list[dict[str, object]] = []
    added: list[TopicSeed] = []
    for node in nodes:
        parent = topic_key(node.path)
        if parent not in subject or len(added) >= limit:
            continue  # the leaves themselves, or past the night's share
        seed = TopicSeed(topic=node.topic, subject=subject[parent], path=node.path)
        if topic_key(seed.topic_path) in have:
            continue
        have.add(topic_key(seed.topic_path))
        added.append(seed)
        rows.append({**seed.model_dump(exclude={"weight"}), "added_by": run_id})
    if rows:
        path = grown_path(out)
        old = path.read_bytes() if path.is_file() else b""
        new = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomically(path, old + new)
    return added
