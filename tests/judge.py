"""A scripted OpenAI-compatible judge for the quality-classifier tests: it answers each rubric
prompt with a short justification and "Educational score: N", N chosen by the test, or with
{"reason", "score"} when the request asks for structured output. With
`structured_output=False` it rejects response_format with a 400, as servers without structured
output do."""

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


@contextmanager
def judge_server(
    score: Callable[[str], int], *, structured_output: bool = True
) -> Iterator[tuple[str, list[int]]]:
    """Serve a judge scoring each extract with `score`; yields (base URL, [calls so far])."""
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
            n = score(extract_of(body["messages"][-1]["content"]))
            reason = f"The extract is {'clear' if n >= 3 else 'not'} teaching material."
            if body.get("response_format"):
                content = json.dumps({"reason": reason, "score": n})
            else:
                content = f"{reason}\nEducational score: {n}"
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
