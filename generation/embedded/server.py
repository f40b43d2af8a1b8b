"""An OpenAI-compatible HTTP server for the embedded model (Starlette on uvicorn).

    python -m booksmith.generation.embedded.server --model PATH --port 8080 --parallel 8 --threads 2

Endpoints: GET /health (503 while the model loads, then 200), GET /v1/models and
POST /v1/chat/completions (non-streaming, n=1). Every request goes to one continuous-batching
Engine; the event loop only parses, validates and waits on the engine's futures.

Structured output: `response_format` {"type": "json_schema", "json_schema": {"schema": ...}} or
{"type": "json_object"} becomes a GBNF grammar (llama-cpp-python's JSON-schema converter, once
per schema) that the engine enforces token by token. It fails closed: a schema keyword the
converter would silently ignore (minimum, pattern, oneOf, ...) is a 400 naming it and where it
is, never unconstrained text.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from llama_cpp.llama_grammar import SchemaConverter
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from booksmith.generation.embedded.engine import (
    Completion,
    Engine,
    EngineClosedError,
    EngineConfig,
    GrammarError,
    PromptTooLongError,
    SamplingParams,
)
from booksmith.generation.embedded.model import MODEL_NAME

log = logging.getLogger("booksmith.embedded.server")


class BadRequestError(ValueError):
    """A client error, answered with 400 and an OpenAI-style error body naming `param`."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


def error_response(
    status: int, message: str, kind: str, param: str | None = None, code: str | None = None
) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


# Keywords that constrain nothing: the converter may ignore them.
_ANNOTATIONS = frozenset(
    ["title", "description", "$schema", "$id", "$comment", "examples", "default", "deprecated"]
) | frozenset(["readOnly", "writeOnly", "$defs", "definitions"])
_TYPES = frozenset(["object", "array", "string", "number", "integer", "boolean", "null"])
_FORMATS = frozenset(
    ["date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4", "uuid5"]
)
MAX_REPEAT = 1000  # maxItems/maxLength: the grammar grows with the bound
# The converter's `char` lets raw control characters into strings, which JSON forbids; this is
# llama.cpp's own rule (common/json-schema-to-grammar.cpp).
_SAFE_CHAR = r'char ::= [^"\\\x7F\x00-\x1F] | [\\] (["\\/bfnrt] | "u" [0-9a-fA-F]{4})'
JSON_OBJECT_SCHEMA: dict[str, Any] = {"type": "object"}


def _unsupported(where: str, what: str) -> BadRequestError:
    return BadRequestError(
        f"response_format: unsupported JSON schema: {what} at {where} "
        "(structured output here cannot enforce it)",
        "response_format",
        "unsupported_schema",
    )


def _enforced(node: dict[str, Any], where: str) -> set[str]:
    """The keywords the converter enforces for this schema, in its own order of cases."""
    kind = node.get("type")
    if "$ref" in node:
        ref = node["$ref"]
        if not isinstance(ref, str) or not ref.startswith("#/"):
            raise _unsupported(where, f"'$ref' {ref!r} (only local '#/...' references)")
        return {"$ref"}
    if "anyOf" in node:
        return {"anyOf"}
    if isinstance(kind, list):
        if not kind or any(t not in _TYPES for t in kind):
            raise _unsupported(where, f"'type' {kind!r}")
        return {"type"}
    if "const" in node:
        return {"const", "type"}
    if "enum" in node:
        return {"enum", "type"}
    if kind is None and ("properties" in node or "additionalProperties" in node):
        kind = "object"
    if kind is None:
        return set()  # {}: the converter makes it a JSON object
    if kind not in _TYPES:
        raise _unsupported(where, f"'type' {kind!r}")
    if kind == "object":
        return {"type", "properties", "required", "additionalProperties"}
    if kind == "array":
        if "prefixItems" in node or isinstance(node.get("items"), list):
            return {"type", "prefixItems" if "prefixItems" in node else "items"}
        return {"type", "items", "minItems", "maxItems"} if "items" in node else {"type"}
    if kind == "string":
        if "format" in node:
            if node["format"] not in _FORMATS:
                raise _unsupported(where, f"'format' {node['format']!r}")
            return {"type", "format"}
        return {"type", "minLength", "maxLength"}
    return {"type"}


