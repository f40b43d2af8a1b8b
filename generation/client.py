"""One generation client for every OpenAI-compatible endpoint (vLLM, Ollama, OpenAI, embedded).

Around each request: the durable response cache, concurrency and requests- and
tokens-per-minute limits that adapt to 429s (generation/limits.py), retries with exponential
backoff and jitter that honour Retry-After, a failures table for what retrying cannot fix, and
the ledger (generation/ledger.py): accounting, and a budget that stops the run cleanly.

The request goes out through generation/http.py (aiohttp: a fifth of the CPU a request of the
openai SDK's transport; its failures raised as the SDK's exceptions): the body is built here in
wire form and the answer's JSON read here, with its headers (the `x-ratelimit-*` ones feed
the limits).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx2  # openai 3 speaks httpx2
import openai

from booksmith.generation.breaker import Breaker
from booksmith.generation.cache import ResponseCache
from booksmith.generation.cache_writer import CacheWriter
from booksmith.generation.http import Answer, ChatHTTP
from booksmith.generation.ledger import GenerationReport, Ledger
from booksmith.generation.limits import Limits
from booksmith.schemas import GenerationRequest, GenerationResult
from booksmith.schemas.config import AdaptiveSettings, Budget, Price
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


def _rejects_response_format(exc: BaseException) -> bool:
    """An answer that refuses the request's response_format: a 400 or 422 naming it, or a 500
    naming it (llama-cpp-python's server answers OpenAI's `json_schema` type with a 500 that
    carries its validation error). The same body fails again: not worth a retry."""
    return (
        isinstance(exc, openai.APIStatusError)
        and exc.status_code in (400, 422, 500)
        and "response_format" in str(exc)
    )


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, openai.APIConnectionError | _Transient):  # includes APITimeoutError
        return True
    if _rejects_response_format(exc):
        return False
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
    if _rejects_response_format(exc):
        return RESPONSE_FORMAT_REJECTED
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        # a final 4xx says why with the server's error code where it names one:
        # http_400:context_length_exceeded (OpenAI, llama-cpp-python, the embedded server);
        # vLLM's code is the status again, which adds nothing
        code = exc.code
        if 400 <= status < 500 and status not in _RETRYABLE_STATUS and code and not code.isdigit():
            return f"http_{status}:{code}"
        return f"http_{status}"
    return type(exc).__name__


def _retry_reason(exc: BaseException) -> str:
    """Why an attempt is retried, as the report counts it: timeout, connection, http_429,
    http_503, no_choices (an answer without choices)."""
    return "no_choices" if isinstance(exc, _Transient) else _failure_reason(exc)


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
        adaptive: AdaptiveSettings | None = None,
        limits_state: Mapping[str, float | None] | None = None,
    ) -> None:
        """`adaptive`: how the limits adapt (None: the defaults, adaptive); `limits_state`:
        where an earlier client of the same run left them (`GenerationReport.limits`)."""
        self.endpoint = endpoint
        self.cache = cache
        self.run_id = run_id
        self.retry_failed = retry_failed
        # The limits live as long as the client: what they learned holds for its next run.
        self.limits = Limits(
            max_concurrency=endpoint.max_concurrency,
            rpm=endpoint.rpm,
            tpm=endpoint.tpm,
            settings=adaptive,
        )
        self.limits.resume(limits_state)
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

    def _backoff(self, exc: BaseException, attempt: int) -> float:
        asked = retry_after_s(exc)
        if asked is not None:
            return asked + random.uniform(0, 0.1 * asked + 0.05)
        ep = self.endpoint
        cap = min(ep.backoff_max_s, ep.backoff_base_s * 2**attempt)
        return random.uniform(0, cap)  # full jitter

    async def _send(
        self, http: ChatHTTP, request: GenerationRequest, body: dict[str, Any]
    ) -> tuple[GenerationResult, Answer]:
        response = await http.post(body)
        try:
            data = json.loads(response.content)
            choices = data.get("choices")
            usage = data.get("usage") or {}
        except (ValueError, AttributeError):
            # as the SDK's own parsing says it (a 200 that is not a chat completion)
            text = response.content.decode("utf-8", "replace")
            raise openai.APIResponseValidationError(
                response=httpx2.Response(response.status, text=text,
                                         request=httpx2.Request("POST", http.url)),
                body=text, message="not a chat completion",
            ) from None  # fmt: skip
        if not choices:
            raise _Transient("no choices in the response")
        choice = choices[0]
        finish_reason = choice.get("finish_reason")
        if finish_reason == "content_filter":
            raise _Permanent("content_filter")
        message = choice.get("message") or {}
        result = GenerationResult(
            request_id=request.id,
            text=message.get("content") or "",
            finish_reason=finish_reason,
            prompt_tokens=usage.get("prompt_tokens") or 0,
            completion_tokens=usage.get("completion_tokens") or 0,
            model=data.get("model") or request.model,
            backend=self.endpoint.backend,
        )
        return result, response

    async def _complete(
        self, http: ChatHTTP, request: GenerationRequest, estimate: float
    ) -> GenerationResult:
        """One request to its answer or its failure: retries on 5xx, 408/409/425/429, timeouts
        and dropped connections, with backoff (Retry-After when the server says). A 429 while the
        limits can still come down is their signal: it lowers them and is retried without
        using the request's `max_retries` (at most `adaptive.rate_limit_retries` of them)."""
        limits, report, ep = self.limits, self.report, self.endpoint
        body = chat_body(request)
        started = time.perf_counter()
        attempts = counted = free = 0
        while True:
            attempts += 1
            sent_at = await limits.acquire(estimate)
            report.requests += 1
            try:
                result, response = await self._send(http, request, body)
            except Exception as exc:
                limits.release()  # (a cancellation ends the run: its slots go with it)
                signal = False
                if isinstance(exc, openai.APIStatusError) and exc.status_code == 429:
                    report.rate_limited += 1
                    headers = exc.response.headers
                    signal = limits.rate_limited_answer(sent_at, retry_after_s(exc), headers)
                if not _is_transient(exc):
                    return self._failed(request, exc, attempts, started, permanent=True)
                if signal and free < limits.settings.rate_limit_retries:
                    free += 1
                elif counted < ep.max_retries:
                    counted += 1
                else:
                    return self._failed(request, exc, attempts, started, permanent=False)
                report.retries += 1
                report.retry_reasons[_retry_reason(exc)] += 1
                await asyncio.sleep(self._backoff(exc, attempts))
                continue
            limits.release()
            limits.succeeded(sent_at)
            if limits.adaptive:
                limits.headers(response.headers)
            used = result.prompt_tokens + result.completion_tokens
            if used > estimate:
                # The estimate was low (it is an upper bound unless the server pads): pay the
                # difference, so the limiter tracks the tokens actually used.
                limits.used_tokens(used - estimate)
            result.attempts = attempts
            result.latency_s = time.perf_counter() - started
            return result

    def _failed(
        self,
        request: GenerationRequest,
        exc: BaseException,
        attempts: int,
        started: float,
        *,
        permanent: bool,
    ) -> GenerationResult:
        reason = _failure_reason(exc)
        if not permanent:
            reason = f"retries_exhausted:{reason}"
        result = GenerationResult(
            request_id=request.id,
            error=reason,
            backend=self.endpoint.backend,
            model=request.model,
            attempts=attempts,
            latency_s=time.perf_counter() - started,
        )
        if self.cache is not None:
            self.cache.record_failure(result, run_id=self.run_id, permanent=permanent)
        return result

    # -- the stage ------------------------------------------------------------------------------

    async def run(self, requests: Sequence[GenerationRequest]) -> GenerationReport:
        """Generate every request (or find it in the cache); returns the report with results in
        completion order. Every request ends as a result, a failure, or skipped by the budget."""
        ledger = self.ledger
        report = ledger.start(planned=len(requests))
        self.limits.start_series()
        started = time.perf_counter()
        queue: asyncio.Queue[GenerationRequest] = asyncio.Queue()
        for req in requests:
            if not ledger.from_cache(req, self.cache, self.retry_failed):
                queue.put_nowait(req)
        if queue.empty():
            report.elapsed_s = time.perf_counter() - started
            report.limits = {self.endpoint.base_url: self.limits.state()}
            return report
        ep = self.endpoint
        n = ep.max_concurrency
        # retries are ours (Retry-After, jitter, failure accounting), not the transport's
        http = ChatHTTP(ep.base_url, ep.api_key, ep.timeout_s, n)

        async def worker() -> None:
            while not queue.empty():
                req = queue.get_nowait()
                estimate = ledger.reserve(req)
                if estimate is None:  # over the budget: skipped
                    continue
                try:
                    result = await self._complete(http, req, estimate)
                    if result.ok and writer is not None:
                        await writer.put(result)  # committed before this worker asks again
                        crash_point("generate.result")
                finally:
                    # released and accounted with no await between: no other worker sees
                    # the budget without this request's tokens
                    ledger.release(estimate)
                ledger.account(result, cached=False)

        writer = CacheWriter(self.cache) if self.cache is not None else None
        async with http, writer or contextlib.nullcontext():
            await asyncio.gather(*(worker() for _ in range(min(n, queue.qsize()))))
        report.elapsed_s = time.perf_counter() - started
        report.rate = self.limits.finish()
        report.limits = {self.endpoint.base_url: self.limits.state()}
        return report
