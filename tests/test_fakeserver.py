"""The fake OpenAI-compatible server, exercised with the real AsyncOpenAI client."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.fakeserver import (
    _CONTENT,
    _FUNCTION,
    FAULT_KINDS,
    FakeServer,
    FaultConfig,
    completion_text,
    request_key,
)

FAULTS = FaultConfig(
    rate_limit=0.1,
    retry_after_s=0.25,
    server_error=0.1,
    timeout=0.1,
    timeout_s=1.0,
    drop=0.1,
    truncated=0.1,
    empty=0.1,
    bad_request=0.1,
    content_filter=0.1,
    transient_attempts=2,
)


def body(i: int, max_tokens: int = 40) -> dict[str, Any]:
    return {
        "model": "fake-model",
        "messages": [{"role": "user", "content": f"Write about topic number {i}."}],
        "max_tokens": max_tokens,
        "temperature": 0.7,
        "top_p": 0.95,
        "seed": i,
    }


def body_with(fault: str | None, start: int = 0) -> dict[str, Any]:
    """The first request body (from `start`) whose key the plan gives `fault`."""
    for i in range(start, start + 10_000):
        b = body(i)
        if FAULTS.fault_for(request_key(b)) == fault:
            return b
    raise AssertionError(f"no key draws {fault}")


def test_completion_text_is_english_like_sentences() -> None:
    """Sentences of 6 to 16 words, each capitalised and closed by a full stop; about 40% function
    words; a pure function of the digest; and only the words it was given."""
    texts = [completion_text(f"{i:064x}", 500) for i in range(20)]
    assert texts[3] == completion_text(f"{3:064x}", 500)
    assert len(set(texts)) == len(texts)
    words = [w for t in texts for w in t.split()]
    assert len(words) == 20 * 500
    share = sum(w.rstrip(".").lower() in _FUNCTION for w in words) / len(words)
    assert 0.37 < share < 0.43
    for text in texts:
        sentences = [s.split() for s in text.split(". ")]
        assert text.endswith(".")
        assert all(s[0][0].isupper() and not any(w[0].isupper() for w in s[1:]) for s in sentences)
        assert all(6 <= len(s) <= 16 for s in sentences[:-1])
        assert 1 <= len(sentences[-1]) <= 16
    grounded = completion_text("ab" * 32, 300, ("photosynthesis", "chlorophyll"))
    assert {w.rstrip(".").lower() for w in grounded.split()} - set(_FUNCTION) == {
        "photosynthesis",
        "chlorophyll",
    }
    assert set(_CONTENT) & {w.rstrip(".").lower() for w in words} == set(_CONTENT)


@pytest.fixture(scope="module")
def server() -> Iterator[FakeServer]:
    with FakeServer(FAULTS) as s:
        yield s


def client(server: FakeServer, timeout: float = 5.0) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=timeout)


def test_fault_plan_follows_the_fractions() -> None:
    kinds = [FAULTS.fault_for(request_key(body(i))) for i in range(4000)]
    for kind in FAULT_KINDS:
        assert 0.07 < kinds.count(kind) / len(kinds) < 0.13, kind
    assert 0.17 < kinds.count(None) / len(kinds) < 0.23
    with pytest.raises(ValueError, match="sum to <= 1"):
        FaultConfig(rate_limit=0.6, drop=0.6)
    with pytest.raises(ValueError, match="unknown FaultConfig keys"):
        FaultConfig.from_dict({"rate_limt": 0.1})


async def test_same_body_same_answer(server: FakeServer) -> None:
    api = client(server)
    b = body_with(None)
    first = await api.chat.completions.create(**b)
    second = await api.chat.completions.create(**b)
    assert first.model_dump() == second.model_dump()
    other = await api.chat.completions.create(**{**b, "seed": b["seed"] + 10_000})
    choice = first.choices[0]
    assert choice.message.content != other.choices[0].message.content
    assert choice.finish_reason == "stop"
    assert first.usage is not None
    assert first.usage.completion_tokens <= b["max_tokens"]
    assert len((choice.message.content or "").split()) == int(b["max_tokens"] * 0.75)
    assert isinstance(first.usage.prompt_tokens, int) and first.usage.prompt_tokens > 0
    await api.close()


async def test_rate_limit_has_retry_after_then_clears(server: FakeServer) -> None:
    api = client(server)
    b = body_with("rate_limit")
    for _ in range(FAULTS.transient_attempts):
        with pytest.raises(openai.RateLimitError) as info:
            await api.chat.completions.create(**b)
        assert info.value.response.headers["retry-after"] == "0.25"
        assert info.value.response.headers["retry-after-ms"] == "250"
    ok = await api.chat.completions.create(**b)
    assert ok.choices[0].finish_reason == "stop"
    await api.close()


async def test_server_error_then_clears(server: FakeServer) -> None:
    api = client(server)
    b = body_with("server_error")
    for _ in range(FAULTS.transient_attempts):
        with pytest.raises(openai.InternalServerError) as info:
            await api.chat.completions.create(**b)
        assert info.value.status_code in (500, 503)
    assert (await api.chat.completions.create(**b)).choices[0].message.content
    await api.close()


async def test_timeout_then_clears(server: FakeServer) -> None:
    api = client(server, timeout=0.2)
    b = body_with("timeout")
    for _ in range(FAULTS.transient_attempts):
        started = time.perf_counter()
        with pytest.raises(openai.APITimeoutError):
            await api.chat.completions.create(**b)
        assert time.perf_counter() - started < FAULTS.timeout_s
    assert (await api.chat.completions.create(**b)).choices[0].message.content
    await api.close()


async def test_timeout_past_a_patient_client_is_a_504(server: FakeServer) -> None:
    api = client(server, timeout=5.0)
    with pytest.raises(openai.APIStatusError) as info:
        await api.chat.completions.create(**body_with("timeout", start=20_000))
    assert info.value.status_code == 504
    await api.close()


async def test_dropped_connection(server: FakeServer) -> None:
    api = client(server)
    b = body_with("drop")
    for _ in range(FAULTS.transient_attempts):
        with pytest.raises(openai.APIConnectionError) as info:
            await api.chat.completions.create(**b)
        assert not isinstance(info.value, openai.APITimeoutError)
    assert (await api.chat.completions.create(**b)).choices[0].message.content
    await api.close()


async def test_permanent_faults_stay(server: FakeServer) -> None:
    api = client(server)
    bad, filtered = body_with("bad_request"), body_with("content_filter")
    for _ in range(FAULTS.transient_attempts + 1):
        with pytest.raises(openai.BadRequestError) as info:
            await api.chat.completions.create(**bad)
        assert info.value.response.json()["error"]["type"] == "invalid_request_error"
        answer = await api.chat.completions.create(**filtered)
        assert answer.choices[0].finish_reason == "content_filter"
        assert not answer.choices[0].message.content
    await api.close()


async def test_output_faults(server: FakeServer) -> None:
    api = client(server)
    b = body_with("truncated")
    truncated = await api.chat.completions.create(**b)
    clean = await api.chat.completions.create(**body_with(None))
    assert truncated.choices[0].finish_reason == "length"
    assert truncated.usage is not None and truncated.usage.completion_tokens == b["max_tokens"]
    cut = truncated.choices[0].message.content or ""
    assert 0 < len(cut) < len(clean.choices[0].message.content or "")
    empty = await api.chat.completions.create(**body_with("empty"))
    assert empty.choices[0].message.content == ""
    assert empty.choices[0].finish_reason == "stop"
    await api.close()


async def test_stats_and_reset(server: FakeServer) -> None:
    server.reset()
    api = client(server)
    clean, limited, empty = body_with(None), body_with("rate_limit"), body_with("empty")
    await api.chat.completions.create(**clean)
    await api.chat.completions.create(**clean)
    await api.chat.completions.create(**empty)
    for _ in range(FAULTS.transient_attempts):
        with pytest.raises(openai.RateLimitError):
            await api.chat.completions.create(**limited)
    await api.chat.completions.create(**limited)
    stats = server.stats()
    k_clean, k_limited, k_empty = map(request_key, (clean, limited, empty))
    assert stats["requests"] == 4 + FAULTS.transient_attempts
    assert stats["completed"] == 3  # the empty answer is a fault, not a completion
    assert stats["by_key"] == {k_clean: 2, k_limited: 3, k_empty: 1}
    assert stats["completed_by_key"] == {k_clean: 2, k_limited: 1}
    assert stats["answered_by_key"][k_empty] == 1
    server.reset()
    assert server.stats()["requests"] == 0
    await api.close()


async def test_latency_and_abandoned_replies_are_not_completions() -> None:
    faults = FaultConfig(latency_s=0.3, overrides={request_key(body(1)): "none"})
    with FakeServer(faults) as server:
        api = client(server, timeout=5.0)
        started = time.perf_counter()
        await api.chat.completions.create(**body(1))
        assert time.perf_counter() - started >= 0.3
        impatient = client(server, timeout=0.1)
        with pytest.raises(openai.APITimeoutError):
            await impatient.chat.completions.create(**body(2))
        time.sleep(0.1)  # let the server see the disconnect
        stats = server.stats()
        assert stats["completed"] == 1 and stats["abandoned"] == 1
        await api.close()
        await impatient.close()


async def test_fast_mode_and_models() -> None:
    with FakeServer(fast=True) as server:
        api = client(server)
        a = await api.chat.completions.create(**body(1))
        b = await api.chat.completions.create(**body(2))
        assert a.choices[0].message.content == b.choices[0].message.content
        models = await api.models.list()
        assert [m.id for m in models.data] == ["fake-model"]
        assert server.stats()["completed"] == 2
        await api.close()
