"""Start the embedded OpenAI-compatible server as a child process, and always stop it.

    with EmbeddedServer() as server:
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key="unused")

The child runs in its own process group (so a Ctrl-C aimed at the parent's group does not race our
shutdown) and, on Linux, is told by the kernel to die with its parent (PR_SET_PDEATHSIG), so a
crashed or killed parent leaves no server behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from booksmith.generation.embedded.model import MODEL_NAME, prepared_model

_PR_SET_PDEATHSIG = 1
_REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """preexec_fn: ask Linux to SIGTERM this child when the parent dies.

    Caveat: the kernel tracks the forking *thread*; start the server from a thread that outlives
    it (the main thread, or a long-lived worker), which a `with` block guarantees.
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class EmbeddedServerError(RuntimeError):
    """The embedded server did not come up."""


class EmbeddedServer:
    """The embedded model served on 127.0.0.1 for the lifetime of a `with` block."""

    def __init__(
        self,
        model_path: Path | None = None,
        n_parallel: int = 8,
        n_threads: int = 2,
        ctx_per_seq: int = 2048,
        host: str = "127.0.0.1",
        port: int | None = None,
        startup_timeout_s: float = 180,
        log_path: Path | None = None,
    ) -> None:
        self.model_path = Path(model_path) if model_path is not None else None
        self.n_parallel = n_parallel
        self.n_threads = n_threads
        self.ctx_per_seq = ctx_per_seq
        self.host = host
        self.port = port
        self.startup_timeout_s = startup_timeout_s
        self.log_path = Path(log_path) if log_path is not None else None
        self.model_name = MODEL_NAME
        self.process: subprocess.Popen[bytes] | None = None
        self._own_log = False

    @property
    def base_url(self) -> str:
        """The OpenAI base URL (…/v1) to hand to an OpenAI client."""
        if self.port is None:
            raise EmbeddedServerError("the server is not started")
        return f"http://{self.host}:{self.port}/v1"

    @property
    def health_url(self) -> str:
        return f"http://{self.host}:{self.port}/health"

    def start(self) -> EmbeddedServer:
        if self.process is not None:
            return self
        model = self.model_path or prepared_model()
        if self.port is None:
            self.port = free_port(self.host)
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="booksmith-embedded-", suffix=".log")
            os.close(fd)
            self.log_path, self._own_log = Path(name), True
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable, "-m", "booksmith.generation.embedded.server",
            "--model", str(model), "--model-name", self.model_name,
            "--host", self.host, "--port", str(self.port),
            "--parallel", str(self.n_parallel), "--threads", str(self.n_threads),
            "--ctx-per-seq", str(self.ctx_per_seq),
        ]  # fmt: skip
        if self._own_log:  # removed by the server too, should this process be killed
            command += ["--remove-log", str(self.log_path)]
        env = dict(os.environ)
        # The child must import this package even when booksmith is not pip-installed.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_REPO_ROOT), env.get("PYTHONPATH")]))
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent,  # only calls prctl: safe after fork
            )
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_healthy(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            code = self.process.poll()
            if code is not None:
                raise EmbeddedServerError(
                    f"the embedded server exited with code {code} during start-up; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            with (
                contextlib.suppress(urllib.error.URLError, OSError),
                urllib.request.urlopen(self.health_url, timeout=2) as response,
            ):
                if response.status == 200:
                    return
            if time.monotonic() > deadline:
                raise EmbeddedServerError(
                    f"the embedded server was not healthy within {self.startup_timeout_s:.0f} s; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def log_tail(self, n_lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n_lines:])

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM the server's process group, SIGKILL it after `timeout_s`."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            self._signal_group(process, signal.SIGTERM)
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self._signal_group(process, signal.SIGKILL)
                process.wait()
        if self._own_log and self.log_path is not None:
            self.log_path.unlink(missing_ok=True)

    @staticmethod
    def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
        try:
            os.killpg(process.pid, sig)  # the group is the server's own (start_new_session)
        except ProcessLookupError:
            pass
        except PermissionError:
            process.send_signal(sig)

    def __enter__(self) -> EmbeddedServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
