"""The faithfulness judge as a chunk stage, between the quality chain and the near-duplicates.

Not a chain filter: it asks an LLM (one request per grounded document), so it runs in the run's
own process with the run's client (`generation.clients.make_client`, live) and response cache,
on the run's endpoint unless `filters.faithfulness.judge.base_url` names another. The flow
hands it the run's endpoints (`bind`) once they are open. Its client and response cache are
opened by the first chunk and serve every chunk of the run (`RunState.close` closes them).
Cross-chunk state: `counts`, kept with the quality chain's (checkpointed with them); the
manifest writes the verdicts in `counts.filter` and the judge's work (`WORK`) in
`counts.judge`.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING

from booksmith.filters import StageOutput
from booksmith.filters.faithfulness_judge import REASON, judge_documents
from booksmith.generation.client import Endpoint
from booksmith.schemas import Document
from booksmith.schemas.config import Budget, RunConfig
from booksmith.schemas.filter_settings import FaithfulnessJudgeSettings

if TYPE_CHECKING:
    from booksmith.generation.batch import BatchGenerationClient
    from booksmith.generation.cache import ResponseCache
    from booksmith.generation.client import GenerationClient

NAME = "faithfulness_judge"
# what the judge did, not verdicts: the manifest keeps them in counts.judge, so counts.filter
# holds input, kept and reasons only, as for every filter (the report lists its keys as drops)
WORK = ("judged", "unparsed", "failed", "requests", "prompt_tokens", "completion_tokens")


def judge_endpoint(cfg: RunConfig, endpoints: Sequence[Endpoint]) -> Endpoint:
    """The endpoint the judge asks: its own `base_url`, else the run's first endpoint; with
    its own `model` when one is named."""
    j = cfg.filters.faithfulness.judge
    if j.base_url is None:
        own = endpoints[0]
        return dataclasses.replace(own, model=j.model) if j.model else own
    from booksmith.filters.retrain import endpoint_of
    from booksmith.generation.backends import open_endpoint

    settings = endpoint_of(cfg, j.base_url, j.model, j.api_key_env)
    with open_endpoint(settings, cfg.embedded) as endpoint:  # an openai one: nothing started
        return endpoint


class JudgeStage:
    """Grounded documents the judge finds unsupported are rejected `grounding:judge`; the
    others, and every document without a source, are kept (see filters/faithfulness_judge.py).
    With the judge off it keeps everything and asks nothing."""

    name = NAME

    def __init__(self, settings: FaithfulnessJudgeSettings, run_id: str) -> None:
        self.settings, self.run_id = settings, run_id
        self.cfg: RunConfig | None = None
        self.endpoint: Endpoint | None = None
        # the run's: opened by the first chunk, closed by `close`
        self._cache: ResponseCache | None = None
        self._client: GenerationClient | BatchGenerationClient | None = None

    def bind(self, cfg: RunConfig, endpoints: Sequence[Endpoint]) -> None:
        self.close()  # a client of an earlier binding asks no more
        if self.settings.enabled:
            self.cfg, self.endpoint = cfg, judge_endpoint(cfg, endpoints)

    def client(self) -> GenerationClient | BatchGenerationClient:
        """The run's judge client and its response cache, opened on first use and kept for
        every later chunk (its adaptive limits and breaker window carry across them)."""
        if self._client is not None:
            return self._client
        assert self.cfg is not None and self.endpoint is not None, "JudgeStage.bind not called"
        from booksmith.generation.cache import ResponseCache
        from booksmith.generation.clients import make_client
        from booksmith.shards.version_dir import state_dir

        cache = ResponseCache(state_dir(self.cfg.output.dir) / "responses.sqlite")
        try:
            # unbounded by generation.budget: the judge's tokens are counted apart (`run`)
            self._client = make_client(
                self.cfg,
                self.endpoint,
                cache=cache,
                run_id=self.run_id,
                budget=Budget(),
                batch=False,
            )
        except BaseException:
            cache.close()
            raise
        self._cache = cache
        return self._client

    def close(self) -> None:
        """Close the run's response cache (a later chunk would open a new one)."""
        cache, self._cache, self._client = self._cache, None, None
        if cache is not None:
            cache.close()

    def run(self, docs: Sequence[Document], counts: dict[str, dict[str, int]]) -> StageOutput:
        """Judge the chunk; its counts are added to `counts[NAME]`."""
        out = StageOutput()
        if not self.settings.enabled:
            out.kept = list(docs)
            return out
        client = self.client()
        s, endpoint = self.settings, client.endpoint
        verdicts, reports = asyncio.run(
            judge_documents(
                docs, client.run, endpoint.model, max_tokens=s.max_tokens,
                max_chars=s.max_chars, structured=s.structured_output,
            )
        )  # fmt: skip
        unsupported = {v.doc.id: v for v in verdicts if v.unsupported}
        for doc in docs:
            v = unsupported.get(doc.id)
            if v is None:
                out.kept.append(doc)
            else:
                out.reject(doc, REASON, detail=v.detail(endpoint.model))
        tally = Counter(
            {
                "input": len(docs),
                "kept": len(out.kept),
                REASON: len(unsupported),
                "judged": len(verdicts),  # grounded documents the judge was asked about
                "unparsed": sum(v.error == "unparsed" for v in verdicts),
                "failed": sum(v.answer is None and v.error != "unparsed" for v in verdicts),
                "requests": sum(r.requests for r in reports),  # asked now, not from the cache
                "prompt_tokens": sum(r.prompt_tokens for r in reports),
                "completion_tokens": sum(r.completion_tokens for r in reports),
            }
        )
        mine = counts.setdefault(NAME, {})
        for key, n in tally.items():
            mine[key] = mine.get(key, 0) + n
        return out
