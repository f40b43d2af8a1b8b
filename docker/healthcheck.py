"""Container health checks for the booksmith image (docker-compose.yml's `healthcheck:` lines).

Usage: python /app/docker/healthcheck.py TARGET [TARGET ...]

Each TARGET is either a URL (an HTTP GET must answer 2xx) or HOST:PORT (a TCP connection must
open). Exit 0 when every target answers, 1 with a one-line reason otherwise. Standard library
only, so it runs in any Python image with nothing installed, and it never prints a secret: the
Prefect health endpoints it is pointed at need no credentials.
"""

from __future__ import annotations

import socket
import sys
import urllib.error
import urllib.request

TIMEOUT_S = 5.0


def check(target: str) -> str | None:
    """None when the target answers, else why not."""
    if "://" in target:
        try:
            with urllib.request.urlopen(target, timeout=TIMEOUT_S) as resp:
                status = resp.status
        except (urllib.error.URLError, OSError) as e:
            return f"{target}: {e}"
        return None if 200 <= status < 300 else f"{target}: HTTP {status}"
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        return f"{target}: expected a URL or HOST:PORT"
    try:
        with socket.create_connection((host, int(port)), timeout=TIMEOUT_S):
            return None
    except OSError as e:
        return f"{target}: {e}"


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: healthcheck.py URL|HOST:PORT ...", file=sys.stderr)
        return 2
    for target in argv:
        problem = check(target)
        if problem:
            print(f"unhealthy: {problem}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
