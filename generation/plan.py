"""The plan stage: one GenerationRequest per (topic x sampled audience, style, format x sample).

Deterministic from the run seed: the same seeds, config and seed give the same requests, in the
same order, with the same ids. Axis values are drawn by weight with a running quota, so every
value appears in proportion to its weight and no combination dominates a small plan.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from prompts import AxisValue, PromptLibrary
from schemas import GenerationRequest, Message, Sampling, TopicSeed


@dataclass
class QuotaSampler:
    """Weighted choice that tracks what it gave: picks the value furthest below its share."""

    values: dict[str, AxisValue]
    rng: random.Random

    def __post_init__(self) -> None:
        total = sum(v.weight for v in self.values.values())
        self.share = {k: v.weight / total for k, v in self.values.items()}
        self.counts: Counter[str] = Counter()
        self.n = 0

    def draw(self) -> str:
        self.n += 1
        # Deficit against the expected count, plus jitter so ties and order do not bias.
        name = max(
            self.share,
            key=lambda k: self.share[k] * self.n - self.counts[k] + self.rng.random() * 0.5,
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
    template: str = "textbook",
    system_prompt: str | None = None,
    limit: int | None = None,
) -> list[GenerationRequest]:
    rng = random.Random(f"booksmith-plan-{seed}")
    # Slots first (topic x sample, weighted), then the limit, then the axes: so the quotas hold
    # over the requests the run actually makes.
    slots = [t for t in seeds for _ in range(max(1, round(samples_per_topic * t.weight)))]
    if limit is not None and limit < len(slots):
        slots = stratified_sample(slots, limit, rng)
    axes = library.axes
    audiences = QuotaSampler(axes.audiences, rng)
    styles = QuotaSampler(axes.styles, rng)
    formats = QuotaSampler(axes.formats, rng)
    seen_prompts: Counter[str] = Counter()
    plan: list[GenerationRequest] = []
    for topic in slots:
        audience, style, fmt = audiences.draw(), styles.draw(), formats.draw()
        prompt = library.render(
            template,
            topic=topic.topic,
            path=topic.path,
            audience=axes.audiences[audience],
            style=axes.styles[style],
            format=axes.formats[fmt],
            seed_words=[],
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
                seed_words=[],
                template=template,
            )
        )
    return plan


def stratified_sample(slots: Sequence[TopicSeed], n: int, rng: random.Random) -> list[TopicSeed]:
    """Take n slots spread evenly over subjects (round-robin over shuffled groups)."""
    groups: dict[str, list[TopicSeed]] = defaultdict(list)
    for slot in slots:
        groups[slot.subject or (slot.path[0] if slot.path else "")].append(slot)
    order = sorted(groups)
    rng.shuffle(order)
    for key in order:
        rng.shuffle(groups[key])
    picked: list[TopicSeed] = []
    while len(picked) < n:
        for key in order:
            if groups[key] and len(picked) < n:
                picked.append(groups[key].pop())
    return picked
