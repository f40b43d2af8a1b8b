"""Preflight: what a run needs, checked in seconds before it plans or spends anything.

Each endpoint answers (its `/models`), accepts the key (a 401/403 is a bad key, not a fault to
retry) and serves the configured model; the output directory is writable with room left;
Redis answers when the MinHash index lives there; the export target (`export.to`) exists and
takes the credentials. Every problem found is one line naming the setting and the fix, and all
of them are reported at once. `booksmith run` and `topics expand` call it before Prefect
starts; their flows call it again (a scheduled run has no CLI in front of it). The export and
train commands check their targets with shards/reachable.py the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from booksmith.generation.backends import BackendError, api_key, model_name
from booksmith.schemas.config import RunConfig
from booksmith.schemas.redact import redact_url
from booksmith.shards.bundled import ModelNotInstalledError, bundled_gguf
from booksmith.shards.reachable import export_target, writable_dir

CONNECT_TIMEOUT_S = 5.0  # a preflight, not a generation: a live server answers /models at once


class PreflightFailed(ValueError):
    """The problems preflight found, one per line."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def preflight(cfg: RunConfig) -> list[str]:
    """Every problem that would stop the run, as lines naming the setting and the fix."""
    problems = [*_endpoints(cfg), *writable_dir(cfg.output.dir, "output.dir"), *_redis(cfg)]
    if cfg.export.to:
        problems += export_target(cfg.export.to, "export.to")
    return problems


def check(cfg: RunConfig) -> None:
    """Raise PreflightFailed with every problem, if there is any."""
    raise_if(preflight(cfg))


def check_expand(cfg: RunConfig, output: Path) -> None:
    """`topics expand`: the endpoint, and the topic file's directory."""
    raise_if([*_endpoints(cfg), *writable_dir(output.parent, "--output")])


def raise_if(problems: list[str]) -> None:
    if problems:
        raise PreflightFailed(problems)


def _endpoints(cfg: RunConfig) -> list[str]:
    gen = cfg.generation
    if gen.backend == "embedded" and gen.base_url is None and not gen.endpoints:
        try:  # booksmith starts the server itself: the model file is what it needs
            if cfg.embedded.model_path is None:
                bundled_gguf()
            elif not cfg.embedded.model_path.is_file():
                return [f"embedded.model_path: {cfg.embedded.model_path} is not a file"]
        except ModelNotInstalledError as e:
            return [f"generation.backend: {e}"]
        return []
    try:
        model = model_name(gen)
    except BackendError as e:
        return [str(e)]
    targets = [("generation.base_url", gen.base_url or "https://api.openai.com/v1", gen)]
    if gen.endpoints:
        targets = [
            (
                f"generation.endpoints[{i}].base_url",
                e.base_url,
                gen.model_copy(update={"base_url": e.base_url,
                                       "api_key_env": e.api_key_env or gen.api_key_env}),
            )
            for i, e in enumerate(gen.endpoints)
        ]  # fmt: skip
    problems = []
    for setting, url, settings in targets:
        try:
            key = api_key(settings)
        except BackendError as e:
            problems.append(str(e))
            continue
        problems += _endpoint(setting, url, key, settings.api_key_env, model)
    return problems


def _endpoint(setting: str, url: str, key: str, key_env: str, model: str) -> list[str]:
    """One endpoint: its /models, or a 1-token request where /models is missing."""
    shown = redact_url(url)
    headers = {"Authorization": f"Bearer {key}"}
    try:
        reply = httpx.get(url.rstrip("/") + "/models", headers=headers, timeout=CONNECT_TIMEOUT_S)
        if reply.status_code in (404, 405):  # no /models (some proxies): ask for one token
            reply = httpx.post(
                url.rstrip("/") + "/chat/completions",
                headers=headers,
                json={"model": model, "max_tokens": 1,
                      "messages": [{"role": "user", "content": "ping"}]},
                timeout=CONNECT_TIMEOUT_S * 6,  # a real generation, if a short one
            )  # fmt: skip
    except httpx.HTTPError as e:
        return [_unreachable(setting, shown, e)]
    status = reply.status_code
    if status in (401, 403):
        return [
            f"generation.api_key_env: {shown} refused the key in ${key_env} "
            f"(HTTP {status}); set a valid key"
        ]
    body = _json(reply)
    if body is None:
        kind = reply.headers.get("content-type", "no content type").split(";")[0]
        return [
            f"{setting}: {shown} answered {kind} (HTTP {status}), not an OpenAI-compatible "
            "API's JSON; check the URL (a web page, a login or a proxy's error page?)"
        ]
    if status == 404:
        message = str(body.get("error", {}).get("message", "")) if isinstance(body, dict) else ""
        if "model" in message.lower():  # vLLM and OpenAI: 404 for a model they do not serve
            return [f"generation.model: {model!r} is not served at {shown} ({message})"]
        return [
            f"{setting}: {shown} has no OpenAI-compatible API at this path (/models and "
            "/chat/completions answer 404); check the path: such servers serve under /v1, "
            "e.g. http://host:8000/v1"
        ]
    if status != 200:
        return []  # a server error now may pass; the run's retries and breaker handle it
    served = _served(body)
    if served and model not in served:
        listed = ", ".join(served[:10]) + (", ..." if len(served) > 10 else "")
        return [f"generation.model: {model!r} is not served at {shown} (it serves: {listed})"]
    return []


def _unreachable(setting: str, shown: str, e: httpx.HTTPError) -> str:
    reason = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, httpx.ConnectError) and ("SSL" in reason or "CERTIFICATE" in reason):
        return (
            f"{setting}: TLS with {shown} failed ({reason}); if the server's certificate comes "
            "from your own CA, point SSL_CERT_FILE at its bundle, or fix the URL"
        )
    return f"{setting}: nothing answers at {shown} ({reason}); start the server or fix the URL"


def _json(reply: httpx.Response) -> Any:
    try:
        return reply.json()
    except ValueError:
        return None


def _served(body: Any) -> list[str]:
    """The model ids of a /models answer (none for a chat completion's)."""
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        return []
    return [str(m["id"]) for m in data if isinstance(m, dict) and "id" in m]


def _redis(cfg: RunConfig) -> list[str]:
    d = cfg.dedup
    if d.index != "redis" or not d.redis_url:
        return []
    import redis

    try:
        client = redis.Redis.from_url(d.redis_url, socket_connect_timeout=CONNECT_TIMEOUT_S)
        client.ping()
    except (redis.RedisError, ValueError) as e:
        where = redact_url(d.redis_url)  # never print a password in the URL
        return [f"dedup.redis_url: Redis at {where} does not answer ({e}); start it or fix it"]
    return []
