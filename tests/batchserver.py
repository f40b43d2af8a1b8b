"""A local server for the OpenAI Batch API (files and batches), for tests.

Endpoints: POST /v1/files (multipart), GET /v1/files/{id}, GET /v1/files/{id}/content,
POST /v1/batches, GET /v1/batches, GET /v1/batches/{id}, POST /v1/batches/{id}/cancel, and a
live POST /v1/chat/completions that records the bodies it receives (to compare them with the
batch lines).

A batch is processed in the background: each input line is validated (a bad line fails the
whole batch at validation, as OpenAI does), answered with the same deterministic text the fake
live server gives (tests/fakeserver.py), or put in the error file with a configured status.
Every JSON object the server returns is checked against the openai SDK's types first (unknown
keys included), so a response the SDK could not read fails the test that caused it.

Fault hooks, all plain attributes: `line_errors` (custom_id -> HTTP status; a 5xx hits only the
first `transient_attempts` times a custom_id is processed, a 4xx every time), `expire_next`
(the next batch expires after that many lines), `hold` (batches stay in_progress until it is
cleared), `max_lines` / `max_bytes` (an input file over them fails its batch), and the counters
`files_created`, `batches_created`, `downloads`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import re
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import uvicorn
from openai.types import Batch, FileObject
from openai.types.chat import ChatCompletion
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from booksmith.flows.cli_view import bind
from booksmith.generation.batch_files import BatchFileError, validate_line
from tests.fakeserver import DEFAULT_MAX_TOKENS, completion_text, key_fields, request_key

ENDPOINTS = ("/v1/chat/completions",)


def checked(model: type[BaseModel], obj: dict[str, Any]) -> dict[str, Any]:
    """`obj`, once the SDK's model accepts it and it has no key the model lacks."""
    model.model_validate(obj)
    unknown = set(obj) - set(model.model_fields)
    if unknown:
        raise AssertionError(f"{model.__name__} has no field(s) {sorted(unknown)}")
    return obj


def completion(body: dict[str, Any]) -> dict[str, Any]:
    """The fake server's clean answer to a chat.completions body, as a JSON object."""
    key = request_key(body)
    max_tokens = int(key_fields(body)["max_tokens"] or DEFAULT_MAX_TOKENS)
    n_words = max(1, int(max_tokens * 0.75))
    digest = hashlib.sha256(f"text:{key}".encode()).hexdigest()
    prompt_words = sum(len(str(m.get("content") or "").split()) for m in body["messages"])
    prompt_tokens = max(1, round(prompt_words * 1.3))
    tokens = min(max_tokens, math.ceil(n_words / 0.75))
    return checked(
        ChatCompletion,
        {
            "id": f"chatcmpl-{key}",
            "object": "chat.completion",
            "created": 1_700_000_000,
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": completion_text(digest, n_words)},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": tokens,
                "total_tokens": prompt_tokens + tokens,
            },
        },
    )


def parse_multipart(body: bytes, content_type: str) -> dict[str, tuple[str | None, bytes]]:
    """name -> (filename, bytes) of a multipart/form-data body (python-multipart is not a
    dependency of the project, and the SDK's uploads are simple)."""
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if match is None:
        raise ValueError("multipart body without a boundary")
    fields: dict[str, tuple[str | None, bytes]] = {}
    for part in body.split(b"--" + match.group(1).encode())[1:-1]:
        head, _, data = part.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        disposition = head.decode("utf-8", "replace")
        name = re.search(r'\bname="([^"]*)"', disposition)
        filename = re.search(r'\bfilename="([^"]*)"', disposition)
        if name:
            fields[name.group(1)] = (
                filename.group(1) if filename else None,
                data.removesuffix(b"\r\n"),
            )
    return fields


@dataclass
class StoredFile:
    obj: dict[str, Any]  # the FileObject
    content: bytes


def _error(status: int, message: str, err_type: str = "invalid_request_error") -> JSONResponse:
    body = {"error": {"message": message, "type": err_type, "param": None, "code": None}}
    return JSONResponse(body, status_code=status)


