"""Turn the generation settings into a live Endpoint: start the embedded server, or point at
any OpenAI-compatible URL with a key from the environment or a Prefect Secret block."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from booksmith.generation.client import Endpoint
from booksmith.schemas.config import EmbeddedSettings, EndpointSettings, GenerationSettings

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"


class BackendError(RuntimeError):
    """A backend that cannot be reached or configured; the message says what to set."""


def model_name(settings: GenerationSettings) -> str:
    """The model name requests carry (and so part of every request id)."""
    if settings.model:
        return settings.model
    if settings.backend == "embedded":
        return EMBEDDED_MODEL_NAME
    raise BackendError("generation.model: set the model name for the openai backend")


def api_key(settings: GenerationSettings) -> str:
    """The key, from a Prefect Secret block or the environment; never from a config file."""
    if settings.api_key_secret:
        from prefect.blocks.system import Secret

        secret = Secret.load(settings.api_key_secret)  # sync in a sync context
        return str(secret.get())  # type: ignore[union-attr]
    key = os.environ.get(settings.api_key_env)
    if key:
        return key
    if settings.base_url is None:  # OpenAI itself needs a key; local servers usually do not
        raise BackendError(
            f"generation: no API key: set the environment variable {settings.api_key_env} "
            "or generation.api_key_secret (a Prefect Secret block name)"
        )
    return "not-needed"


@contextmanager
def open_endpoint(settings: GenerationSettings, embedded: EmbeddedSettings) -> Iterator[Endpoint]:
    common = {
        "model": model_name(settings),
        "rpm": settings.requests_per_minute,
        "tpm": settings.tokens_per_minute,
        "timeout_s": settings.timeout_s,
        "max_retries": settings.max_retries,
    }
    if settings.backend == "embedded" and settings.base_url is None:
        from booksmith.generation.embedded import EmbeddedServer

        n_threads = embedded.n_threads or os.cpu_count() or 2
        with EmbeddedServer(
            model_path=embedded.model_path,
            n_parallel=embedded.n_parallel,
            n_threads=n_threads,
            ctx_per_seq=embedded.ctx_per_seq,
            startup_timeout_s=embedded.startup_timeout_s,
        ) as server:
            # A few more requests in flight than slots, so a freed slot never waits on HTTP.
            concurrency = max(settings.max_concurrency, embedded.n_parallel + 2)
            yield Endpoint(
                base_url=server.base_url,
                api_key="not-needed",
                backend="embedded",
                max_concurrency=concurrency,
                **common,  # type: ignore[arg-type]
            )
        return
    yield Endpoint(
        base_url=settings.base_url or "https://api.openai.com/v1",
        api_key=api_key(settings),
        backend=settings.backend,
        max_concurrency=settings.max_concurrency,
        **common,  # type: ignore[arg-type]
    )


@contextmanager
def open_endpoints(
    settings: GenerationSettings, embedded: EmbeddedSettings
) -> Iterator[list[Endpoint]]:
    """Every endpoint the run may use: `generation.endpoints`, or the one `open_endpoint` gives
    (the embedded server is started once here and shared by every generation task)."""
    if not settings.endpoints:
        with open_endpoint(settings, embedded) as endpoint:
            yield [endpoint]
        return
    yield [_extra_endpoint(settings, e) for e in settings.endpoints]


def _extra_endpoint(settings: GenerationSettings, e: EndpointSettings) -> Endpoint:
    own = settings.model_copy(
        update={"base_url": e.base_url, "api_key_env": e.api_key_env or settings.api_key_env}
    )
    return Endpoint(
        base_url=e.base_url,
        api_key=api_key(own),
        backend=settings.backend,
        model=model_name(settings),
        max_concurrency=e.max_concurrency or settings.max_concurrency,
        rpm=e.requests_per_minute or settings.requests_per_minute,
        tpm=e.tokens_per_minute or settings.tokens_per_minute,
        timeout_s=settings.timeout_s,
        max_retries=settings.max_retries,
    )
