"""The live client's HTTP: chat completions POSTed over one aiohttp session.

Why not the openai SDK's own transport: against the fake server, a request through
`AsyncOpenAI.post` (its request builder, then httpx2 and httpcore's connection pool) cost 0.91
ms of CPU, through a bare httpx2 client 0.64-0.71, and through aiohttp (its HTTP parser is C)
0.18 (`benchmarks/run_scale.py`'s note in BENCHMARKS.md). Generation shares the machine with
the filters, so its CPU is the run's time. The SDK stays the project's vocabulary for what went
wrong: a failed request raises the openai exception the SDK would have raised (status errors
with the server's error body and headers, APITimeoutError, APIConnectionError), so the client's
retry and failure accounting (generation/client.py) reads them as before. The Batch API
backend and the embedded launcher still use the SDK, where CPU does not matter.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import aiohttp
import httpx2
import openai
from aiohttp.helpers import get_env_proxy_for_url
from multidict import CIMultiDictProxy
from yarl import URL

from booksmith import __version__


@dataclass
class Answer:
    """A 2xx answer: its body, unparsed, and its headers (the adaptive limits read them)."""

    status: int
    headers: CIMultiDictProxy[str]
    content: bytes


class ChatHTTP:
    """POST /chat/completions to one endpoint with at most `connections` open at once.
    `timeout_s` bounds connecting and each wait for data, as the SDK's timeout did."""

    def __init__(self, base_url: str, api_key: str, timeout_s: float, connections: int) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self._headers = {
            "Authorization": f"Bearer {api_key}",
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": f"booksmith/{__version__}",
        }
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=timeout_s, sock_connect=timeout_s, sock_read=timeout_s
        )
        self._connections = connections
        self._session: aiohttp.ClientSession | None = None
        self._proxy: tuple[URL, aiohttp.BasicAuth | None] | None = None

    async def __aenter__(self) -> ChatHTTP:
        connector = aiohttp.TCPConnector(limit=self._connections, limit_per_host=0)
        # HTTP(S)_PROXY and NO_PROXY, as httpx honoured them, looked up once: aiohttp's
        # trust_env looks them up (and reads ~/.netrc) in a thread for every request, a fifth
        # of the client's CPU per request, and its netrc credentials would clash with our
        # Authorization header.
        self._proxy = None
        with contextlib.suppress(LookupError):
            self._proxy = get_env_proxy_for_url(URL(self.url))
        self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def post(self, body: dict[str, Any]) -> Answer:
        assert self._session is not None, "use `async with ChatHTTP(...)`"
        data = json.dumps(body).encode()
        try:
            proxy, proxy_auth = self._proxy or (None, None)
            async with self._session.post(
                self.url, data=data, headers=self._headers, proxy=proxy, proxy_auth=proxy_auth
            ) as r:
                content = await r.read()
                status, headers = r.status, r.headers
        except TimeoutError:  # aiohttp's ServerTimeoutError is one too (and a ClientError)
            raise openai.APITimeoutError(request=self._request()) from None
        except aiohttp.ClientError as e:
            raise openai.APIConnectionError(
                message=f"Connection error: {e}", request=self._request()
            ) from e
        if status >= 400:
            raise self._status_error(status, headers, content)
        return Answer(status, headers, content)

    def _request(self) -> httpx2.Request:
        return httpx2.Request("POST", self.url)

    def _status_error(
        self, status: int, headers: CIMultiDictProxy[str], content: bytes
    ) -> openai.APIStatusError:
        """The exception the SDK raises for this answer: its message names the server's
        error message, its `body` is the error object (`code` read from it)."""
        response = httpx2.Response(
            status, headers=list(headers.items()), content=content, request=self._request()
        )
        message = f"Error code: {status}"
        text = content.decode("utf-8", "replace").strip()
        body: Any
        try:
            parsed = json.loads(text)
        except ValueError:
            body = text
        else:
            body = parsed.get("error", parsed) if isinstance(parsed, dict) else parsed
            said = body.get("message") if isinstance(body, dict) else None
            if isinstance(said, str) and said:
                message += f" - {said}"
        return openai.APIStatusError(message, response=response, body=body)
