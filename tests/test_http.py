"""The live client's transport (generation/http.py) fails as the openai SDK does: for each fault
the fake server can answer with, the same request through `AsyncOpenAI.post` and through
`ChatHTTP.post` raises the same exception class, status, error code, message and headers, so
the client's retries and failure reasons read them alike; and a good answer is the same JSON."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import httpx2
import openai
import pytest

from booksmith.generation.http import ChatHTTP
from tests.fakeserver import FakeServer

BODY = {
    "model": "fake-model",
    "messages": [{"role": "user", "content": "Write about tides."}],
    "max_tokens": 64,
    "temperature": 0.7,
    "top_p": 1.0,
    "seed": 3,
}
TIMEOUT_S = 1.0


async def _through_sdk(base_url: str) -> Any:
    api = openai.AsyncOpenAI(base_url=base_url, api_key="k", max_retries=0, timeout=TIMEOUT_S)
    try:
        response = await api.post(
            "/chat/completions",
            body=BODY,
            cast_to=httpx2.Response,
            options={"security": {"bearer_auth": True}},
        )
        return json.loads(response.content)
    finally:
        await api.close()


async def _through_booksmith(base_url: str) -> Any:
    async with ChatHTTP(base_url, "k", TIMEOUT_S, 4) as http:
        return json.loads((await http.post(BODY)).content)


# What the client reads of a failure: the first of these classes it is, its status, the
# server's error code, its message (where "response_format" is looked for) and Retry-After.
KINDS = (openai.APITimeoutError, openai.APIConnectionError, openai.APIStatusError)


def _outcome(call: Any, base_url: str) -> Any:
    try:
        return asyncio.run(call(base_url))
    except openai.APIError as e:
        kind = next(k.__name__ for k in KINDS if isinstance(e, k))
        if not isinstance(e, openai.APIStatusError):
            return kind, None, None, None, {}
        headers = {k: v for k, v in e.response.headers.items() if k.startswith("retry-after")}
        return kind, e.status_code, e.code, str(e), headers


@pytest.mark.parametrize(
    "fault", ["none", "bad_request", "rate_limit", "server_error", "timeout", "drop"]
)
def test_the_transport_answers_and_fails_as_the_sdk_does(fault: str) -> None:
    faults: dict[str, Any] = {"transient_attempts": 1_000, "timeout_s": TIMEOUT_S * 3}
    if fault != "none":
        faults[fault] = 1.0
    with FakeServer(faults) as server:
        sdk = _outcome(_through_sdk, server.base_url)
        ours = _outcome(_through_booksmith, server.base_url)
    if fault == "none":
        assert isinstance(ours, dict) and ours["choices"][0]["message"]["content"]
        assert ours == sdk
        return
    assert isinstance(ours, tuple), ours
    assert ours == sdk
    expected = {
        "bad_request": ("APIStatusError", 400, None),
        "rate_limit": ("APIStatusError", 429, "rate_limit"),
        "timeout": ("APITimeoutError", None, None),
        "drop": ("APIConnectionError", None, None),
    }
    if fault in expected:
        assert ours[:3] == expected[fault]
    if fault == "rate_limit":
        assert ours[4]  # Retry-After reaches the backoff


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("bypass", [False, True])
def test_the_transport_honours_the_proxy_settings_as_the_sdk_does(
    bypass: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HTTP_PROXY sends the request to the proxy (here a port nothing listens on, so it fails to
    connect) unless NO_PROXY names the host: read once per session, not per request."""
    for name in ("HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    with FakeServer() as server:  # started first: its own start-up check goes direct
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{_closed_port()}")
        if bypass:
            monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        sdk = _outcome(_through_sdk, server.base_url)
        ours = _outcome(_through_booksmith, server.base_url)
    if bypass:
        assert isinstance(ours, dict) and ours == sdk
    else:
        assert ours == sdk == ("APIConnectionError", None, None, None, {})
