"""The run configuration: one YAML file, validated by pydantic, every option defaulted.

`booksmith run` with no config works on the embedded defaults. Errors name the file, the key
(dotted path), its line in the YAML file, and what was expected.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from booksmith.schemas.dedup_settings import DedupSettings
from booksmith.schemas.filter_settings import FilterSettings
from booksmith.schemas.grounding_settings import GroundingSettings, SourceSpec
from booksmith.schemas.records import Sampling, canonical_json


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file, key and expectation."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# The name of an environment variable, never its value: a key pasted here by mistake fails
# validation (and the error does not echo it, see looks_secret) instead of reaching manifests.
ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
EnvVarName = Annotated[str, Field(pattern=ENV_NAME, max_length=128)]
# A key is secret by what it holds: a setting named for a credential (its last part), or a
# value that looks like one (a provider's key prefix, or a long run of letters and digits).
# `generation.sampling.max_tokens` holds a number, so its bad value is shown.
SECRET_KEYS = re.compile(r"(^|_)(api_key|api_key_env|api_key_secret|secret|password|token)$")
SECRET_VALUE = re.compile(
    r"^(sk-|sk_|ghp_|gho_|xox[bp]-|AKIA|hf_)"  # providers' key prefixes
    r"|^(?=.*\d)(?=.*[A-Za-z])[\w-]{32,}$"  # a long token of letters and digits
)


def looks_secret(key: str, value: object) -> bool:
    """Whether an error about `key` must not echo `value`."""
    last = key.lower().rsplit(".", 1)[-1]
    return bool(SECRET_KEYS.search(last)) or (
        isinstance(value, str) and bool(SECRET_VALUE.search(value.strip()))
    )


class Price(_Strict):
    """US dollars per million tokens."""

    prompt_per_million: float = Field(ge=0)
    completion_per_million: float = Field(ge=0)

    def scaled(self, factor: float) -> Price:
        return Price(
            prompt_per_million=self.prompt_per_million * factor,
            completion_per_million=self.completion_per_million * factor,
        )


class Budget(_Strict):
    """Caps for one run; generation stops cleanly when one is reached, keeping what it has."""

    max_tokens: int | None = Field(default=None, gt=0)  # prompt + completion tokens
    max_cost_usd: float | None = Field(default=None, gt=0)
    # When the estimate before a run (generation/estimate.py) exceeds max_cost_usd: say so and
    # run until the budget is spent ("warn"), or stop before the first request ("refuse").
    over_estimate: Literal["warn", "refuse"] = "warn"


class BreakerSettings(_Strict):
    """Stop a run whose endpoint is clearly broken: when at least `max_failure_share` of the
    last `window` requests (over `min_requests` at least) failed after their retries, the run
    stops dispatching, keeps what was answered (the cache) and ends non-zero. Transient faults
    a healthy endpoint has (a few in a hundred, retried) stay far below the share."""

    window: int = Field(default=50, ge=1)
    min_requests: int = Field(default=20, ge=1)
    max_failure_share: float | None = Field(default=0.9, gt=0, le=1)  # None: never trip


class AdaptiveSettings(_Strict):
    """Limits that adapt (generation/limits.py): on a 429 (its Retry-After and the
    `x-ratelimit-*` headers honoured) the client multiplies its concurrency and request rate by
    `decrease`, then adds back step by step while requests succeed, never above
    `max_concurrency`, `requests_per_minute` and `tokens_per_minute` (the ceilings)."""

    enabled: bool = True
    decrease: float = Field(default=0.7, gt=0, lt=1)  # the factor applied on a 429
    # the request rate grows back by this share of its value at the last decrease, per answer
    # (while the rate is what holds requests back)
    increase: float = Field(default=0.005, gt=0)
    # the limits come down once this share of the answers since the last decrease (20 at
    # least) are 429s: scattered ones (a busy shared endpoint) are only retried
    decrease_at_share: float = Field(default=0.15, gt=0, le=1)
    min_concurrency: int = Field(default=1, ge=1)
    min_requests_per_minute: float = Field(default=6, gt=0)
    # 429s a request may get while the limits still come down, on top of `max_retries` (they
    # are the limiter's signal, not the request's failure; the circuit breaker never sees them)
    rate_limit_retries: int = Field(default=20, ge=0)
    # the requests and tokens per minute limits (fixed or adapting) let this many seconds' worth
    # pass at once; the rest are spaced
    burst_s: float = Field(default=1.0, gt=0)
    # the report's effective-rate series: one point per `interval_s`, at most `max_points`
    # (older points are merged pairwise as a run grows)
    interval_s: float = Field(default=10.0, gt=0)
    max_points: int = Field(default=120, ge=2)


class EmbeddedSettings(_Strict):
    """The embedded llama.cpp server (the default backend)."""

    model_path: Path | None = None  # None: the bundled SmolLM2-135M-Instruct, re-quantized to Q8_0
    n_parallel: int = Field(default=8, ge=1, le=64)  # sequences decoded together
    n_threads: int | None = Field(default=None, ge=1)  # None: every core
    ctx_per_seq: int = Field(default=2048, ge=256)
    startup_timeout_s: float = Field(default=180, gt=0)


class EndpointSettings(_Strict):
    """One more server of the same model; unset fields come from `generation`."""

    base_url: str
    api_key_env: EnvVarName | None = None
    max_concurrency: int | None = Field(default=None, ge=1)
    requests_per_minute: float | None = Field(default=None, gt=0)
    tokens_per_minute: float | None = Field(default=None, gt=0)


class BatchSettings(_Strict):
    """`backend: batch`: OpenAI's Batch API (JSONL files, half price, results within 24 h)."""

    poll_interval_s: float = Field(default=60, gt=0)
    completion_window: Literal["24h"] = "24h"
    max_requests_per_file: int = Field(default=50_000, ge=1, le=50_000)
    max_bytes_per_file: int = Field(default=200 * 2**20, ge=1024, le=200 * 2**20)
    keep_files: bool = True  # keep the JSONL files under state_dir (vLLM's run_batch reads them)
    state_dir: Path | None = None  # None: <output.dir>/_state/batches
    price_factor: float = Field(default=0.5, gt=0, le=1)  # batch prices vs `prices`