def _check_bounds(node: dict[str, Any], where: str) -> None:
    for low, high in (("minItems", "maxItems"), ("minLength", "maxLength")):
        for key in (low, high):
            value = node.get(key)
            if value is not None and (
                isinstance(value, bool)
                or not isinstance(value, int)
                or not 0 <= value <= MAX_REPEAT
            ):
                raise _unsupported(where, f"'{key}' {value!r} (an integer 0..{MAX_REPEAT})")
        if node.get(high) is not None and node.get(low, 0) > node[high]:
            raise _unsupported(where, f"'{low}' above '{high}'")


def _subschemas(node: dict[str, Any], where: str) -> list[tuple[Any, str]]:
    """(subschema, where) for every place a schema nests one."""
    out: list[tuple[Any, str]] = []
    for key in ("properties", "$defs", "definitions"):
        value = node.get(key, {})
        if not isinstance(value, dict):
            raise _unsupported(where, f"'{key}' that is not an object")
        out += [(sub, f"{where}.{key}.{name}") for name, sub in value.items()]
    for key in ("anyOf", "prefixItems", "items"):
        value = node.get(key)
        if isinstance(value, list):
            if not value:
                raise _unsupported(where, f"an empty '{key}'")
            out += [(sub, f"{where}.{key}[{i}]") for i, sub in enumerate(value)]
        elif value is not None:
            out.append((value, f"{where}.{key}"))
    extra = node.get("additionalProperties")
    if extra is not None and not isinstance(extra, bool):
        out.append((extra, f"{where}.additionalProperties"))
    return out


def check_schema(node: Any, where: str = "schema") -> None:
    """Raise a 400 naming the first part of a JSON schema that the grammar would not enforce."""
    if not isinstance(node, dict):
        raise _unsupported(where, "a schema that is not an object (true/false schemas)")
    extra = sorted(set(node) - _ANNOTATIONS - _enforced(node, where))
    if extra:
        raise _unsupported(where, f"'{extra[0]}'")
    _check_bounds(node, where)
    if "enum" in node and not (isinstance(node["enum"], list) and node["enum"]):
        raise _unsupported(where, "'enum' that is not a non-empty list")
    required = node.get("required", [])
    properties = node.get("properties", {})
    missing = (
        [name for name in required if name not in properties]
        if isinstance(required, list)
        else [required]
    )
    if missing:
        raise _unsupported(where, f"'required' {missing[0]!r} without a schema in 'properties'")
    for sub, sub_where in _subschemas(node, where):
        check_schema(sub, sub_where)


@functools.lru_cache(maxsize=256)
def schema_grammar(canonical: str) -> str:
    """The GBNF grammar for a JSON schema given as compact JSON; converted once per schema."""
    schema = json.loads(canonical)
    try:
        check_schema(schema)
        converter = SchemaConverter(
            prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False
        )
        converter.visit(converter.resolve_refs(schema, ""), "")
    except RecursionError as exc:
        raise _unsupported("schema", "nesting this deep") from exc
    except (AssertionError, ValueError, KeyError, TypeError) as exc:
        if isinstance(exc, BadRequestError):
            raise
        raise BadRequestError(
            f"response_format: the JSON schema cannot be compiled to a grammar: {exc}",
            "response_format",
            "unsupported_schema",
        ) from exc
    lines = converter.format_grammar().splitlines()
    return "\n".join(_SAFE_CHAR if line.startswith("char ::= ") else line for line in lines)


