"""`booksmith view [OUT_DIR | VERSION_DIR | URL]`: serve the read-only viewer (viewer/) locally."""

from __future__ import annotations

import socket
import threading
import webbrowser
from typing import Annotated

import typer
from rich.markup import escape

from booksmith.flows.cli_errors import console, fail, one_line

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: a free one, chosen by the kernel, so no race with others).
    Its proto is IPPROTO_TCP, not the default 0: accepted connections inherit it, and asyncio
    turns Nagle off (TCP_NODELAY) only where proto says TCP; with Nagle on, uvicorn's two
    writes per response (head, body) wait for the browser's delayed ACK, up to 40 ms a page."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


def view(
    location: Annotated[
        str,
        typer.Argument(help="An output directory, one dataset version, or an export URL."),
    ] = "out",
    port: Annotated[int, typer.Option(help="Port (default: a free one).")] = 0,
    host: Annotated[
        str, typer.Option(help="Address to listen on; anything but loopback is warned about.")
    ] = "127.0.0.1",
    open_browser: Annotated[
        bool, typer.Option("--open", help="Open the page in a web browser.")
    ] = False,
) -> None:
    """Read what a run kept and why the rest was dropped, in a local web page (read-only)."""
    import uvicorn

    from booksmith.viewer.app import create_app
    from booksmith.viewer.store import Output, ViewError

    try:
        output = Output(location)
    except ViewError as e:
        fail(str(e))
    if host not in LOOPBACK:
        console.print(
            f"[yellow]warning:[/yellow] listening on {escape(host)}: anyone who can reach this "
            "machine can read these datasets (read-only; credentials are redacted)",
            highlight=False,
        )
    try:
        sock = bind(host, port)
    except OSError as e:
        fail(f"{host}:{port}: cannot listen there ({one_line(e)}); pick another --port")
    name = f"[{host}]" if ":" in host else host
    url = f"http://{name}:{sock.getsockname()[1]}/"
    print(url, flush=True)  # stdout: the address, for scripts
    config = uvicorn.Config(create_app(output), log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    if open_browser:
        threading.Timer(0.5, webbrowser.open, [url]).start()
    server.run(sockets=[sock])
