"""The plan stage: one GenerationRequest per (topic x sample), with audience, style, format,
seed words and the covered-units list sampled per request.

Deterministic from the run seed: the same seeds, config and seed give the same requests, in the
same order, with the same ids (and so the same plan.parquet, byte for byte). Axis values are
drawn by weight with a running quota (each value stays close to its share of the plan), and
formats also avoid repeating the same (audience, format) pair, so no combination dominates.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from prompts import PromptLibrary, load_seed_words
from prompts import _Axis as AxisValue
from schemas import GenerationRequest, Message, Sampling, TopicSeed


@dataclass
class QuotaSampler:
    """Weighted choice that tracks what it gave: picks the value furthest below its share."""

    values: Mapping[str, AxisValue]
    rng: random.Random
    counts: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        total = sum(v.weight for v in self.values.values())
        self.share = {k: v.weight / total for k, v in self.values.items()}
        self.n = 0

    def draw(
        self, allowed: Iterable[str] | None = None, penalty: Mapping[str, float] | None = None
    ) -> str:
        names = list(allowed) if allowed is not None else list(self.share)
        assert names, "no axis value is allowed here"
        self.n += 1
        penalty = penalty or {}
        # Deficit against the expected count, minus a penalty for overused combinations, plus
        # jitter so that ties and the order of the values do not bias the draw.
        name = max(
            names,
            key=lambda k: (
                self.share[k] * self.n
                - self.counts[k]
                - penalty.get(k, 0.0)
                + self.rng.random() * 0.5
            ),
        )
        self.counts[name] += 1
        return name


def build_plan(
    seeds: Sequence[TopicSeed],
    library: PromptLibrary,
    *,
    model: str,
    sampling: Sampling,
    seed: int,
    samples_per_topic: int = 1,
    limit: int | None = None,
    seed_words: int = 3,
    covered_units: int = 6,
    system_prompt: str | None = None,
    vocabulary: Sequence[str] | None = None,
    salt: str = "",
) -> list[GenerationRequest]:
    """`salt` varies the draws for one seed (fill rounds plan again with the run's seed)."""
    rng = random.Random(f"booksmith-plan-{seed}{salt}")
    covered = _covered_units(seeds, covered_units)
    # Slots first (topic x sample, weighted), then the limit, then the axes: so the quotas hold
    # over the requests the run actually makes.
    slots = [
        i for i, t in enumerate(seeds) for _ in range(max(1, round(samples_per_topic * t.weight)))
    ]
    if limit is not None and limit < len(slots):
        slots = stratified_sample(seeds, slots, limit, rng)
    words = list(vocabulary) if vocabulary is not None else load_seed_words()
    axes = library.axes
    # Plain dicts render faster in the sandbox than models (no attribute safety checks).
    as_data = {
        kind: {k: v.model_dump() for k, v in values.items()}
        for kind, values in (
            ("audience", axes.audiences),
            ("style", axes.styles),
            ("format", axes.formats),
        )
    }
    audiences = QuotaSampler(axes.audiences, rng)
    styles = QuotaSampler(axes.styles, rng)
    formats = QuotaSampler(axes.formats, rng)
    pairs: Counter[tuple[str, str]] = Counter()
    formats_for: dict[str | None, list[str]] = {}
    seen_prompts: Counter[str] = Counter()
    plan: list[GenerationRequest] = []
    for index in slots:
        topic = seeds[index]
        audience, style = audiences.draw(), styles.draw()
        if topic.subject not in formats_for:
            allowed = [k for k, f in axes.formats.items() if f.applies_to(topic.subject)]
            if not allowed:
                raise ValueError(f"no format in the axes applies to subject {topic.subject!r}")
            formats_for[topic.subject] = allowed
        fmt = formats.draw(
            formats_for[topic.subject], {k: pairs[(audience, k)] * 0.5 for k in axes.formats}
        )
        pairs[(audience, fmt)] += 1
        chosen_words = rng.sample(words, seed_words) if seed_words else []
        format_value = axes.formats[fmt]
        prompt = library.render(
            format_value.template,
            topic=topic.topic,
            path=topic.path,
            subject=topic.subject,
            audience=as_data["audience"][audience],
            style=as_data["style"][style],
            format=as_data["format"][fmt],
            seed_words=chosen_words,
            covered=covered.get(index, []),
        )
        messages = [Message(role="user", content=prompt)]
        if system_prompt:
            messages.insert(0, Message(role="system", content=system_prompt))
        sample_index = seen_prompts[prompt]  # repeats of one prompt differ by index and seed
        seen_prompts[prompt] += 1
        plan.append(
            GenerationRequest.build(
                messages=messages,
                model=model,
                sampling=sampling,
                sample_index=sample_index,
                topic=topic.topic,
                topic_path=topic.topic_path,
                subject=topic.subject,
                audience=audience,
                style=style,
                format=fmt,
                seed_words=chosen_words,
                template=format_value.template,
            )
        )
    return plan


def _covered_units(seeds: Sequence[TopicSeed], n: int) -> dict[int, list[str]]:
    """For each topic, up to n earlier topics under the same parent: the units already covered,
    so sections written for siblings do not repeat each other."""
    if n <= 0:
        return {}
    by_parent: dict[tuple[str, ...], list[str]] = defaultdict(list)
    out: dict[int, list[str]] = {}
    for i, s in enumerate(seeds):
        siblings = by_parent[tuple(s.path)]
        if s.path:
            out[i] = siblings[-n:]
        siblings.append(s.topic)
    return out


def stratified_sample(
    seeds: Sequence[TopicSeed], slots: Sequence[int], n: int, rng: random.Random
) -> list[int]:
    """Take n slots (indexes into seeds) spread evenly over subjects (round-robin over
    shuffled groups)."""
    groups: dict[str, list[int]] = defaultdict(list)
    for slot in slots:
        seed = seeds[slot]
        groups[seed.subject or (seed.path[0] if seed.path else "")].append(slot)
    order = sorted(groups)
    rng.shuffle(order)
    for key in order:
        rng.shuffle(groups[key])
    picked: list[int] = []
    while len(picked) < n:
        for key in order:
            if groups[key] and len(picked) < n:
                picked.append(groups[key].pop())
    return picked