def response_format_grammar(value: Any) -> str | None:
    """The grammar an OpenAI `response_format` asks for; None for plain text."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        schema: Any = JSON_OBJECT_SCHEMA
    elif kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise BadRequestError(
                "'response_format.json_schema.schema' is required: a JSON schema object",
                "response_format",
            )
    else:
        raise BadRequestError(
            "'response_format.type' must be 'text', 'json_object' or 'json_schema'",
            "response_format",
        )
    # Compact, not key-sorted: property order is the order the model writes them in.
    return schema_grammar(json.dumps(schema, separators=(",", ":"), ensure_ascii=False))


@dataclass
class ChatRequest:
    model: str
    messages: list[dict[str, str]]
    params: SamplingParams


def _number(body: dict[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise BadRequestError(f"'{key}' must be a number between {lo} and {hi}", key)
    return float(value)


def _content_text(content: Any, index: int) -> str:
    if isinstance(content, str):
        return content
    # The list form: [{"type": "text", "text": "..."}]; only text parts mean anything here.
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"):
                raise BadRequestError(
                    "only text content parts are supported", f"messages[{index}].content"
                )
            parts.append(str(part.get("text", "")))
        return "".join(parts)
    raise BadRequestError("message content must be a string", f"messages[{index}].content")


def parse_chat_request(body: Any) -> ChatRequest:
    """Validate an OpenAI chat-completions body; raise BadRequestError naming the bad field."""
    if not isinstance(body, dict):
        raise BadRequestError("the request body must be a JSON object")
    model = body.get("model", MODEL_NAME)
    if not isinstance(model, str):
        raise BadRequestError("'model' must be a string", "model")
    raw_messages = body.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise BadRequestError("'messages' is required: a non-empty list of messages", "messages")
    messages = []
    for i, message in enumerate(raw_messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRequestError("each message needs a string 'role'", f"messages[{i}].role")
        messages.append(
            {"role": message["role"], "content": _content_text(message.get("content"), i)}
        )
    if body.get("n") not in (None, 1):
        raise BadRequestError("only n=1 is supported", "n")
    if body.get("stream", False):
        raise BadRequestError("streaming is not supported; send stream=false", "stream")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
    ):
        key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        raise BadRequestError(f"'{key}' must be a positive integer", key)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise BadRequestError("'seed' must be an integer", "seed")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is None:
        stop = []
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise BadRequestError("'stop' must be a non-empty string or a list of them", "stop")
    top_k = body.get("top_k", 40)  # an extension some OpenAI-compatible servers accept too
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise BadRequestError("'top_k' must be a non-negative integer", "top_k")
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
        top_k=top_k,
        seed=seed,
        stop=tuple(stop),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        grammar=response_format_grammar(body.get("response_format")),
    )
    return ChatRequest(model=model, messages=messages, params=params)


def completion_body(request: ChatRequest, result: Completion) -> dict[str, Any]:
    """OpenAI's ChatCompletion object."""
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.text},
                "logprobs": None,
                "finish_reason": result.finish_reason,
            }
        ],
        "usage": {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens,
        },
    }


class ModelHolder:
    """Loads the engine in a background thread so /health can answer 503 meanwhile."""

    def __init__(self, model_path: Path, config: EngineConfig, model_name: str) -> None:
        self.model_path = model_path
        self.config = config
        self.model_name = model_name
        self.engine: Engine | None = None
        self.error: BaseException | None = None
        self.closed = False
        self._lock = threading.Lock()

    def load(self) -> None:
        try:
            engine = Engine(self.model_path, self.config)
        except BaseException as exc:
            log.exception("loading %s failed", self.model_path)
            self.error = exc
            return
        with self._lock:
            if self.closed:  # shut down while loading
                engine.close()
                return
            self.engine = engine
        log.info("model %s loaded; %d tokens per sequence", self.model_path, engine.ctx_per_seq)

    def close(self) -> None:
        with self._lock:
            self.closed = True
            engine, self.engine = self.engine, None
        if engine is not None:
            engine.close()


