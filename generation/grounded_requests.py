"""The requests for one source passage: its recipes by quality band (grounding.routes), the
prompt axes a recipe declares drawn as for topic requests (running quotas, from the run seed),
and the provenance columns every grounded request carries (schemas.records.Grounding). A request
asks for at least its recipe's output minimum (prompts/recipes.yaml `min_tokens`, else
filters.artifacts.min_tokens): a cap under it would leave every answer too short or cut."""

from __future__ import annotations

import random
from typing import Any

from booksmith.generation.backends import model_name
from booksmith.generation.passages import Passage
from booksmith.generation.plan import AxisDraws, prompt_key
from booksmith.generation.sorted_keys import Repeats
from booksmith.prompts import PromptLibrary
from booksmith.prompts.recipes import RecipeLibrary
from booksmith.schemas import GenerationRequest, RequestBuilder
from booksmith.schemas.config import RunConfig
from booksmith.schemas.records import Grounding


class GroundedRequests:
    """Made once per source and run; `for_passage` is called in the plan's order."""

    def __init__(self, cfg: RunConfig, seed: int, source: str) -> None:
        axes = PromptLibrary(cfg.plan.axes, cfg.plan.templates).axes
        self.recipes = RecipeLibrary(axes)
        self.recipes.check_names(
            [r for route in cfg.grounding.routes for r in route.recipes], "grounding.routes"
        )
        self.grounding = cfg.grounding
        self.source = source
        self.builder = RequestBuilder(
            model=model_name(cfg.generation),
            sampling=cfg.generation.sampling,
            system_prompt=cfg.plan.system_prompt,
        )
        self.builders: dict[str, RequestBuilder] = {}  # recipe -> the builder of its requests
        for name, recipe in self.recipes.recipes.items():
            floor = recipe.min_tokens
            if floor is None:
                floor = cfg.filters.artifacts.min_tokens
            sampling = cfg.generation.sampling
            if cfg.filters.artifacts.enabled and sampling.max_tokens < floor:
                self.builders[name] = RequestBuilder(
                    model=model_name(cfg.generation),
                    sampling=sampling.model_copy(update={"max_tokens": floor}),
                    system_prompt=cfg.plan.system_prompt,
                )
        self.rng = random.Random(f"booksmith-grounded-{seed}-{source}")
        self.draws = AxisDraws(axes, self.rng)
        self.axis_data = {
            "audience": {k: v.model_dump() for k, v in axes.audiences.items()},
            "style": {k: v.model_dump() for k, v in axes.styles.items()},
            "format": {k: v.model_dump() for k, v in axes.formats.items()},
        }
        self.repeats = Repeats()  # each prompt's sample index (its repeats are numbered)

    def for_passage(
        self, passage: Passage, score: float, provenance: Grounding, title: str | None
    ) -> list[GenerationRequest]:
        """One request per recipe drawn from the passage's band (none when no band holds
        its score)."""
        band = self.grounding.recipes_for(score)
        k = min(self.grounding.recipes_per_passage, len(band))
        picked = sorted(self.rng.sample(band, k), key=band.index) if k < len(band) else band
        return [self._request(name, passage, provenance, title) for name in picked]

    def _request(
        self, name: str, passage: Passage, provenance: Grounding, title: str | None
    ) -> GenerationRequest:
        recipe = self.recipes.recipes[name]
        audience, style, fmt = self.draws.draw(None)
        chosen = {"audience": audience, "style": style, "format": fmt}
        used = {axis: chosen[axis] for axis in recipe.axes}
        values: dict[str, Any] = {"passage": passage.text, "title": title or ""}
        values.update({axis: self.axis_data[axis][value] for axis, value in used.items()})
        prompt = self.recipes.render(name, **values)
        index = self.repeats.next(prompt_key(prompt))
        label = title or provenance.source_id or ""
        return self.builders.get(name, self.builder).build(
            prompt,
            index,
            topic=label,
            topic_path=[self.source, label],
            audience=used.get("audience", ""),
            style=used.get("style", ""),
            format=used.get("format", ""),
            template=recipe.template,
            **provenance.model_copy(
                update={"recipe": name, "template_version": self.recipes.versions[name]}
            ).model_dump(),
        )
