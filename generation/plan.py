"""The plan stage: one GenerationRequest per (topic x sample), with audience, style, format,
seed words and the covered-units list sampled per request.

Deterministic from the run seed: the same seeds, config and seed give the same requests, in the
same order, with the same ids (and so the same plan.parquet, byte for byte). Axis values are
drawn by weight with a running quota (each value stays close to its share of the plan), and
formats also avoid repeating the same (audience, format) pair, so no combination dominates.
"""

from __future__ import annotations

import gc
import hashlib
import random
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from booksmith.generation.backends import model_name
from booksmith.generation.sorted_keys import Repeats
from booksmith.prompts import Axes, PromptLibrary, Splice, load_seed_words
from booksmith.prompts import _Axis as AxisValue
from booksmith.prompts.splice import shape
from booksmith.schemas import GenerationRequest, RequestBuilder, Sampling, TopicSeed
from booksmith.schemas.config import RunConfig


@dataclass
class QuotaSampler:
    """Weighted choice that tracks what it gave: picks the value furthest below its share."""

    values: Mapping[str, AxisValue]
    rng: random.Random
    counts: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        total = sum(v.weight for v in self.values.values())
        self.share = {k: v.weight / total for k, v in self.values.items()}
        self.names = list(self.share)
        self.n = 0

    def draw(
        self, allowed: Sequence[str] | None = None, penalty: Mapping[str, float] | None = None
    ) -> str:
        names = self.names if allowed is None else allowed
        assert names, "no axis value is allowed here"
        self.n += 1
        n, share, counts, jitter = self.n, self.share, self.counts, self.rng.random
        # Deficit against the expected count, minus a penalty for overused combinations, plus
        # jitter so that ties and the order of the values do not bias the draw. (A list and
        # index of the first maximum: the same draws as max(key=...), at a third of the cost.)
        if penalty:
            scores = [
                share[k] * n - counts[k] - penalty.get(k, 0.0) + jitter() * 0.5 for k in names
            ]
        else:
            scores = [share[k] * n - counts[k] + jitter() * 0.5 for k in names]
        name = names[scores.index(max(scores))]
        counts[name] += 1
        return name


class AxisDraws:
    """Audience, style and format for each request in turn: running quotas per axis, formats
    limited to those that apply to the topic's subject and steered away from (audience, format)
    pairs already drawn."""

    def __init__(self, axes: Axes, rng: random.Random) -> None:
        self.audiences = QuotaSampler(axes.audiences, rng)
        self.styles = QuotaSampler(axes.styles, rng)
        self.formats = QuotaSampler(axes.formats, rng)
        self.axes = axes
        self.pairs = {a: dict.fromkeys(axes.formats, 0) for a in axes.audiences}
        self.penalty = {a: dict.fromkeys(axes.formats, 0.0) for a in axes.audiences}
        self.formats_for: dict[str | None, list[str]] = {}

    def draw(self, subject: str | None) -> tuple[str, str, str]:
        audience, style = self.audiences.draw(), self.styles.draw()
        allowed = self.formats_for.get(subject)
        if allowed is None:
            allowed = [k for k, f in self.axes.formats.items() if f.applies_to(subject)]
            if not allowed:
                raise ValueError(f"no format in the axes applies to subject {subject!r}")
            self.formats_for[subject] = allowed
        fmt = self.formats.draw(allowed, self.penalty[audience])
        self.pairs[audience][fmt] += 1
        self.penalty[audience][fmt] = self.pairs[audience][fmt] * 0.5
        return audience, style, fmt


class PromptCache:
    """The prompt of each request: each template is rendered once per (audience, style,
    format, shape of the topic's values) and the topic, its path, the covered units and the
    seed words are spliced in (prompts.splice: the same text as rendering each request)."""

    def __init__(self, library: PromptLibrary) -> None:
        self.library = library
        axes = library.axes
        # Plain dicts render faster in the sandbox than models (no attribute safety checks).
        self.data = {
            kind: {k: v.model_dump() for k, v in values.items()}
            for kind, values in (
                ("audience", axes.audiences),
                ("style", axes.styles),
                ("format", axes.formats),
            )
        }
        self.splices: dict[tuple[Any, ...], Splice | None] = {}

    def prompt(
        self, template: str, audience: str, style: str, fmt: str, values: dict[str, Any]
    ) -> str:
        """`values`: topic, subject, path, covered and seed_words."""
        key = (template, audience, style, fmt, shape(values))
        if key not in self.splices:
            self.splices[key] = self.library.splice(template, **self._axes(key), **values)
        splice = self.splices[key]
        if splice is None:  # the template cannot be spliced: render every time
            return self.library.render(template, **self._axes(key), **values)
        return splice.fill(values)

    def _axes(self, key: tuple[Any, ...]) -> dict[str, Any]:
        _, audience, style, fmt, _ = key
        return {
            "audience": self.data["audience"][audience],
            "style": self.data["style"][style],
            "format": self.data["format"][fmt],
        }


