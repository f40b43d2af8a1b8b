"""The quality part of the filter chain, in order: cheap rules first, models last.

empty -> language id -> generation artifacts -> Gopher quality -> Gopher repetition -> lines
(C4/FineWeb) -> faithfulness (grounded documents against their passage) -> decontamination
(when benchmarks are configured) -> quality classifier (when a model is configured or
trained). Exact and MinHash dedup are added around it by the dedup stage.
Language id comes first, as in datatrove's pipelines: the English rules (stop words, line
shapes) would otherwise reject a French text for its French, and the language counts would
miss it.
"""

from __future__ import annotations

from pathlib import Path

from booksmith.filters.base import Filter
from booksmith.filters.decontam import BenchmarkIndex, DecontamFilter, build_index
from booksmith.filters.empty import EmptyFilter
from booksmith.filters.faithfulness import FaithfulnessFilter
from booksmith.filters.generation_artifacts import GenerationArtifactFilter
from booksmith.filters.gopher_quality import GopherQualityFilter
from booksmith.filters.gopher_repetition import GopherRepetitionFilter
from booksmith.filters.langid import LangIdFilter
from booksmith.filters.lines import LineFilter
from booksmith.filters.quality import MODEL_FILE, QualityFilter
from booksmith.schemas.filter_settings import FilterError, FilterSettings


def quality_model_path(settings: FilterSettings, state: Path | None) -> Path | None:
    """The configured model, else the one `booksmith quality train` left in `state`, else None."""
    if settings.quality.model_path is not None:
        return settings.quality.model_path
    if state is not None and (state / "quality" / MODEL_FILE).is_file():
        return state / "quality" / MODEL_FILE
    return None


def build_chain(
    settings: FilterSettings | None = None,
    *,
    state: Path | None = None,
    index: BenchmarkIndex | None = None,
) -> list[Filter]:
    """The filters `settings` ask for. `state` is `<out>/_state` (for a trained quality model);
    `index` a prebuilt benchmark index (else built from `settings.decontam.benchmarks`).

    Raises FilterError for a missing or corrupt model, or a bad benchmark file."""
    s = settings or FilterSettings()
    chain: list[Filter] = [EmptyFilter()]
    if s.langid.enabled:
        chain.append(LangIdFilter(s.langid))
    if s.artifacts.enabled:
        chain.append(GenerationArtifactFilter(s.artifacts))
    if s.gopher_quality.enabled:
        chain.append(GopherQualityFilter(s.gopher_quality))
    if s.gopher_repetition.enabled:
        chain.append(GopherRepetitionFilter(s.gopher_repetition))
    if s.lines.enabled:
        chain.append(LineFilter(s.lines))
    if s.faithfulness.enabled:  # grounded documents only; others pass untouched
        chain.append(FaithfulnessFilter(s.faithfulness))
    if index is None and s.decontam.benchmarks:
        index = build_index(s.decontam)
    if index is not None:
        if not len(index):
            raise FilterError(
                f"decontamination: no benchmark item of {s.decontam.min_item_words}+ words in "
                f"{', '.join(s.decontam.benchmarks) or 'the index'}"
            )
        chain.append(DecontamFilter(index))
    model = quality_model_path(s, state)
    if model is not None:
        chain.append(QualityFilter.from_settings(s.quality, model))
    return chain