class BatchServer:
    """The app, its state and its uvicorn thread. Use as a context manager."""

    def __init__(self, *, step_delay_s: float = 0.01) -> None:
        self.step_delay_s = step_delay_s  # between status changes, so a poll can see them
        self.files: dict[str, StoredFile] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.line_errors: dict[str, int] = {}
        self.transient_attempts = 1
        self.expire_next: int | None = None
        self.hold = False
        self.max_lines = 50_000
        self.max_bytes = 200 * 1024 * 1024
        self.files_created = 0
        self.batches_created = 0
        self.downloads = 0
        self.processed: Counter[str] = Counter()  # custom_id -> times answered
        self.live_bodies: list[dict[str, Any]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # -- files ----------------------------------------------------------------------------------

    def _store(self, content: bytes, filename: str, purpose: str) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "id": f"file-{uuid.uuid4().hex[:24]}",
            "object": "file",
            "bytes": len(content),
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "expires_at": None,
            "status_details": None,
        }
        self.files[obj["id"]] = StoredFile(checked(FileObject, obj), content)
        return obj

    async def create_file(self, request: Request) -> Response:
        fields = parse_multipart(await request.body(), request.headers.get("content-type", ""))
        filename, content = fields.get("file", (None, b""))
        purpose = fields.get("purpose", (None, b""))[1].decode()
        if purpose != "batch" or not filename:
            return _error(400, f"expected a file with purpose 'batch', got {purpose!r}")
        self.files_created += 1
        return JSONResponse(self._store(content, filename, purpose))

    async def get_file(self, request: Request) -> Response:
        stored = self.files.get(request.path_params["file_id"])
        if stored is None:
            return _error(404, "no such file")
        return JSONResponse(stored.obj)

    async def file_content(self, request: Request) -> Response:
        stored = self.files.get(request.path_params["file_id"])
        if stored is None:
            return _error(404, "no such file")
        self.downloads += 1
        return Response(stored.content, media_type="application/octet-stream")

    # -- batches --------------------------------------------------------------------------------

    def _batch(self, batch: dict[str, Any], **changes: Any) -> dict[str, Any]:
        batch.update(changes)
        return checked(Batch, batch)

    async def create_batch(self, request: Request) -> Response:
        body = await request.json()
        input_file_id = body.get("input_file_id")
        if input_file_id not in self.files:
            return _error(400, f"no input file {input_file_id!r}")
        if body.get("endpoint") not in ENDPOINTS or body.get("completion_window") != "24h":
            return _error(400, "unsupported endpoint or completion_window")
        now = int(time.time())
        batch = {
            "id": f"batch_{uuid.uuid4().hex[:24]}",
            "object": "batch",
            "endpoint": body["endpoint"],
            "errors": None,
            "input_file_id": input_file_id,
            "completion_window": "24h",
            "status": "validating",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": now,
            "in_progress_at": None,
            "expires_at": now + 86_400,
            "finalizing_at": None,
            "completed_at": None,
            "failed_at": None,
            "expired_at": None,
            "cancelling_at": None,
            "cancelled_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "metadata": body.get("metadata"),
        }
        self.batches[batch["id"]] = self._batch(batch)
        self.batches_created += 1
        expire_after, self.expire_next = self.expire_next, None
        task = asyncio.create_task(self._process(batch, expire_after))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return JSONResponse(batch)

    async def get_batch(self, request: Request) -> Response:
        batch = self.batches.get(request.path_params["batch_id"])
        return JSONResponse(batch) if batch else _error(404, "no such batch")

    async def list_batches(self, request: Request) -> Response:
        newest = sorted(self.batches.values(), key=lambda b: b["created_at"], reverse=True)
        ids = [b["id"] for b in newest]
        after = request.query_params.get("after")
        start = ids.index(after) + 1 if after in ids else 0
        limit = int(request.query_params.get("limit", 20))
        page = newest[start : start + limit]
        return JSONResponse(
            {
                "object": "list",
                "data": page,
                "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None,
                "has_more": start + limit < len(newest),
            }
        )

    async def cancel_batch(self, request: Request) -> Response:
        batch = self.batches.get(request.path_params["batch_id"])
        if batch is None:
            return _error(404, "no such batch")
        if batch["status"] in ("validating", "in_progress", "finalizing"):
            self._batch(batch, status="cancelling", cancelling_at=int(time.time()))
        return JSONResponse(batch)

    # -- processing -----------------------------------------------------------------------------

    def _validate(self, content: bytes) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(lines, errors) of an input file; errors in the shape of Batch.errors.data."""
        errors: list[dict[str, Any]] = []
        lines: list[dict[str, Any]] = []
        if len(content) > self.max_bytes:
            errors.append({"code": "file_too_large", "message": f"over {self.max_bytes} bytes"})
        seen: set[str] = set()
        for n, raw in enumerate(content.splitlines(), start=1):
            try:
                line = json.loads(raw)
                validate_line(line)
                if line["custom_id"] in seen:
                    raise BatchFileError(f"duplicate custom_id {line['custom_id']}")
            except (ValueError, BatchFileError) as exc:
                errors.append({"code": "invalid_request", "message": str(exc), "line": n})
                continue
            seen.add(line["custom_id"])
            lines.append(line)
        if len(lines) > self.max_lines:
            errors.append({"code": "too_many_requests", "message": f"over {self.max_lines} lines"})
        return lines, errors

    def _answer(self, line: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
        """(ok, output line) for one request."""
        custom_id = line["custom_id"]
        self.processed[custom_id] += 1
        status = self.line_errors.get(custom_id, 200)
        if status >= 500 and self.processed[custom_id] > self.transient_attempts:
            status = 200
        request_id = f"req_{uuid.uuid4().hex[:16]}"
        if status == 200:
            body = completion(line["body"])
        else:
            kind = "server_error" if status >= 500 else "invalid_request_error"
            body = {"error": {"message": f"fake {status}", "type": kind, "param": None}}
        out = {
            "id": f"batch_req_{uuid.uuid4().hex[:16]}",
            "custom_id": custom_id,
            "response": {"status_code": status, "request_id": request_id, "body": body},
            "error": None,
        }
        return status == 200, out

    async def _process(self, batch: dict[str, Any], expire_after: int | None) -> None:
        await asyncio.sleep(self.step_delay_s)
        lines, errors = self._validate(self.files[batch["input_file_id"]].content)
        now = int(time.time())
        if errors:
            failed = {"object": "list", "data": errors}
            self._batch(batch, status="failed", failed_at=now, errors=failed)
            return
        counts = {"total": len(lines), "completed": 0, "failed": 0}
        model = lines[0]["body"]["model"] if lines else None
        self._batch(
            batch, status="in_progress", in_progress_at=now, request_counts=counts, model=model
        )
        while self.hold and batch["status"] == "in_progress":
            await asyncio.sleep(0.01)
        await asyncio.sleep(self.step_delay_s)
        output: list[dict[str, Any]] = []
        failures: list[dict[str, Any]] = []
        final = "completed"
        for n, line in enumerate(lines):
            if batch["status"] == "cancelling":
                final = "cancelled"
                break
            if expire_after is not None and n >= expire_after:
                final = "expired"
                break
            ok, out = self._answer(line)
            (output if ok else failures).append(out)
            counts["completed" if ok else "failed"] += 1
        if final == "expired":  # OpenAI lists the requests it did not reach in the error file
            message = "This request could not be executed before the completion window expired."
            for line in lines[len(output) + len(failures) :]:
                failures.append(
                    {
                        "id": f"batch_req_{uuid.uuid4().hex[:16]}",
                        "custom_id": line["custom_id"],
                        "response": None,
                        "error": {"code": "batch_expired", "message": message},
                    }
                )
        if final == "completed":
            self._batch(batch, status="finalizing", finalizing_at=int(time.time()))
            await asyncio.sleep(self.step_delay_s)
        name = batch["id"]
        files = {}
        for kind, rows in (("output", output), ("error", failures)):
            if rows:
                data = "".join(json.dumps(r) + "\n" for r in rows).encode()
                files[f"{kind}_file_id"] = self._store(
                    data, f"{name}_{kind}.jsonl", "batch_output"
                )["id"]
        stamp = {"completed": "completed_at", "expired": "expired_at", "cancelled": "cancelled_at"}
        self._batch(
            batch, status=final, request_counts=counts, **files, **{stamp[final]: int(time.time())}
        )

    # -- live completions -------------------------------------------------------------------------

    async def chat(self, request: Request) -> Response:
        body = await request.json()
        self.live_bodies.append(body)
        return JSONResponse(completion(body))

    # -- running --------------------------------------------------------------------------------

    def app(self) -> Starlette:
        routes = [
            Route("/v1/files", self.create_file, methods=["POST"]),
            Route("/v1/files/{file_id}", self.get_file, methods=["GET"]),
            Route("/v1/files/{file_id}/content", self.file_content, methods=["GET"]),
            Route("/v1/batches", self.create_batch, methods=["POST"]),
            Route("/v1/batches", self.list_batches, methods=["GET"]),
            Route("/v1/batches/{batch_id}", self.get_batch, methods=["GET"]),
            Route("/v1/batches/{batch_id}/cancel", self.cancel_batch, methods=["POST"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
        ]
        return Starlette(routes=routes)

    def start(self) -> BatchServer:
        sock = bind("127.0.0.1", 0)  # Nagle off on its connections (flows/cli_view.bind)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app(), loop="asyncio", lifespan="off", access_log=False, log_level="warning"
        )
        self._server = server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("batch server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)
        self._server = self._thread = None

    def __enter__(self) -> BatchServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
