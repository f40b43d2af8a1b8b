"""A scripted OpenAI-compatible judge for the quality-classifier tests: it answers each rubric
prompt with a short justification and "Educational score: N", N chosen by the test, or with
{"reason", "score"} when the request asks for structured output. With
`structured_output=False` it rejects response_format with a 400, as servers without structured
output do. `faithfulness_server` answers the faithfulness judge's prompt the same way: a
yes/no chosen by the test for each document, {"answer"} when asked for structured output."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def extract_of(prompt: str) -> str:
    """The document text inside the rubric prompt's <extract> block."""
    return prompt.split("<extract>\n", 1)[-1].split("\n</extract>", 1)[0]


def document_of(prompt: str) -> str:
    """The document inside the faithfulness judge's <document> block."""
    return prompt.split("<document>\n", 1)[-1].split("\n</document>", 1)[0]


def _rubric_reply(score: Callable[[str], int]) -> Callable[[str, bool], str]:
    def reply(prompt: str, structured: bool) -> str:
        n = score(extract_of(prompt))
        reason = f"The extract is {'clear' if n >= 3 else 'not'} teaching material."
        if structured:
            return json.dumps({"reason": reason, "score": n})
        return f"{reason}\nEducational score: {n}"

    return reply


@contextmanager
def judge_server(
    score: Callable[[str], int], *, structured_output: bool = True
) -> Iterator[tuple[str, list[int]]]:
    """Serve a judge scoring each extract with `score`; yields (base URL, [calls so far])."""
    with _serve(_rubric_reply(score), structured_output) as served:
        yield served


@contextmanager
def faithfulness_server(
    answer: Callable[[str], str], *, structured_output: bool = True
) -> Iterator[tuple[str, list[int]]]:
    """Serve a faithfulness judge: `answer(document)` is "yes", "no" or any other reply (sent
    as is); "yes"/"no" come as {"answer"} when structured output is asked for, else as a
    sentence that starts with it. Yields (base URL, [calls so far])."""

    def reply(prompt: str, structured: bool) -> str:
        a = answer(document_of(prompt))
        if a not in ("yes", "no"):
            return a
        if structured:
            return json.dumps({"answer": a})
        return "Yes, it names things the passage never mentions." if a == "yes" else (
            "No. Everything it states is in the passage."
        )  # fmt: skip

    with _serve(reply, structured_output) as served:
        yield served


@contextmanager
def _serve(
    reply: Callable[[str, bool], str], structured_output: bool
) -> Iterator[tuple[str, list[int]]]:
    calls = [0]

    class Handler(BaseHTTPRequestHandler):
        def _send(self, status: int, data: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:
            calls[0] += 1
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if body.get("response_format") and not structured_output:
                error = {"message": "response_format is not supported", "type": "invalid"}
                return self._send(400, json.dumps({"error": error}).encode())
            content = reply(body["messages"][-1]["content"], bool(body.get("response_format")))
            data = json.dumps(
                {
                    "id": "judge-1", "object": "chat.completion", "created": 1,
                    "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop", "message": {
                        "role": "assistant", "content": content}}],
                    "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120},
                }
            ).encode()  # fmt: skip
            self._send(200, data)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", calls
    finally:
        server.shutdown()
        server.server_close()