def prompt_key(prompt: str) -> int:
    """A 64-bit key of a prompt, for numbering its repeats in a plan (generation/sorted_keys.
    Repeats)."""
    return int.from_bytes(hashlib.blake2b(prompt.encode("utf-8"), digest_size=8).digest(), "little")


@contextmanager
def _gc_paused() -> Iterator[None]:
    """The plan allocates millions of small objects and no reference cycles: the cyclic
    collector would walk them again and again for nothing (40% of planning time at 200k)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def build_plan(
    seeds: Sequence[TopicSeed], library: PromptLibrary, **kw: Any
) -> list[GenerationRequest]:
    """The whole plan as a list (`iter_plan` for the stream a run consumes chunk by chunk)."""
    with _gc_paused():
        return list(iter_plan(seeds, library, **kw))


def iter_plan(
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
) -> Iterator[GenerationRequest]:
    """The plan's requests in order, made one at a time: a million-request plan never sits in
    memory as a list (only its slot indexes and a 16-byte key per distinct prompt do).
    `salt` varies the draws for one seed (fill rounds plan again with the run's seed)."""
    rng = random.Random(f"booksmith-plan-{seed}{salt}")
    # Slots first (topic x sample, weighted), then the limit, then the axes: so the quotas hold
    # over the requests the run actually makes.
    slots = [
        i for i, t in enumerate(seeds) for _ in range(max(1, round(samples_per_topic * t.weight)))
    ]
    if limit is not None and limit < len(slots):
        slots = stratified_sample(seeds, slots, limit, rng)
    words = list(vocabulary) if vocabulary is not None else load_seed_words()
    draws = AxisDraws(library.axes, rng)
    builder = RequestBuilder(model=model, sampling=sampling, system_prompt=system_prompt)
    prompts = PromptCache(library)
    covered = _covered_units(seeds, covered_units)
    topic_values = [
        {"topic": s.topic, "subject": s.subject, "path": s.path, "covered": covered.get(i, [])}
        for i, s in enumerate(seeds)
    ]
    topic_paths = [s.topic_path for s in seeds]
    # Repeats of one prompt differ by sample index: count them by a 64-bit key of the prompt,
    # not the prompt itself (which would keep every prompt of the plan alive).
    repeats = Repeats()
    for index in slots:
        topic = seeds[index]
        audience, style, fmt = draws.draw(topic.subject)
        chosen_words = rng.sample(words, seed_words) if seed_words else []
        template = library.axes.formats[fmt].template
        values = {**topic_values[index], "seed_words": chosen_words}
        prompt = prompts.prompt(template, audience, style, fmt, values)
        # Repeats of one prompt differ by sample index, and so by id and seed.
        sample_index = repeats.next(prompt_key(prompt))
        yield builder.build(
            prompt,
            sample_index,
            topic=topic.topic,
            topic_path=topic_paths[index],
            subject=topic.subject,
            audience=audience,
            style=style,
            format=fmt,
            seed_words=chosen_words,
            template=template,
        )


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


def plan_for(
    cfg: RunConfig, seeds: Sequence[TopicSeed], seed: int, **kw: Any
) -> Iterator[GenerationRequest]:
    """The requests for these topics under a run config, as a stream (`booksmith run` and
    `booksmith plan` both plan through this)."""
    return iter_plan(
        seeds,
        PromptLibrary(cfg.plan.axes, cfg.plan.templates),
        model=model_name(cfg.generation),
        sampling=cfg.generation.sampling,
        seed=seed,
        seed_words=cfg.plan.seed_words,
        covered_units=cfg.plan.covered_units,
        system_prompt=cfg.plan.system_prompt,
        **kw,
    )