def create_app(holder: ModelHolder) -> Starlette:
    async def health(request: Request) -> JSONResponse:
        engine = holder.engine
        if engine is not None:
            return JSONResponse({"status": "ok", **engine.load()})
        if holder.error is not None:
            return JSONResponse({"status": "error", "error": str(holder.error)}, status_code=500)
        return JSONResponse({"status": "loading"}, status_code=503)

    async def models(request: Request) -> JSONResponse:
        entry = {"id": holder.model_name, "object": "model", "created": 0, "owned_by": "booksmith"}
        return JSONResponse({"object": "list", "data": [entry]})

    async def chat_completions(request: Request) -> JSONResponse:
        try:
            body = await request.json()
        except ValueError:
            return error_response(
                400, "the request body is not valid JSON", "invalid_request_error"
            )
        try:
            chat = parse_chat_request(body)
        except BadRequestError as exc:
            return error_response(400, str(exc), "invalid_request_error", exc.param, exc.code)
        engine = holder.engine
        if engine is None:
            return error_response(503, "the model is not loaded", "server_error")
        try:
            future, handle = engine.submit_chat(chat.messages, chat.params)
        except PromptTooLongError as exc:
            return error_response(
                400, str(exc), "invalid_request_error", "messages", "context_length_exceeded"
            )
        except GrammarError as exc:
            return error_response(
                400,
                f"response_format: {exc}",
                "invalid_request_error",
                "response_format",
                "unsupported_schema",
            )
        except EngineClosedError as exc:
            return error_response(503, str(exc), "server_error")
        result: asyncio.Future[Completion] = asyncio.wrap_future(future)
        disconnect: asyncio.Future[None] = asyncio.ensure_future(_client_gone(request))
        try:
            waiting: list[asyncio.Future[Any]] = [result, disconnect]
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            # Handler cancelled (shutdown) or client gone: free the slot instead of generating
            # for nobody.
            if not result.done():
                engine.cancel(handle)
            disconnect.cancel()
        if not result.done():
            result.cancel()
            return error_response(499, "client closed the request", "client_closed")
        try:
            completion = result.result()
        except EngineClosedError as exc:
            return error_response(503, str(exc), "server_error")
        except GrammarError as exc:  # never hand back text the grammar did not finish
            return error_response(500, str(exc), "server_error")
        return JSONResponse(completion_body(chat, completion))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        threading.Thread(target=holder.load, name="model-load", daemon=True).start()
        yield
        await asyncio.to_thread(holder.close)

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


async def _client_gone(request: Request) -> None:
    """Returns once the client disconnects (the body was already read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class _Server(uvicorn.Server):
    """uvicorn, plus: on SIGTERM/SIGINT fail in-flight generations at once, so the graceful
    shutdown does not wait minutes for long completions nobody will read."""

    def __init__(
        self, config: uvicorn.Config, holder: ModelHolder, remove_log: Path | None = None
    ) -> None:
        super().__init__(config)
        self.holder = holder
        self.remove_log = remove_log

    def handle_exit(self, sig: int, frame: Any) -> None:
        threading.Thread(target=self.holder.close, name="engine-close", daemon=True).start()
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await super().shutdown(sockets)
        # Here, not after run(): uvicorn re-raises the stop signal once run() is done. Only a
        # server that started gets here; one that failed keeps its log for the launcher to show.
        # This also covers a killed launcher, whose death signal stops us.
        if self.remove_log is not None:
            self.remove_log.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve the embedded model over the OpenAI API.")
    parser.add_argument("--model", type=Path, required=True, help="GGUF file")
    parser.add_argument("--model-name", default=MODEL_NAME, help="id listed by /v1/models")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--parallel", type=int, default=8, help="sequences decoded together")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ctx-per-seq", type=int, default=2048, help="prompt + completion cap")
    parser.add_argument("--log-level", default="info")
    parser.add_argument(
        "--remove-log", type=Path, help="the launcher's temporary log: removed after serving"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    config = EngineConfig(
        n_parallel=args.parallel, n_threads=args.threads, ctx_per_seq=args.ctx_per_seq
    )
    holder = ModelHolder(args.model, config, args.model_name)
    uv_config = uvicorn.Config(
        create_app(holder),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=False,  # one line per request is noise at thousands of requests
        timeout_graceful_shutdown=5,
    )
    _Server(uv_config, holder, args.remove_log).run()


if __name__ == "__main__":
    main()
