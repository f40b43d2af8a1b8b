"""The quality classifier's loop: judge a sample of a version with the LLM judge, train the
fastText classifier on the judgements, and say when the nightly flow should do it again
(`filters.quality.retrain_every_days`). Plain functions: `booksmith quality annotate|train`
and the nightly flow both call them.
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from booksmith.schemas.config import GenerationSettings, RunConfig, load_config
from booksmith.schemas.filter_settings import FilterSettings

ANNOTATIONS = Path("quality") / "annotations.parquet"
MODEL_DIR = Path("quality")


def settings_of(config: Path | RunConfig | None) -> tuple[RunConfig, FilterSettings]:
    """(RunConfig, FilterSettings): the config and its `filters:` section."""
    cfg = config if isinstance(config, RunConfig) else load_config(config)
    return cfg, cfg.filters


def _state_for(path: Path, default_out: Path) -> Path:
    """`<out>/_state` of a dataset version (its parent's), else the configured output's."""
    from booksmith.shards.version_dir import is_dataset, state_dir

    if path.is_dir() and is_dataset(path):
        return state_dir(path.parent)
    return state_dir(default_out)


def judge_settings(cfg: RunConfig) -> GenerationSettings:
    """The generation settings the judge runs on: `filters.annotate`'s endpoint when set."""
    a = cfg.filters.annotate
    if a.base_url is None:
        return cfg.generation
    return endpoint_of(cfg, a.base_url, a.model, a.api_key_env)


def endpoint_of(
    cfg: RunConfig, base_url: str, model: str | None, api_key_env: str | None
) -> GenerationSettings:
    """The run's generation settings pointed at another OpenAI-compatible endpoint (a judge's
    own): its model and key variable where given, the run's otherwise."""
    return cfg.generation.model_copy(
        update={
            "backend": "openai",
            "base_url": base_url,
            "model": model or cfg.generation.model,
            "api_key_env": api_key_env or cfg.generation.api_key_env,
            "endpoints": [],
        }
    )


def run_annotate(
    dataset: Path,
    config: Path | RunConfig | None = None,
    *,
    sample: int | None = None,
    annotations: Path | None = None,
    max_tokens: int | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Judge a sample of a dataset's documents; merge into the annotations file.
    Returns (annotations file, summary)."""
    from booksmith.filters.annotate import annotate, save_annotations
    from booksmith.filters.annotate import sample as take_sample
    from booksmith.filters.inputs import read_documents
    from booksmith.generation.backends import open_endpoint
    from booksmith.generation.cache import ResponseCache

    cfg, fs = settings_of(config)
    docs = read_documents(dataset, cfg.output.encoding)
    docs = [d for d in docs if d.text.strip()]
    chosen = take_sample(docs, sample or fs.annotate.sample, fs.annotate.seed)
    state = _state_for(dataset, cfg.output.dir)
    target = annotations or state / ANNOTATIONS
    cache = ResponseCache(state / "responses.sqlite")
    try:
        with open_endpoint(judge_settings(cfg), cfg.embedded) as endpoint:
            judged, report = annotate(
                chosen,
                endpoint,
                cache=cache,
                budget=cfg.generation.budget,
                max_tokens=max_tokens or fs.annotate.max_tokens,
                max_chars=fs.annotate.max_chars,
                structured=fs.annotate.structured_output,
            )
    finally:
        cache.close()
    total = save_annotations(target, judged)
    summary = {
        "documents": len(docs),
        "judged": len(judged),
        "scored": sum(a.score is not None for a in judged),
        "errors": dict(Counter(a.error for a in judged if a.error)),
        "scores": dict(sorted(Counter(a.score for a in judged if a.score is not None).items())),
        "from_cache": report.cached,
        "annotations_total": total,
        "judge": judged[0].judge if judged else "",
    }
    return target, summary


def run_train(
    config: Path | RunConfig | None = None,
    *,
    annotations: Path | None = None,
    model_dir: Path | None = None,
) -> Any:
    """Train the classifier on judged documents; returns the TrainReport."""
    import pyarrow.parquet as pq

    from booksmith.filters.annotate import RUBRIC
    from booksmith.filters.quality import train
    from booksmith.filters.records_io import read_labelled
    from booksmith.shards.version_dir import state_dir

    cfg, fs = settings_of(config)
    state = state_dir(cfg.output.dir)
    source = annotations or state / ANNOTATIONS
    data, _ = read_labelled(source)
    judge = ""
    if source.suffix == ".parquet" and "judge" in pq.read_schema(source).names:
        judges = sorted({j for j in pq.read_table(source, columns=["judge"])["judge"].to_pylist()})
        judge = ", ".join(j for j in judges if j)
    return train(
        data,
        model_dir or state / MODEL_DIR,
        fs.quality,
        source=str(source),
        judge=judge,
        rubric=RUBRIC if judge else "",
    )


def retrain_due(model_dir: Path, every_days: int | None, now: datetime | None = None) -> bool:
    """Whether the nightly flow should re-annotate and retrain (never when unscheduled)."""
    from booksmith.filters.quality import MODEL_FILE, card_path

    if every_days is None:
        return False
    card = card_path(model_dir / MODEL_FILE)
    if not card.is_file():
        return True
    try:
        created = datetime.fromisoformat(json.loads(card.read_text())["model"]["created_at"])
    except (ValueError, KeyError, TypeError):
        return True
    return (now or datetime.now(UTC)) - created >= timedelta(days=every_days)
