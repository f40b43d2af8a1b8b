"""Preflight: a run that cannot work says why in seconds, every problem at once, one line
each naming the setting and the fix, before Prefect starts or anything is planned."""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from booksmith.generation.preflight import preflight
from booksmith.schemas.config import RunConfig
from tests.conftest import fake_backend_config
from tests.fakeserver import FakeServer

BOOKSMITH = [sys.executable, "-m", "booksmith"]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_every_problem_is_one_line_before_anything_starts(tmp_path: Path, write_config) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    cfg = fake_backend_config(f"http://127.0.0.1:{_closed_port()}/v1", blocker / "out")
    cfg["dedup"] = {"index": "redis", "redis_url": f"redis://:secret@127.0.0.1:{_closed_port()}/0"}
    started = time.monotonic()
    run = subprocess.run(
        [*BOOKSMITH, "run", "--config", str(write_config(cfg))],
        env={k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr[-2000:]
    assert time.monotonic() - started < 30  # no ephemeral Prefect server was started
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("error: ") for line in lines), lines
    assert "generation.base_url: nothing answers at http://127.0.0.1:" in lines[0]
    assert "output.dir:" in lines[1] and "is a file, not a directory" in lines[1]
    assert "dedup.redis_url: Redis at redis://:***@127.0.0.1:" in lines[2]
    assert "secret" not in run.stderr and "Traceback" not in run.stderr
    assert not (blocker.parent / "out").exists()


def test_a_refused_key_and_a_model_the_server_does_not_serve(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FAKE_KEY", "wrong")
    with FakeServer({"api_key": "right", "models": ["other-model"]}) as server:
        cfg = fake_backend_config(server.base_url, tmp_path / "out", api_key_env="FAKE_KEY")
        problems = preflight(RunConfig.model_validate(cfg))
        assert problems == [
            f"generation.api_key_env: {server.base_url} refused the key in $FAKE_KEY "
            "(HTTP 401); set a valid key"
        ]
        monkeypatch.setenv("FAKE_KEY", "right")
        problems = preflight(RunConfig.model_validate(cfg))
        assert problems == [
            f"generation.model: 'fake-model' is not served at {server.base_url} "
            "(it serves: other-model)"
        ]
        cfg["generation"]["model"] = "other-model"
        assert preflight(RunConfig.model_validate(cfg)) == []


def test_topics_expand_checks_before_it_asks(tmp_path: Path, write_config) -> None:
    """`topics expand` on a dead endpoint, writing under a file: both problems in one go, exit
    2 in seconds (no Prefect server started), no topic file, no traceback."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    dead = f"http://user:pw-planted@127.0.0.1:{_closed_port()}/v1"
    config = write_config(fake_backend_config(dead, tmp_path / "out"))
    started = time.monotonic()
    run = subprocess.run(
        [*BOOKSMITH, "topics", "expand", "Optics", "-o", str(blocker / "t.jsonl"),
         "--config", str(config)],
        env={k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr[-2000:]
    assert time.monotonic() - started < 30
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("error: ") for line in lines), lines
    assert "generation.base_url: nothing answers at http://user:***@127.0.0.1:" in lines[0]
    assert f"--output: {blocker} is a file, not a directory" in lines[1]
    assert "pw-planted" not in run.stderr and "Traceback" not in run.stderr


# -- every other answer an endpoint can give (issue 15 point 7) --------------------------------


@contextmanager
def _scripted(routes: dict[str, tuple[int, str, bytes]], tls: Path | None = None) -> Iterator[str]:
    """A server that answers each path with (status, content type, body), 404 elsewhere;
    over TLS with a self-signed certificate when `tls` is a directory for it."""

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            status, kind, body = routes.get(self.path, (404, "application/json", b"{}"))
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    scheme = "http"
    if tls is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*_self_signed(tls))
        server.socket = context.wrap_socket(server.socket, server_side=True)
        scheme = "https"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"{scheme}://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def _self_signed(folder: Path) -> tuple[str, str]:
    from datetime import UTC, datetime, timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert_file), str(key_file)


def _problems(base_url: str, tmp_path: Path) -> list[str]:
    return preflight(RunConfig.model_validate(fake_backend_config(base_url, tmp_path / "out")))


def test_a_base_url_with_the_wrong_path(tmp_path: Path) -> None:
    with FakeServer() as server:  # the project's server, asked without its /v1
        root = server.base_url.removesuffix("/v1")
        assert _problems(server.base_url, tmp_path) == []
        (line,) = _problems(root, tmp_path)
    assert line.startswith(f"generation.base_url: {root} has no OpenAI-compatible API at this")
    assert "serve under /v1" in line


def test_a_web_page_instead_of_an_api(tmp_path: Path) -> None:
    page = (200, "text/html; charset=utf-8", b"<html><body>Sign in</body></html>")
    with _scripted({"/v1/models": page}) as url:
        (line,) = _problems(url, tmp_path)
    assert line == (
        f"generation.base_url: {url} answered text/html (HTTP 200), not an OpenAI-compatible "
        "API's JSON; check the URL (a web page, a login or a proxy's error page?)"
    )


def test_a_server_without_models_is_asked_for_one_token(tmp_path: Path) -> None:
    answer = json.dumps({"choices": [{"message": {"content": "p"}}]}).encode()
    with _scripted({"/v1/chat/completions": (200, "application/json", answer)}) as url:
        assert _problems(url, tmp_path) == []
    missing = json.dumps(
        {"error": {"message": "The model `fake-model` does not exist.", "code": 404}}
    ).encode()
    with _scripted({"/v1/chat/completions": (404, "application/json", missing)}) as url:
        assert _problems(url, tmp_path) == [
            f"generation.model: 'fake-model' is not served at {url} "
            "(The model `fake-model` does not exist.)"
        ]


def test_a_certificate_that_does_not_verify(tmp_path: Path) -> None:
    ok = (200, "application/json", b'{"data": [{"id": "fake-model"}]}')
    with _scripted({"/v1/models": ok}, tls=tmp_path) as url:
        (line,) = _problems(url, tmp_path)
    assert line.startswith(f"generation.base_url: TLS with {url} failed (")
    assert "CERTIFICATE_VERIFY_FAILED" in line and "SSL_CERT_FILE" in line
