"""Batch API request and result files (JSONL), shared by OpenAI's Batch API and vLLM's
`python -m vllm.entrypoints.openai.run_batch`.

One input line per request: `{"custom_id": <request id>, "method": "POST", "url":
"/v1/chat/completions", "body": <the body the live client sends>}`. Every body is validated
against the openai SDK's own request type before it is written, so a file that passes here is
one both servers accept. Output and error lines are parsed back into `GenerationResult`s with the
same reasons the live client would record.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from openai.types.chat import ChatCompletion
from openai.types.chat.completion_create_params import CompletionCreateParamsNonStreaming
from pydantic import ConfigDict, TypeAdapter, ValidationError, with_config

from booksmith.generation.client import chat_body
from booksmith.schemas import GenerationRequest, GenerationResult
from booksmith.shards.files import write_bytes_atomically

BATCH_URL: Literal["/v1/chat/completions"] = "/v1/chat/completions"
# OpenAI's limits for one input file (https://platform.openai.com/docs/guides/batch).
MAX_REQUESTS_PER_FILE = 50_000
MAX_BYTES_PER_FILE = 200 * 1024 * 1024

# The live client retries these 4xx statuses (see generation.client._RETRYABLE_STATUS); a batch
# line that ends with one is worth another submission too.
_RETRYABLE_STATUS = frozenset({408, 409, 425, 429})


class BatchFileError(ValueError):
    """A request line that OpenAI or vLLM would reject, or an output line we cannot read."""


# -- request lines ----------------------------------------------------------------------------


@with_config(ConfigDict(extra="forbid"))  # the SDK's TypedDict ignores unknown keys by default
class _StrictChatParams(CompletionCreateParamsNonStreaming):
    pass


_CHAT_PARAMS: TypeAdapter[_StrictChatParams] = TypeAdapter(_StrictChatParams)


class _NestedError(Exception):
    """A lazily validated item failed; carries where it sits in the body."""

    def __init__(self, loc: tuple[Any, ...], exc: ValidationError) -> None:
        self.errors = [{**e, "loc": loc + tuple(e["loc"])} for e in exc.errors()]


def _drain(value: Any, loc: tuple[Any, ...] = ()) -> None:
    """Consume the lazy validators pydantic builds for the SDK's `Iterable[...]` fields
    (messages, content parts): their items are only checked when iterated."""
    if isinstance(value, dict):
        for key, item in value.items():
            _drain(item, (*loc, key))
    elif isinstance(value, list | tuple) or hasattr(value, "__next__"):
        try:
            items = list(value)
        except ValidationError as exc:
            raise _NestedError(loc, exc) from None
        for i, item in enumerate(items):
            _drain(item, (*loc, i))


def _explain(errors: list[Any]) -> str:
    """The errors worth reading. A value checked against the SDK's unions (message types,
    response formats) fails every member; drop the members whose `role` or `type` literal did
    not match, which leaves the member that was meant."""
    mismatched = {
        tuple(e["loc"][:-1])
        for e in errors
        if e["type"] == "literal_error" and e["loc"][-1:] in (("role",), ("type",))
    }
    useful = [e for e in errors if not any(tuple(e["loc"][: len(m)]) == m for m in mismatched)]
    pool = useful or errors
    parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in pool[:3]]
    more = f" (+{len(pool) - 3} more)" if len(pool) > 3 else ""
    return "; ".join(parts) + more


def validate_body(body: Any, custom_id: str = "") -> None:
    """Raise BatchFileError unless `body` is a valid non-streaming chat.completions request
    for the openai SDK (unknown keys rejected)."""
    try:
        try:
            _drain(_CHAT_PARAMS.validate_python(body))
        except ValidationError as exc:
            raise _NestedError((), exc) from None
    except _NestedError as exc:
        where = f"request {custom_id}: " if custom_id else ""
        raise BatchFileError(
            f"{where}body is not a valid chat.completions request "
            f"(openai CompletionCreateParamsNonStreaming): {_explain(exc.errors)}"
        ) from None


def validate_line(line: Any) -> None:
    """Raise BatchFileError unless `line` is a valid Batch API input line."""
    if not isinstance(line, dict):
        raise BatchFileError(f"a batch line must be a JSON object, got {type(line).__name__}")
    extra = sorted(set(line) - {"custom_id", "method", "url", "body"})
    custom_id = line.get("custom_id")
    if extra:
        raise BatchFileError(f"request {custom_id}: unknown keys {extra}")
    if not isinstance(custom_id, str) or not custom_id:
        raise BatchFileError("a batch line needs a non-empty string custom_id")
    if line.get("method") != "POST" or line.get("url") != BATCH_URL:
        raise BatchFileError(f"request {custom_id}: expected POST {BATCH_URL}")
    validate_body(line.get("body"), custom_id)


def request_line(request: GenerationRequest) -> dict[str, Any]:
    line = {"custom_id": request.id, "method": "POST", "url": BATCH_URL, "body": chat_body(request)}
    validate_line(line)
    return line


def encode_line(request: GenerationRequest, *, max_bytes: int = MAX_BYTES_PER_FILE) -> bytes:
    """The request's validated JSONL line; BatchFileError if it is invalid or alone too big."""
    data = (json.dumps(request_line(request), ensure_ascii=False) + "\n").encode()
    if len(data) > max_bytes:
        raise BatchFileError(
            f"request {request.id}: one line is {len(data)} bytes, over the {max_bytes}-byte limit"
        )
    return data