# The embedded SmolLM2-135M loops without a penalty on repeated tokens: measured over 16 default
# prompts, 0 of 16 outputs passed the filters at OpenAI's defaults (temperature 0.8, no penalty;
# 13 ran to max_tokens, the rest were repetitive), 11 of 16 at temperature 0.5 with a
# frequency penalty of 0.8. Used when the backend is embedded and `sampling` is not set.
EMBEDDED_SAMPLING = {"max_tokens": 600, "temperature": 0.5, "top_p": 0.9, "frequency_penalty": 0.8}


class GenerationSettings(_Strict):
    # embedded: the bundled model; openai: any OpenAI-compatible endpoint, live; batch: the
    # OpenAI Batch API (resumable across restarts).
    backend: Literal["embedded", "openai", "batch"] = "embedded"
    base_url: str | None = None  # any OpenAI-compatible endpoint (vLLM, Ollama, OpenAI, ...)
    model: str | None = None  # None: the embedded model's name
    api_key_env: EnvVarName = "OPENAI_API_KEY"  # the key is read from this variable, never config
    api_key_secret: str | None = None  # or from this Prefect Secret block
    max_concurrency: int = Field(default=8, ge=1)
    requests_per_minute: float | None = Field(default=None, gt=0)
    tokens_per_minute: float | None = Field(default=None, gt=0)
    timeout_s: float = Field(default=300, gt=0)
    max_retries: int = Field(default=6, ge=0)
    retry_failed: bool = False  # retry requests that failed permanently in an earlier run
    sampling: Sampling = Field(default_factory=Sampling)
    prices: dict[str, Price] = Field(default_factory=dict)  # by model name
    budget: Budget = Field(default_factory=Budget)
    breaker: BreakerSettings = Field(default_factory=BreakerSettings)
    adaptive: AdaptiveSettings = Field(default_factory=AdaptiveSettings)
    # Several servers of the same model share the load (each with its own limits); with
    # `endpoints` set, `base_url` is not used.
    endpoints: list[EndpointSettings] = Field(default_factory=list)
    # Generation tasks per run (Dask or threads run them side by side); None: one per endpoint.
    partitions: int | None = Field(default=None, ge=1)
    batch: BatchSettings = Field(default_factory=BatchSettings)

    @model_validator(mode="before")
    @classmethod
    def _embedded_sampling(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("backend", "embedded") == "embedded":
            if "sampling" not in data:
                return {**data, "sampling": EMBEDDED_SAMPLING}
            if isinstance(data["sampling"], dict):  # the user's keys win, the rest embedded
                return {**data, "sampling": {**EMBEDDED_SAMPLING, **data["sampling"]}}
        return data


class PlanSettings(_Strict):
    samples_per_topic: int = Field(default=1, ge=1)
    # Topics per run (None: all). Which: the least covered by earlier versions ("uncovered",
    # topics never generated first), or a window that moves on each run ("window").
    topics_per_run: int | None = Field(default=None, ge=1)
    rotation: Literal["uncovered", "window"] = "uncovered"
    limit: int | None = Field(default=24, ge=1)  # stratified sample of the plan; None: all
    # Requests per chunk: a run is a stream of chunks, each generated, filtered and spilled,
    # then released; memory holds about two chunks whatever the run's size.
    chunk_requests: int = Field(default=2_000, ge=1)
    seed_words: int = Field(default=3, ge=0, le=20)  # random common words per prompt
    covered_units: int = Field(default=6, ge=0)  # earlier sibling topics listed as covered
    axes: Path | None = None  # None: the bundled prompts/axes.yaml
    templates: Path | None = None  # None: the bundled prompts/templates/
    system_prompt: str | None = None


class GrowSettings(_Strict):
    """The tree grows on its own: after each published run, the `leaves` whose documents fared
    best get up to `new_topics` new children in all (off at 0), added to
    `<out>/_state/topics.jsonl`, which later runs plan from with the seed file
    (generation/grow.py)."""

    new_topics: int = Field(default=0, ge=0)
    leaves: int = Field(default=2, ge=1)
    breadth: int = Field(default=3, ge=1, le=20)  # children asked of each leaf


class ExpansionSettings(_Strict):
    """`booksmith topics expand`: growing seed topics into a tree with the LLM."""

    relevance_check: bool = True  # ask the LLM whether each child belongs under its parent
    # Send a JSON schema (response_format): embedded, vLLM and OpenAI enforce it; an endpoint
    # that rejects it (a 400 naming response_format) is asked again without it.
    structured_output: bool = True
    # A presence penalty keeps a small model from listing one title over and over.
    sampling: Sampling = Field(
        default_factory=lambda: Sampling(
            max_tokens=256, temperature=0.7, top_p=0.95, presence_penalty=0.8
        )
    )
    # Answers asked per topic (each its own sampling seed), each proposing 2 x breadth
    # candidates; they are ranked by how many answers proposed them and the best kept.
    samples: int = Field(default=2, ge=1, le=8)
    # Rounds asked again (other samples) of a topic left with fewer than 2 children.
    retries: int = Field(default=2, ge=0, le=8)
    grow: GrowSettings = Field(default_factory=GrowSettings)


class CardSettings(_Strict):
    """What the dataset card (README.md front matter) says about the data."""

    license: str = "other"  # the generator's license governs the text; say which
    language: list[str] = Field(default_factory=lambda: ["en"])
    pretty_name: str | None = None  # None: "booksmith <run_id>"


class EncodingFile(_Strict):
    """A tiktoken encoding whose BPE file is not bundled: supplied by path, its sha256 checked."""

    name: str  # tiktoken's name for it, e.g. "o200k_base"
    bpe_file: Path
    sha256: str | None = None


class OutputSettings(_Strict):
    dir: Path = Path("out")
    shard_rows: int | None = Field(default=50_000, ge=1)  # rows per shard (None: bytes only)
    shard_bytes: int | None = Field(default=256 * 2**20, ge=1)  # about 256 MB of Parquet
    encoding: str = "cl100k_base"  # the primary encoding that `n_tokens` counts in
    # More token shards: "smollm2" (the bundled model's BPE), any tiktoken name whose file is
    # in tiktoken's cache, or {name, bpe_file, sha256} for a BPE file supplied by path.
    encodings: list[str | EncodingFile] = Field(default_factory=list)
    pack_seq_len: int | None = Field(default=None, ge=8)  # also write packed rows of this + 1
    card: CardSettings = Field(default_factory=CardSettings)


class PublishSettings(_Strict):
    """When a finished run becomes a version. A run that kept fewer than `min_documents`, or
    whose failed requests exceed `max_failed_share` of those attempted, is not published: it
    ends Failed (exit 4), its files (failures, rejected shards, report) moved to
    `<out>/_state/failed/<run_id>/` for reading, and the latest version stays the last good one."""

    min_documents: int = Field(default=1, ge=0)
    max_failed_share: float | None = Field(default=0.5, gt=0, le=1)  # None: any share


class DaskSettings(_Strict):
    """`runner: dask`: Prefect's DaskTaskRunner, on a cluster at `address` or a local one."""

    address: str | None = None  # tcp://scheduler:8786; None: a LocalCluster started per run
    n_workers: int = Field(default=2, ge=1)
    threads_per_worker: int = Field(default=1, ge=1)


class FillSettings(_Strict):
    """Keep going until the run keeps this much (after every filter), within the budget."""

    # Kept documents in the run. 20 by default, so a small run (the demo's 24 requests) still
    # yields a dataset when the filters reject much; null turns filling off.
    documents: int | None = Field(default=20, ge=1)
    tokens: int | None = Field(default=None, ge=1)  # kept tokens (primary encoding)
    documents_per_topic: int | None = Field(default=None, ge=1)
    max_rounds: int = Field(default=4, ge=1)  # planning rounds, the first included
    oversample: float = Field(default=1.25, ge=1)  # plan this much more than the expected need
    # Fill rounds never plan more than this many requests in all, whatever the keep rate (a
    # dead endpoint keeps nothing, and dividing by that rate would plan without end); None:
    # `max_plan_factor` times the first round's plan or the documents asked for, the larger.
    max_requests: int | None = Field(default=None, ge=1)
    max_plan_factor: float = Field(default=8.0, ge=1)

    @property
    def enabled(self) -> bool:
        return bool(self.documents or self.tokens or self.documents_per_topic)

    def request_cap(self, first_round: int, topics: int) -> int:
        """The most requests the fill rounds may plan in all, the first round included: a
        multiple of the first round, or of the documents asked for when that is larger (a run
        may start deliberately small: one request per topic)."""
        if self.max_requests is not None:
            return self.max_requests
        wanted = max(self.documents or 0, (self.documents_per_topic or 0) * topics)
        return max(1, int(max(first_round, wanted) * self.max_plan_factor))


class ExportSettings(_Strict):
    """Export each new version to an object store after it is written (off when `to` is unset)."""

    to: str | None = None  # e.g. s3://bucket/booksmith: versions land at <to>/<run_id>/
    workers: int = Field(default=8, ge=1)
    verify: bool = True  # read the exported version back: schema, rows, sha256s


class ScheduleSettings(_Strict):
    """`booksmith serve`: when the nightly deployment runs."""

    cron: str = "0 2 * * *"
    timezone: str = "UTC"


class TrainSettings(_Strict):
    """Train the bundled Phi model on each new version (off by default: it is for evaluation)."""

    enabled: bool = False
    config: Path | None = None  # a trainer YAML; None: trainer/configs/tiny.yaml
    out: Path | None = None  # None: <output.dir>/_train/<run_id>
    max_steps: int | None = Field(default=None, ge=1)


class RunConfig(_Strict):
    seed: int | None = None  # None: derived from the run's UTC date, so each night differs
    topics: Path | None = None  # None: the bundled default seeds (none when `sources` is set)
    # Records to ground generation in (filters/sources.py, pipeline/grounded.py); with
    # `topics` too, both are planned by their shares (`grounding.topics_share`, `share`).
    sources: list[SourceSpec] = Field(default_factory=list)
    grounding: GroundingSettings = Field(default_factory=GroundingSettings)
    plan: PlanSettings = Field(default_factory=PlanSettings)
    generation: GenerationSettings = Field(default_factory=GenerationSettings)
    embedded: EmbeddedSettings = Field(default_factory=EmbeddedSettings)
    expansion: ExpansionSettings = Field(default_factory=ExpansionSettings)
    output: OutputSettings = Field(default_factory=OutputSettings)
    dedup: DedupSettings = Field(default_factory=DedupSettings)
    filters: FilterSettings = Field(default_factory=FilterSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    export: ExportSettings = Field(default_factory=ExportSettings)
    fill: FillSettings = Field(default_factory=FillSettings)
    publish: PublishSettings = Field(default_factory=PublishSettings)
    runner: Literal["threads", "dask"] = "threads"  # where the generation tasks run
    dask: DaskSettings = Field(default_factory=DaskSettings)
    schedule: ScheduleSettings = Field(default_factory=ScheduleSettings)

    @property
    def plans_topics(self) -> bool:
        """Topics are planned unless the run has sources and no topic file of its own."""
        return not self.sources or self.topics is not None

    def config_hash(self) -> str:
        """Hash of what shapes the output (paths, and how the work is cut and spread, excluded),
        recorded in the manifest."""
        # A run without sources hashes as before they existed (its versions' keys stay).
        plain = {"sources": True, "grounding": True} if not self.sources else {}
        # (nor the rules that judge grounded documents only)
        filters = {"workers"} | ({"faithfulness"} if not self.sources else set())
        data = self.model_dump(
            mode="json",
            exclude={
                **plain,
                "plan": {"chunk_requests"},
                # what decides whether and how a run goes on, not what it writes (the grown
                # topics enter the run key through the topics themselves)
                "generation": {"budget": {"over_estimate"}},
                "expansion": {"grow"},
                "filters": filters,
                "output": {"dir"},
                "export": True,
                "schedule": True,
                "publish": True,
                "train": True,
                "runner": True,
                "dask": True,
            },
        )
        return hashlib.sha256(canonical_json(data).encode()).hexdigest()[:16]


def _key_lines(node: yaml.Node, prefix: tuple[str | int, ...] = ()) -> dict[tuple, int]:
    """Map every key path in a YAML document to its 1-based line, for error messages."""
    lines: dict[tuple, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = (*prefix, key_node.value)
            lines[path] = key_node.start_mark.line + 1
            lines.update(_key_lines(value_node, path))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[(*prefix, i)] = item.start_mark.line + 1
            lines.update(_key_lines(item, (*prefix, i)))
    return lines


def format_validation_error(
    err: ValidationError, source: str, lines: dict[tuple, int] | None = None
) -> str:
    parts = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc) or "<top level>"
        line = (lines or {}).get(loc) or (lines or {}).get(loc[:-1])
        where = f"{source}:{line}" if line else source
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see `booksmith config show` for every key)"
        elif looks_secret(key, e.get("input")):
            msg = f"{e['msg']} (value not shown: it may be a secret)"
        else:
            msg = f"{e['msg']} (got {e.get('input')!r})"
        parts.append(f"{where}: {key}: {msg}")
    return "\n".join(parts)


M = TypeVar("M", bound=BaseModel)


def load_yaml_model(
    model: type[M], path: Path | None, overrides: dict[str, Any] | None = None, what: str = "config"
) -> M:
    """Read a YAML file into `model`; `overrides` (dotted keys) win over the file. Errors name
    the file, the line and the key (ConfigError)."""
    data: dict[str, Any] = {}
    lines: dict[tuple, int] = {}
    source = str(path) if path else "<defaults>"
    if path is not None:
        try:
            raw = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{path}: {what} file not found") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
        try:
            node = yaml.compose(raw)
            loaded = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            raise ConfigError(f"{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of settings at the top level")
        data = loaded or {}
        lines = _key_lines(node) if node is not None else {}
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        target = data
        *parents, last = dotted.split(".")
        for p in parents:
            target = target.setdefault(p, {})
        target[last] = value
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source, lines)) from None


def load_config(path: Path | None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read and validate a run config; `overrides` (dotted keys) win over the file."""
    return load_yaml_model(RunConfig, path, overrides)
