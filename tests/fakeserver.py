"""A deterministic, fault-injecting OpenAI-compatible server for tests and benchmarks.

Endpoints: POST /v1/chat/completions, GET /v1/models, GET /health, and the controls
GET /stats and POST /reset.

- The answer to a request is a pure function of its key fields (model, messages, temperature,
  top_p, max_tokens, seed): English-like words seeded from their sha256, so two runs can be
  compared for equality.
- Each request key draws one fault kind (or none) from the configured fractions, from a hash of
  the same fields: the fault plan is fixed by the config, whatever the order of the requests.
  Transient faults (429, 500/503, a reply held past `timeout_s`, a dropped connection) hit the
  first `transient_attempts` attempts of a key, then it succeeds; permanent (400,
  content_filter) and output (truncated, empty) faults hit every attempt.
- `--fast` answers every completion with one prebuilt reply from a bare asyncio protocol (no
  uvicorn, no hashing, no faults), so the server costs as little as possible in throughput
  benchmarks; /health, /v1/models, /stats (requests, completed) and /reset still answer.

Run: `python -m tests.fakeserver --port 0 --config faults.json --port-file PATH`, or use the
`FakeServer` context manager, which does that in a subprocess.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import hashlib
import importlib.util
import json
import math
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter, deque
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from booksmith.filters.faithfulness import TAGS
from booksmith.flows.cli_view import bind

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

TRANSIENT = ("rate_limit", "server_error", "timeout", "drop")
PERMANENT = ("bad_request", "content_filter")
OUTPUT = ("truncated", "empty")
FAULT_KINDS = TRANSIENT + PERMANENT + OUTPUT

DEFAULT_MODEL = "fake-model"
DEFAULT_MAX_TOKENS = 256
CREATED = 1_700_000_000  # a fixed timestamp keeps identical requests byte-identical


@dataclass
class FaultConfig:
    """Fractions of request keys that get each fault; they must sum to at most 1."""

    rate_limit: float = 0.0
    retry_after_s: float = 0.2
    server_error: float = 0.0
    timeout: float = 0.0
    timeout_s: float = 3.0  # how long a "timeout" reply is held (set the client's timeout lower)
    drop: float = 0.0
    truncated: float = 0.0
    empty: float = 0.0
    bad_request: float = 0.0
    content_filter: float = 0.0
    transient_attempts: int = 1
    latency_s: float = 0.0
    latency_jitter_s: float = 0.0
    # A share of clean answers that are a lightly edited copy of one of `near_duplicate_pool`
    # base texts (about `near_duplicate_edit` of the words replaced): near-duplicates of each
    # other, wherever their requests fall in a run, chosen from the key like everything else.
    near_duplicate: float = 0.0
    near_duplicate_pool: int = 4
    near_duplicate_edit: float = 0.01
    # A grounded request (its prompt quotes a passage in a recipe's <text> or <extract> tags) is
    # answered with the passage's own words in a new order (faithful: no long copied run, no
    # new number or name, its content words from the passage), except this share, answered
    # with unrelated words (off-source, as a model that ignored its source).
    unfaithful: float = 0.0
    # request key -> fault kind (or "none"): pins a key's fault whatever the fractions draw
    overrides: dict[str, str] = field(default_factory=dict)
    # The endpoint goes down: every request after this many answers a server error, retries
    # included (the circuit breaker's tests).
    fail_after: int | None = None
    # A server that wants a key: /v1/* without `Authorization: Bearer <api_key>` is a 401.
    api_key: str | None = None
    # The model names /v1/models lists (None: the server's own, `--model` or fake-model).
    models: list[str] | None = None
    # Answer every request that carries response_format with a 400 naming it, as an endpoint
    # without structured output does (counted as the fault "response_format").
    reject_response_format: bool = False
    # Answer a request with a response_format by a JSON value that follows its schema (words
    # seeded from the request), as vLLM or OpenAI do; off: such requests get prose too.
    structured_output: bool = False
    # A server-side rate limit that may change mid-run: [[from_s, requests_per_s], ...], the
    # times counted from the first chat request. Over the limit (a sliding 1 s window of the
    # requests let through), the answer is a 429 whose Retry-After (and retry-after-ms) says
    # when the window has room again (counted as the fault "server_rate_limit").
    rate_limit_schedule: list[list[float]] | None = None
    # Also send x-ratelimit-limit/remaining/reset-requests headers on every chat answer.
    rate_limit_headers: bool = False
    # Keep [seconds since the first chat request, status] per chat request in /stats
    # ("arrivals"), to check how a client spaced its requests.
    record_arrivals: bool = False
    # Other fault fractions for requests whose last message contains a text: {text: {kind:
    # fraction}} (the first text found wins), e.g. a subject whose documents are cut short
    # more often, to test that fill rounds compensate.
    prompt_faults: dict[str, dict[str, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        total = sum(getattr(self, kind) for kind in FAULT_KINDS)
        if any(getattr(self, kind) < 0 for kind in FAULT_KINDS) or total > 1 + 1e-9:
            raise ValueError(f"fault fractions must be >= 0 and sum to <= 1, got {total:.3f}")
        if not 0 <= self.near_duplicate <= 1 or self.near_duplicate_pool < 1:
            raise ValueError("near_duplicate must be in [0, 1] and near_duplicate_pool >= 1")
        if not 0 <= self.unfaithful <= 1:
            raise ValueError("unfaithful must be in [0, 1]")
        for key, kind in self.overrides.items():
            if kind not in (*FAULT_KINDS, "none"):
                raise ValueError(f"overrides[{key!r}]: unknown fault kind {kind!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FaultConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown FaultConfig keys {unknown}; expected some of {sorted(known)}"
            )
        return cls(**data)

    def fault_for(self, key: str, prompt: str = "") -> str | None:
        """The fault kind planned for a request key, or None for a clean answer."""
        if key in self.overrides:
            kind = self.overrides[key]
            return None if kind == "none" else kind
        rates = {kind: getattr(self, kind) for kind in FAULT_KINDS}
        for text, own in self.prompt_faults.items():
            if text in prompt:
                rates = {kind: own.get(kind, 0.0) for kind in FAULT_KINDS}
                break
        # An independent draw (salted hash), so the fault does not correlate with the text.
        u = _unit(f"fault:{key}")
        edge = 0.0
        for kind in FAULT_KINDS:
            edge += rates[kind]
            if u < edge:
                return kind
        return None


def _unit(text: str) -> float:
    """A uniform number in [0, 1) from a string, stable across processes and Python versions."""
    return int(hashlib.sha256(text.encode()).hexdigest()[:13], 16) / 16**13


def key_fields(body: dict[str, Any]) -> dict[str, Any]:
    """The fields that decide the answer; numbers normalised so 1 and 1.0 are the same key."""

    def num(value: Any) -> float | None:
        return None if value is None else float(value)

    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    return {
        "model": body.get("model"),
        "messages": body.get("messages"),
        "temperature": num(body.get("temperature")),
        "top_p": num(body.get("top_p")),
        "max_tokens": max_tokens,
        "seed": body.get("seed"),
    }


def request_key(body: dict[str, Any]) -> str:
    """The request key of a chat-completions body, as /stats reports it."""
    canonical = json.dumps(key_fields(body), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:24]


# -- the text ------------------------------------------------------------------------------------

# Function words at a natural share keep the text plausible to the heuristic filters (stop-word
# ratio, mean word length); a few hundred content words keep distinct documents distinct.
_FUNCTION_TEXT = (
    "the of and to a in is that for it as with was on be by this are or from at which an but "
    "not have has can its we they their these more also when one all so if each into than then"
)
_CONTENT_TEXT = (
    "energy matter system process value function change number example model theory force "
    "motion light water heat cell plant animal market price trade history culture language "
    "word sentence story author reader problem solution method result data pattern shape "
    "angle line point circle square triangle area volume length time speed rate growth "
    "population city river mountain climate weather season planet star orbit gravity mass "
    "atom molecule reaction element compound acid base solution mixture layer surface "
    "structure design tool machine engine circuit current voltage signal wave sound music "
    "rhythm color image picture map scale measure unit fraction ratio percent equation graph "
    "table chart variable constant factor product sum difference order sequence series limit "
    "proof idea concept principle rule law right duty citizen government vote economy money "
    "budget cost benefit choice decision risk chance probability sample survey evidence claim "
    "argument reason cause effect question answer lesson student teacher school class course "
    "practice skill habit memory attention emotion behavior society community family group "
    "member role network program code computer algorithm input output memory storage file "
    "record field object class method loop branch condition test error bug feature version "
    "simple careful basic important common natural small large early modern ancient central "
    "local global clear useful different similar careful strong weak quick slow bright "
    "explains shows describes compares measures builds changes moves grows forms carries "
    "connects divides combines produces supports follows predicts tests observes records "
    "notices finds keeps gives takes makes uses needs helps allows creates reduces increases"
)
_FUNCTION = _FUNCTION_TEXT.split()
_CONTENT = tuple(_CONTENT_TEXT.split())


@functools.lru_cache(maxsize=64)
def _vocabulary(content: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Every word in its four spellings (as is, Capitalised, with a full stop, both), and a
    draw table of word numbers in which the function words make 40% of the entries."""
    words = _FUNCTION + list(content)
    capitalised = [w.capitalize() for w in words]
    spellings = words + capitalised + [w + "." for w in words] + [w + "." for w in capitalised]
    # F*a / (F*a + C*b) = 0.4 with a = 2C, b = 3F entries per function and content word
    n_function, n_content = len(_FUNCTION), len(content)
    g = math.gcd(2 * n_content, 3 * n_function)
    counts = [2 * n_content // g] * n_function + [3 * n_function // g] * n_content
    table = np.repeat(np.arange(len(words)), counts)
    return np.array(spellings, dtype=object), table


def completion_text(key_digest: str, n_words: int, content: Sequence[str] = _CONTENT) -> str:
    """`n_words` English-like words in sentences of 6 to 16 (40% function words, the rest
    words of `content`), a pure function of the digest. Drawn in one pass from SHAKE-256 of
    the digest: the fake server shares the benchmark's cores, so it must cost little."""
    if n_words <= 0:
        return "."
    spellings, table = _vocabulary(content if isinstance(content, tuple) else tuple(content))
    n_sentences = n_words // 6 + 1
    stream = hashlib.shake_256(key_digest.encode()).digest(4 * (n_words + n_sentences))
    draws = np.frombuffer(stream, dtype="<u4")
    word = table[draws[:n_words] % len(table)]
    ends = np.cumsum(6 + draws[n_words:] % 11) - 1
    ends = ends[ends < n_words - 1]
    form = np.zeros(n_words, dtype=np.intp)  # 0 as is, 1 capitalised, 2 full stop, 3 both
    form[0] = 1
    form[ends + 1] = 1
    form[ends] += 2
    form[-1] |= 2  # the text ends a sentence
    return " ".join(spellings[word + form * (len(spellings) // 4)].tolist())


def json_schema_of(body: dict[str, Any]) -> dict[str, Any] | None:
    """The JSON schema a request's response_format asks for (json_object: any object)."""
    fmt = body.get("response_format")
    if not isinstance(fmt, dict):
        return None
    if fmt.get("type") == "json_object":
        return {"type": "object", "properties": {}}
    if fmt.get("type") == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema")
        return schema if isinstance(schema, dict) else None
    return None


def schema_instance(schema: dict[str, Any], rng: random.Random) -> Any:
    """A value that follows `schema` (the keywords booksmith's schemas use: object properties,
    arrays with item bounds, enums, strings with length bounds, integers), of seeded words,
    as a server with structured output would answer."""
    if "enum" in schema:
        return rng.choice(schema["enum"])
    kind = schema.get("type")
    if kind == "object":
        props = schema.get("properties", {})
        return {name: schema_instance(sub, rng) for name, sub in props.items()}
    if kind == "array":
        low = int(schema.get("minItems", 1))
        high = int(schema.get("maxItems", max(low, 3)))
        item = schema.get("items", {"type": "string"})
        return [schema_instance(item, rng) for _ in range(rng.randint(low, high))]
    if kind == "integer":
        return int(schema.get("minimum", 0))
    if kind == "boolean":
        return rng.random() < 0.5
    words = [rng.choice(_CONTENT) for _ in range(rng.randint(2, 3))]
    text = " ".join(words).capitalize()
    low, high = int(schema.get("minLength", 1)), int(schema.get("maxLength", 200))
    return (text + " " + "x" * max(0, low - len(text)))[:high].strip()


def near_duplicate_text(key: str, n_words: int, cfg: FaultConfig) -> str:
    """One of the pool's base texts with a few words replaced, both chosen from the key."""
    base = int(_unit(f"near-base:{key}") * cfg.near_duplicate_pool)
    words = completion_text(hashlib.sha256(f"pool:{base}".encode()).hexdigest(), n_words).split()
    rng = random.Random(f"near-edit:{key}")
    for _ in range(max(1, round(len(words) * cfg.near_duplicate_edit))):
        words[rng.randrange(len(words))] = rng.choice(_CONTENT)
    return " ".join(words)


def is_near_duplicate(key: str, cfg: FaultConfig) -> bool:
    return cfg.near_duplicate > 0 and _unit(f"near:{key}") < cfg.near_duplicate


def quoted_passage(body: dict[str, Any]) -> str | None:
    """The source passage a grounded request's last message quotes, if it quotes one."""
    users = [m for m in body["messages"] if isinstance(m, dict) and m.get("role") == "user"]
    prompt = str(users[-1].get("content") or "") if users else ""
    for start_tag, end_tag in TAGS:  # the recipes' tags, as the faithfulness rules read them
        start, end = prompt.find(start_tag), prompt.rfind(end_tag)
        if start >= 0 and end > start:
            return prompt[start + len(start_tag) : end]
    return None


def grounded_text(key_digest: str, n_words: int, passage: str) -> str:
    """Sentences of function words and the passage's own content words (4+ letters, lower
    case), drawn in a new order: a faithful rephrase as the faithfulness rules see it."""
    vocab = sorted({w.lower() for w in re.findall(r"[A-Za-z]{4,}", passage)})
    return completion_text(key_digest, n_words, vocab if len(vocab) >= 20 else _CONTENT)


# -- responses -----------------------------------------------------------------------------------

Headers = list[tuple[bytes, bytes]]


def _json_body(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _error(message: str, err_type: str, code: str | None = None) -> bytes:
    return _json_body(
        {"error": {"message": message, "type": err_type, "param": None, "code": code}}
    )


def _completion(
    key: str,
    model: str,
    content: str | None,
    finish_reason: str,
    prompt_tokens: int,
    completion_tokens: int,
) -> bytes:
    return _json_body(
        {
            "id": f"chatcmpl-{key}",
            "object": "chat.completion",
            "created": CREATED,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": finish_reason,
                    "logprobs": None,
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }
    )


async def _respond(send: Send, status: int, body: bytes, headers: Headers | None = None) -> None:
    base: Headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": base + (headers or [])})
    await send({"type": "http.response.body", "body": body})


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None if the client went away first."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _hold(receive: Receive, delay_s: float) -> bool:
    """Wait `delay_s`; True if the client disconnected meanwhile (it timed out or was killed).

    Once the body is read, receive() only returns on disconnect, so it doubles as a watch."""
    if delay_s <= 0:
        return False
    try:
        message = await asyncio.wait_for(receive(), delay_s)
    except TimeoutError:
        return False
    return message["type"] == "http.disconnect"


async def _drop(send: Send) -> None:
    """Close the connection with no HTTP response at all.

    ASGI has no verb for this, so we reach the transport through uvicorn's request cycle (the
    owner of the bound `send`). Yielding lets connection_lost mark the cycle disconnected, so
    uvicorn does not write a 500 of its own."""
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    if not isinstance(transport, asyncio.Transport):
        raise RuntimeError("cannot drop the connection: the server's transport is not reachable")
    transport.abort()
    for _ in range(3):
        await asyncio.sleep(0)


# -- the app -------------------------------------------------------------------------------------


class Stats:
    def __init__(self) -> None:
        self.requests = 0
        self.completed = 0
        self.by_key: Counter[str] = Counter()
        self.completed_by_key: Counter[str] = Counter()
        self.answered_by_key: Counter[str] = Counter()  # any 200 reply, faulty output included
        self.faults: Counter[str] = Counter()
        self.abandoned = 0  # replies the client did not wait for
        self.connections = 0  # TCP connections opened (fast mode only): shows pool churn
        self.arrivals: list[tuple[float, int]] = []  # (s since the first request, status)

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "completed": self.completed,
            "by_key": dict(self.by_key),
            "completed_by_key": dict(self.completed_by_key),
            "answered_by_key": dict(self.answered_by_key),
            "faults": dict(self.faults),
            "abandoned": self.abandoned,
            "connections": self.connections,
            "arrivals": [[round(t, 4), status] for t, status in self.arrivals],
        }


class FakeApp:
    """The ASGI app; one instance per server process, its state lives in memory."""

    def __init__(self, faults: FaultConfig | None = None, *, models: list[str] | None) -> None:
        self.faults = faults or FaultConfig()
        self.models = self.faults.models or models or [DEFAULT_MODEL]
        self.stats = Stats()
        self.first_request: float | None = None
        self.window: deque[float] = deque()  # requests let through in the last second

    def _rate_limit(self, now: float) -> tuple[float | None, Headers]:
        """(seconds to wait, None if let through; x-ratelimit headers) under the schedule."""
        assert self.first_request is not None
        schedule = self.faults.rate_limit_schedule or []
        elapsed = now - self.first_request
        limit = math.inf
        for start, per_s in schedule:
            if elapsed >= start:
                limit = per_s
        window = self.window
        while window and window[0] <= now - 1.0:
            window.popleft()
        wait = None
        if len(window) >= limit:
            wait = max(0.001, window[0] + 1.0 - now)
        else:
            window.append(now)
        headers: Headers = []
        if self.faults.rate_limit_headers and limit < math.inf:
            reset = max(0.001, window[0] + 1.0 - now) if window else 0.001
            headers = [
                (b"x-ratelimit-limit-requests", str(int(limit)).encode()),
                (b"x-ratelimit-remaining-requests", str(max(0, int(limit) - len(window))).encode()),
                (b"x-ratelimit-reset-requests", f"{round(reset * 1000)}ms".encode()),
            ]
        return wait, headers

    def control(self, method: str, path: str) -> tuple[int, bytes]:
        """Every route but chat completions: status and JSON body."""
        if path == "/health":
            return 200, b'{"status":"ok"}'
        if path == "/v1/models":
            data = [
                {"id": m, "object": "model", "created": CREATED, "owned_by": "fake"}
                for m in self.models
            ]
            return 200, _json_body({"object": "list", "data": data})
        if path == "/stats":
            return 200, _json_body(self.stats.as_dict())
        if path == "/reset" and method == "POST":
            self.stats = Stats()
            self.first_request = None
            self.window.clear()
            return 200, b'{"status":"reset"}'
        return 404, _error(f"no route {method} {path}", "not_found")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        key = self.faults.api_key
        if key and path.startswith("/v1/"):
            given = dict(scope.get("headers") or []).get(b"authorization", b"").decode()
            if given != f"Bearer {key}":
                body = _error("Incorrect API key provided (fake).", "invalid_api_key")
                await _respond(send, 401, body)
                return
        if path == "/v1/chat/completions" and method == "POST":
            await self._chat(receive, send)
        else:
            await _respond(send, *self.control(method, path))

    async def _chat(self, receive: Receive, send: Send) -> None:
        stats, cfg = self.stats, self.faults
        stats.requests += 1
        raw = await _read_body(receive)
        if raw is None:
            return
        now = time.monotonic()
        if self.first_request is None:
            self.first_request = now
        limit_headers: Headers = []
        if cfg.rate_limit_schedule:
            wait, limit_headers = self._rate_limit(now)
            if wait is not None:
                stats.faults["server_rate_limit"] += 1
                if cfg.record_arrivals:
                    stats.arrivals.append((now - self.first_request, 429))
                headers = [
                    (b"retry-after", f"{wait:.3f}".encode()),
                    (b"retry-after-ms", str(round(wait * 1000)).encode()),
                    *limit_headers,
                ]
                body_429 = _error("Rate limit reached (fake).", "rate_limit_exceeded", "rate_limit")
                await _respond(send, 429, body_429, headers)
                return
        if cfg.record_arrivals:
            stats.arrivals.append((now - self.first_request, 200))
        try:
            body = json.loads(raw)
            if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
                raise ValueError("expected an object with a 'messages' list")
        except ValueError as exc:
            await _respond(send, 400, _error(f"bad body: {exc}", "invalid_request_error"))
            return

        key = request_key(body)
        stats.by_key[key] += 1
        attempt = stats.by_key[key]
        messages = body["messages"]
        prompt = str(messages[-1].get("content", "")) if messages else ""
        fault = cfg.fault_for(key, prompt)
        if fault in TRANSIENT and attempt > cfg.transient_attempts:
            fault = None
        if cfg.fail_after is not None and stats.requests > cfg.fail_after:
            fault = "server_error"
        info: Headers = [
            (b"x-fake-key", key.encode()),
            (b"x-fake-attempt", str(attempt).encode()),
            (b"x-fake-fault", (fault or "none").encode()),
            *limit_headers,
        ]

        if cfg.reject_response_format and body.get("response_format") is not None:
            stats.faults["response_format"] += 1
            message = "response_format is not supported by this server (fake)."
            await _respond(send, 400, _error(message, "invalid_request_error"), info)
            return

        delay = cfg.latency_s + cfg.latency_jitter_s * _unit(f"latency:{key}:{attempt}")
        if await _hold(receive, delay):
            stats.abandoned += 1
            return
        if fault is not None:
            stats.faults[fault] += 1

        if fault == "rate_limit":
            retry = f"{cfg.retry_after_s:g}".encode()
            ms = str(round(cfg.retry_after_s * 1000)).encode()
            headers = [(b"retry-after", retry), (b"retry-after-ms", ms), *info]
            body_429 = _error("Rate limit reached (fake).", "rate_limit_exceeded", "rate_limit")
            await _respond(send, 429, body_429, headers)
            return
        if fault == "server_error":
            status = 503 if _unit(f"status:{key}") < 0.5 else 500
            await _respond(send, status, _error("Server error (fake).", "server_error"), info)
            return
        if fault == "timeout":
            if await _hold(receive, cfg.timeout_s):
                return  # the client gave up, as intended
            await _respond(send, 504, _error("Held past timeout (fake).", "timeout"), info)
            return
        if fault == "drop":
            await _drop(send)
            return
        if fault == "bad_request":
            message = "Invalid request (fake permanent fault)."
            await _respond(send, 400, _error(message, "invalid_request_error"), info)
            return

        model = str(body.get("model") or self.models[0])
        max_tokens = int(key_fields(body)["max_tokens"] or DEFAULT_MAX_TOKENS)
        prompt_words = sum(
            len(str(m.get("content") or "").split())
            for m in body["messages"]
            if isinstance(m, dict)
        )
        prompt_tokens = max(1, round(prompt_words * 1.3))
        digest = hashlib.sha256(f"text:{key}".encode()).hexdigest()
        n_words = max(1, int(max_tokens * 0.75))
        if fault == "content_filter":
            reply = _completion(key, model, None, "content_filter", prompt_tokens, 0)
        elif fault == "empty":
            reply = _completion(key, model, "", "stop", prompt_tokens, 0)
        elif fault == "truncated":
            # Cut mid-word at about 60% of the text, as a model that ran out of tokens does.
            text = completion_text(digest, n_words)
            cut = text[: max(1, int(len(text) * 0.6))]
            reply = _completion(key, model, cut, "length", prompt_tokens, max_tokens)
        elif cfg.structured_output and (schema := json_schema_of(body)) is not None:
            text = json.dumps(schema_instance(schema, random.Random(digest)))
            tokens = max(1, len(text.split()))
            reply = _completion(key, model, text, "stop", prompt_tokens, tokens)
        else:
            passage = quoted_passage(body)
            if is_near_duplicate(key, cfg):
                text = near_duplicate_text(key, n_words, cfg)
            elif passage is not None and _unit(f"unfaithful:{key}") >= cfg.unfaithful:
                text = grounded_text(digest, n_words, passage)
            else:
                text = completion_text(digest, n_words)
            tokens = min(max_tokens, math.ceil(n_words / 0.75))
            reply = _completion(key, model, text, "stop", prompt_tokens, tokens)
        await _respond(send, 200, reply, info)
        stats.answered_by_key[key] += 1
        if fault is None:
            stats.completed += 1
            stats.completed_by_key[key] += 1


# -- running it ----------------------------------------------------------------------------------


def _http_impl() -> str:
    return "httptools" if importlib.util.find_spec("httptools") else "h11"


class FastProtocol(asyncio.Protocol):
    """Fast mode: HTTP/1.1 keep-alive with just enough parsing for the OpenAI client
    (Content-Length bodies, no chunked uploads; pipelined requests are answered in order).

    A completion costs a find() and one write() of prebuilt bytes: this serves over 50k req/s
    on one core where uvicorn/h11 serves about 1.4k, so a benchmark on a small machine measures
    the client, not us."""

    def __init__(self, app: FakeApp, reply: bytes) -> None:
        self.app = app
        self.reply = reply
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.app.stats.connections += 1

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            head = bytes(self.buf[:end]).lower()
            length = 0
            if (i := head.find(b"\r\ncontent-length:")) >= 0:
                j = head.find(b"\r\n", i + 2)
                length = int(head[i + 17 : j if j >= 0 else len(head)])
            if len(self.buf) < end + 4 + length:
                return  # the body is still arriving
            del self.buf[: end + 4 + length]
            method, path = head.split(b" ", 2)[:2]
            if path == b"/v1/chat/completions":
                self.app.stats.requests += 1
                self.app.stats.completed += 1
                self.transport.write(self.reply)
            else:
                status, body = self.app.control(method.decode().upper(), path.decode())
                self.transport.write(_http_response(status, body))
            if b"\r\nconnection: close" in head:
                self.transport.close()
                return


def _http_response(status: int, body: bytes) -> bytes:
    reason = {200: b"OK", 404: b"Not Found"}.get(status, b"")
    head = b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
    return head % (status, reason, len(body)) + body


def _write_port(port_file: Path | None, port: int) -> None:
    if port_file is not None:
        tmp = port_file.with_name(port_file.name + ".tmp")
        tmp.write_text(str(port))
        os.replace(tmp, port_file)  # atomic: the parent never reads a half-written port


async def serve(
    app: FakeApp,
    host: str = "127.0.0.1",
    port: int = 0,
    port_file: Path | None = None,
    *,
    fast: bool = False,
) -> None:
    # Bind ourselves so that --port 0 gives us the port to report; with the viewer's `bind`,
    # whose socket gets Nagle off (without it every reply waits ~40 ms for a delayed ACK).
    sock = bind(host, port)
    bound = sock.getsockname()[1]
    if fast:
        text = "This is a fixed fast completion."
        reply = _http_response(200, _completion("fast", app.models[0], text, "stop", 8, 8))
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: FastProtocol(app, reply), sock=sock, backlog=4096)
        _write_port(port_file, bound)
        await server.serve_forever()
        return

    import uvicorn

    config = uvicorn.Config(
        app,
        http=_http_impl(),
        loop="asyncio",
        lifespan="off",
        access_log=False,
        log_level="warning",
        backlog=4096,
        timeout_keep_alive=30,
    )
    userver = uvicorn.Server(config)
    task = asyncio.create_task(userver.serve(sockets=[sock]))
    while not userver.started and not task.done():
        await asyncio.sleep(0.01)
    if userver.started:
        _write_port(port_file, bound)
    await task


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--config", type=Path, help="JSON file of FaultConfig fields")
    parser.add_argument("--port-file", type=Path, help="write the bound port here once listening")
    parser.add_argument("--fast", action="store_true", help="one prebuilt reply, no faults")
    parser.add_argument("--model", action="append", help="model name(s) for /v1/models")
    args = parser.parse_args(argv)
    faults = FaultConfig.from_dict(json.loads(args.config.read_text())) if args.config else None
    app = FakeApp(faults, models=args.model)
    asyncio.run(serve(app, args.host, args.port, args.port_file, fast=args.fast))


class FakeServer:
    """Runs the fake server in a subprocess for the length of a `with` block.

    >>> with FakeServer({"rate_limit": 0.1}) as server:
    ...     client = AsyncOpenAI(base_url=server.base_url, api_key="x")
    """

    def __init__(
        self,
        faults: FaultConfig | dict[str, Any] | None = None,
        fast: bool = False,
        *,
        startup_timeout_s: float = 30.0,
    ) -> None:
        if isinstance(faults, dict):
            faults = FaultConfig.from_dict(faults)
        self.faults = faults or FaultConfig()
        self.fast = fast
        self.startup_timeout_s = startup_timeout_s
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def start(self) -> FakeServer:
        self._tmp = tempfile.TemporaryDirectory(prefix="fakeserver-")
        tmp = Path(self._tmp.name)
        (tmp / "faults.json").write_text(json.dumps(asdict(self.faults)))
        port_file = tmp / "port"
        root = Path(__file__).resolve().parents[1]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
        cmd = [sys.executable, "-m", "tests.fakeserver", "--port", "0"]
        cmd += ["--config", str(tmp / "faults.json"), "--port-file", str(port_file)]
        if self.fast:
            cmd.append("--fast")
        self._proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + self.startup_timeout_s
        while not port_file.exists():
            if self._proc.poll() is not None:
                self.kill()
                raise RuntimeError(f"fake server exited with {self._proc.returncode} at start")
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError("fake server did not start in time")
            time.sleep(0.02)
        self.port = int(port_file.read_text())
        self._get("/health")
        return self

    def _get(self, path: str, method: str = "GET") -> dict[str, Any]:
        req = urllib.request.Request(
            self.url + path, method=method, data=b"" if method == "POST" else None
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            data: dict[str, Any] = json.loads(resp.read())
        return data

    def stats(self) -> dict[str, Any]:
        return self._get("/stats")

    def reset(self) -> None:
        self._get("/reset", method="POST")

    def kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> FakeServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()


if __name__ == "__main__":
    main()