# -- files ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchFile:
    """One written input file and the request ids it holds, in file order."""

    path: Path
    custom_ids: tuple[str, ...]
    n_bytes: int


def split_lines(
    requests: Iterable[GenerationRequest],
    *,
    max_requests: int = MAX_REQUESTS_PER_FILE,
    max_bytes: int = MAX_BYTES_PER_FILE,
) -> Iterator[list[tuple[str, bytes]]]:
    """Group encoded lines into chunks that respect both per-file limits."""
    if max_requests < 1 or max_bytes < 1:
        raise ValueError("max_requests and max_bytes must be positive")
    seen: set[str] = set()
    chunk: list[tuple[str, bytes]] = []
    size = 0
    for req in requests:
        if req.id in seen:  # OpenAI rejects a file whose custom_ids repeat
            raise BatchFileError(f"request {req.id}: custom_id appears twice")
        seen.add(req.id)
        data = encode_line(req, max_bytes=max_bytes)
        if chunk and (len(chunk) >= max_requests or size + len(data) > max_bytes):
            yield chunk
            chunk, size = [], 0
        chunk.append((req.id, data))
        size += len(data)
    if chunk:
        yield chunk


def write_batch_files(
    requests: Sequence[GenerationRequest],
    directory: Path,
    *,
    prefix: str = "batch",
    max_requests: int = MAX_REQUESTS_PER_FILE,
    max_bytes: int = MAX_BYTES_PER_FILE,
) -> list[BatchFile]:
    """Write `<directory>/<prefix>-<n>.jsonl` files (validated, atomic) for the requests."""
    files = []
    chunks = split_lines(requests, max_requests=max_requests, max_bytes=max_bytes)
    for n, chunk in enumerate(chunks):
        path = directory / f"{prefix}-{n:04d}.jsonl"
        data = b"".join(line for _, line in chunk)
        write_bytes_atomically(path, data)
        files.append(BatchFile(path, tuple(cid for cid, _ in chunk), len(data)))
    return files


def read_custom_ids(path: Path) -> list[str]:
    """The custom_ids of an input file, in order."""
    with path.open("rb") as f:
        return [json.loads(line)["custom_id"] for line in f if line.strip()]


# -- output and error lines -------------------------------------------------------------------


@dataclass(frozen=True)
class LineOutcome:
    """One output or error line: a completion, or a failure that is permanent or worth a retry."""

    custom_id: str
    result: GenerationResult
    permanent: bool = False


def _failure(custom_id: str, reason: str, *, permanent: bool, backend: str) -> LineOutcome:
    result = GenerationResult(request_id=custom_id, error=reason, backend=backend)
    return LineOutcome(custom_id, result, permanent)


def parse_output_line(line: str | bytes | dict[str, Any], *, backend: str) -> LineOutcome:
    """Turn one line of an output or error file into a result or a failure.

    Reasons: `batch:http_<status>` for a non-200 response (4xx permanent unless the live client
    would retry it, 5xx transient), `batch:<code>` for an error object (e.g. batch_expired:
    transient), `content_filter` (permanent) and `batch:no_choices` (transient) as live."""
    data = json.loads(line) if isinstance(line, str | bytes) else line
    custom_id = data.get("custom_id")
    if not isinstance(custom_id, str):
        raise BatchFileError(f"output line without a custom_id: {str(data)[:200]}")
    response = data.get("response")
    error = data.get("error")
    if response is None or error is not None:
        code = (error or {}).get("code") or "no_response"
        return _failure(custom_id, f"batch:{code}", permanent=False, backend=backend)
    status = int(response.get("status_code") or 0)
    if status != 200:
        permanent = 400 <= status < 500 and status not in _RETRYABLE_STATUS
        return _failure(custom_id, f"batch:http_{status}", permanent=permanent, backend=backend)
    try:
        completion = ChatCompletion.model_validate(response.get("body"))
    except ValidationError:
        return _failure(custom_id, "batch:bad_response", permanent=False, backend=backend)
    if not completion.choices:
        return _failure(custom_id, "batch:no_choices", permanent=False, backend=backend)
    choice = completion.choices[0]
    if choice.finish_reason == "content_filter":
        return _failure(custom_id, "content_filter", permanent=True, backend=backend)
    usage = completion.usage
    result = GenerationResult(
        request_id=custom_id,
        text=choice.message.content or "",
        finish_reason=choice.finish_reason,
        prompt_tokens=usage.prompt_tokens if usage else 0,
        completion_tokens=usage.completion_tokens if usage else 0,
        model=completion.model,
        backend=backend,
    )
    return LineOutcome(custom_id, result)


def read_outcomes(path: Path, *, backend: str) -> Iterator[LineOutcome]:
    """Every line of a downloaded output or error file."""
    with path.open("rb") as f:
        for raw in f:
            if raw.strip():
                yield parse_output_line(raw, backend=backend)
