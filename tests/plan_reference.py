"""The plan's requests made the plain, slow way: each prompt rendered by Jinja and each request
built by GenerationRequest.build. The reference the spliced plan must equal (tests, benchmark)."""

from __future__ import annotations

from collections.abc import Sequence

from booksmith.generation.plan import _covered_units
from booksmith.prompts import PromptLibrary
from booksmith.schemas import GenerationRequest, Message, Sampling, TopicSeed


def rebuild_plainly(
    planned: Sequence[GenerationRequest],
    seeds: Sequence[TopicSeed],
    library: PromptLibrary,
    *,
    model: str,
    sampling: Sampling,
    covered_units: int = 6,
    system_prompt: str | None = None,
) -> list[GenerationRequest]:
    """Each planned request again from its topic, axes and seed words, in plan order."""
    covered = _covered_units(seeds, covered_units)
    index = {s.topic: i for i, s in enumerate(seeds)}
    axes = library.axes
    system = [Message(role="system", content=system_prompt)] if system_prompt else []
    seen: dict[str, int] = {}
    rebuilt = []
    for request in planned:
        i = index[request.topic]
        topic = seeds[i]
        prompt = library.render(
            request.template,
            topic=topic.topic,
            path=topic.path,
            subject=topic.subject,
            audience=axes.audiences[request.audience].model_dump(),
            style=axes.styles[request.style].model_dump(),
            format=axes.formats[request.format].model_dump(),
            seed_words=request.seed_words,
            covered=covered.get(i, []),
        )
        sample_index = seen[prompt] = seen.get(prompt, -1) + 1
        rebuilt.append(
            GenerationRequest.build(
                messages=[*system, Message(role="user", content=prompt)],
                model=model,
                sampling=sampling,
                sample_index=sample_index,
                topic=topic.topic,
                topic_path=topic.topic_path,
                subject=topic.subject,
                audience=request.audience,
                style=request.style,
                format=request.format,
                seed_words=request.seed_words,
                template=request.template,
            )
        )
    return rebuilt
