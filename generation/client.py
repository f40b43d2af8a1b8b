"""One generation client for every OpenAI-compatible endpoint (vLLM, Ollama, OpenAI, embedded).

Built on the official AsyncOpenAI client. Around each request: the durable response cache,
bounded concurrency, requests- and tokens-per-minute limits, retries with exponential backoff
and jitter that honour Retry-After, a failures table for what retrying cannot fix, and the
ledger (generation/ledger.py): accounting, and a budget that stops the run cleanly.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx2  # openai 3 speaks httpx2
import openai
from aiolimiter import AsyncLimiter
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from booksmith.generation.breaker import Breaker
from booksmith.generation.cache import ResponseCache
from booksmith.generation.ledger import GenerationReport, Ledger
from booksmith.schemas import GenerationRequest, GenerationResult
from booksmith.schemas.config import Budget, Price
from booksmith.schemas.crashpoints import crash_point


@dataclass(frozen=True)
class Endpoint:
    base_url: str
    model: str
    api_key: str = "not-needed"  # never logged, never written anywhere
    backend: str = "openai"  # recorded on every document
    max_concurrency: int = 8
    rpm: float | None = None
    tpm: float | None = None
    timeout_s: float = 300.0
    max_retries: int = 6
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0

    def __repr__(self) -> str:  # keep the key out of logs and tracebacks
        return f"Endpoint(base_url={self.base_url!r}, model={self.model!r}, {self.backend})"


class _Permanent(Exception):
    """A failure that retrying will not fix; carries its reason string."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Transient(Exception):
    """A bad answer (no choices) worth another attempt."""


_RETRYABLE_STATUS = {408, 409, 425, 429}
# The failure reason of a 400 that names response_format: the endpoint lacks structured output
# (or this schema), and a caller can ask again without it.
RESPONSE_FORMAT_REJECTED = "http_400:response_format"


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, openai.APIConnectionError | _Transient):  # includes APITimeoutError
        return True
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code in _RETRYABLE_STATUS or exc.status_code >= 500
    return False


def _failure_reason(exc: BaseException) -> str:
    if isinstance(exc, _Permanent):
        return exc.reason
    if isinstance(exc, openai.APITimeoutError):
        return "timeout"
    if isinstance(exc, openai.APIConnectionError):
        return "connection"
    if isinstance(exc, openai.BadRequestError) and "response_format" in str(exc):
        return RESPONSE_FORMAT_REJECTED
    if isinstance(exc, openai.APIStatusError):
        return f"http_{exc.status_code}"
    return type(exc).__name__


def retry_after_s(exc: BaseException | None) -> float | None:
    """Seconds the server asked us to wait (Retry-After / retry-after-ms), if it said."""
    headers = getattr(getattr(exc, "response", None), "headers", None)
    if headers is None:
        return None
    if (ms := headers.get("retry-after-ms")) is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value) if value else None
        return max(0.0, parsed.timestamp() - time.time()) if parsed else None


def chat_body(request: GenerationRequest) -> dict[str, Any]:
    """The chat.completions body of a request: what the live client sends, and what a Batch
    API line carries (tests/test_batch.py checks both against a recording server)."""
    s = request.sampling
    body: dict[str, Any] = {
        "model": request.model,
        "messages": [m.model_dump() for m in request.messages],
        "max_tokens": s.max_tokens,
        "temperature": s.temperature,
        "top_p": s.top_p,
        "seed": s.seed,
    }
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(s, name) is not None:
            body[name] = getattr(s, name)
    if request.response_format:
        body["response_format"] = json.loads(request.response_format)
    return body


