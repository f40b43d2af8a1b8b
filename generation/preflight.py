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
    try:
        reply = httpx.get(
            url.rstrip("/") + "/models",
            headers={"Authorization": f"Bearer {key}"},
            timeout=httpx.Timeout(CONNECT_TIMEOUT_S),
        )
    except httpx.HTTPError as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        url = redact_url(url)
        return [f"{setting}: nothing answers at {url} ({reason}); start the server or fix the URL"]
    if reply.status_code in (401, 403):
        return [
            f"generation.api_key_env: {redact_url(url)} refused the key in ${key_env} "
            f"(HTTP {reply.status_code}); set a valid key"
        ]
    if reply.status_code != 200:
        return []  # a server without /models (some proxies): the model is checked by use
    try:
        served = [str(m["id"]) for m in reply.json().get("data", [])]
    except (ValueError, KeyError, TypeError, AttributeError):
        return []
    if served and model not in served:
        shown = ", ".join(served[:10]) + (", ..." if len(served) > 10 else "")
        return [
            f"generation.model: {model!r} is not served at {redact_url(url)} (it serves: {shown})"
        ]
    return []


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