class GenerationClient:
    def __init__(
        self,
        endpoint: Endpoint,
        *,
        cache: ResponseCache | None = None,
        run_id: str = "",
        prices: dict[str, Price] | None = None,
        budget: Budget | None = None,
        retry_failed: bool = False,
        on_result: Callable[[GenerationResult, GenerationReport], None] | None = None,
        token_counter: Callable[[str], int] | None = None,
        breaker: Breaker | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.cache = cache
        self.run_id = run_id
        self.retry_failed = retry_failed
        self._rpm = AsyncLimiter(endpoint.rpm, 60) if endpoint.rpm else None
        self._tpm = AsyncLimiter(endpoint.tpm, 60) if endpoint.tpm else None
        # The budget is the client's: it spans every `run` call (topic expansion makes one per
        # level).
        self.ledger = Ledger(
            price=(prices or {}).get(endpoint.model),
            budget=budget,
            rate_limited=bool(endpoint.tpm),
            on_result=on_result,
            token_counter=token_counter,
            breaker=breaker,
        )

    @property
    def report(self) -> GenerationReport:
        return self.ledger.report

    # -- one request ----------------------------------------------------------------------------

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        asked = retry_after_s(exc)
        if asked is not None:
            return asked + random.uniform(0, 0.1 * asked + 0.05)
        ep = self.endpoint
        cap = min(ep.backoff_max_s, ep.backoff_base_s * 2**state.attempt_number)
        return random.uniform(0, cap)  # full jitter

    async def _complete(
        self, api: openai.AsyncOpenAI, request: GenerationRequest, estimate: float
    ) -> GenerationResult:
        attempts = 0
        started = time.perf_counter()

        async def attempt() -> GenerationResult:
            nonlocal attempts
            attempts += 1
            if attempts > 1:
                self.report.retries += 1
            if self._rpm:
                await self._rpm.acquire()
            if self._tpm and estimate:
                await self._tpm.acquire(min(estimate, self._tpm.max_rate))
            self.report.requests += 1
            response = await api.chat.completions.create(**chat_body(request))
            if not response.choices:
                raise _Transient("no choices in the response")
            choice = response.choices[0]
            if choice.finish_reason == "content_filter":
                raise _Permanent("content_filter")
            usage = response.usage
            if self._tpm and usage and usage.total_tokens > estimate:
                # The estimate was low (it is an upper bound unless the server pads): pay the
                # difference, so the limiter tracks the tokens actually used.
                await self._tpm.acquire(min(usage.total_tokens - estimate, self._tpm.max_rate))
            return GenerationResult(
                request_id=request.id,
                text=choice.message.content or "",
                finish_reason=choice.finish_reason,
                prompt_tokens=usage.prompt_tokens if usage else 0,
                completion_tokens=usage.completion_tokens if usage else 0,
                model=response.model or request.model,
                backend=self.endpoint.backend,
                attempts=attempts,
            )

        try:
            async for retrying in AsyncRetrying(
                stop=stop_after_attempt(self.endpoint.max_retries + 1),
                wait=self._wait,
                retry=retry_if_exception(_is_transient),
                reraise=True,
            ):
                with retrying:
                    result = await attempt()
        except Exception as exc:
            permanent = not _is_transient(exc)
            reason = _failure_reason(exc)
            if not permanent:
                reason = f"retries_exhausted:{reason}"
            result = GenerationResult(
                request_id=request.id,
                error=reason,
                backend=self.endpoint.backend,
                model=request.model,
                attempts=attempts,
            )
            if self.cache is not None:
                self.cache.record_failure(result, run_id=self.run_id, permanent=permanent)
        result.latency_s = time.perf_counter() - started
        return result

    # -- the stage ------------------------------------------------------------------------------

    async def run(self, requests: Sequence[GenerationRequest]) -> GenerationReport:
        """Generate every request (or find it in the cache); returns the report with results in
        completion order. Every request ends as a result, a failure, or skipped by the budget."""
        ledger = self.ledger
        report = ledger.start(planned=len(requests))
        started = time.perf_counter()
        queue: asyncio.Queue[GenerationRequest] = asyncio.Queue()
        for req in requests:
            if not ledger.from_cache(req, self.cache, self.retry_failed):
                queue.put_nowait(req)
        if queue.empty():
            report.elapsed_s = time.perf_counter() - started
            return report
        n = self.endpoint.max_concurrency
        http = openai.DefaultAsyncHttpxClient(
            limits=httpx2.Limits(max_connections=n, max_keepalive_connections=n)
        )
        api = openai.AsyncOpenAI(
            base_url=self.endpoint.base_url,
            api_key=self.endpoint.api_key,
            max_retries=0,  # retries are ours: Retry-After, jitter, failure accounting
            timeout=self.endpoint.timeout_s,
            http_client=http,
        )

        async def worker() -> None:
            while not queue.empty():
                req = queue.get_nowait()
                estimate = ledger.reserve(req)
                if estimate is None:  # over the budget: skipped
                    continue
                try:
                    result = await self._complete(api, req, estimate)
                finally:
                    ledger.release(estimate)
                if result.ok and self.cache is not None:
                    self.cache.put(result)
                    crash_point("generate.result")
                ledger.account(result, cached=False)

        try:
            await asyncio.gather(*(worker() for _ in range(min(n, queue.qsize()))))
        finally:
            await api.close()
        report.elapsed_s = time.perf_counter() - started
        return report
