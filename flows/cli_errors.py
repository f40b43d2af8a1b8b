"""How every booksmith command fails: one line on stderr that names what is wrong and the fix,
and an exit code that says which kind. No traceback: the messages of the errors below are
written to be read alone (an unexpected exception still shows its traceback); `--debug` (or
BOOKSMITH_DEBUG=1) prints the traceback above the line too.

Exit codes: 0 done; 1 an unexpected error (a bug: the traceback is shown) or a check that
found problems (`verify`; a takedown that could not reach every copy, each one listed); 2 bad
input or configuration (a setting, a file, an argument, an unreachable endpoint, bucket or
Redis found by preflight); 3 the endpoint failed mid-run (the
circuit breaker stopped it; rerun to resume); 4 the run finished but was not published (it kept
nothing, or most requests failed: its files are set aside under _state/failed/).
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

EXIT_BAD_INPUT = 2  # a setting, a file or an argument is wrong
EXIT_ENDPOINT_FAILING = 3  # the circuit breaker stopped the run (generation/breaker.py)
EXIT_NOT_PUBLISHED = 4  # the run finished with nothing worth a version (pipeline/publish.py)

console = Console(stderr=True)


def one_line(e: BaseException) -> str:
    """An exception's message on one line (some libraries' messages span several)."""
    return " ".join(str(e).split()) or type(e).__name__


EXIT_CODES_HELP = (
    "Exit codes: 0 done; 1 unexpected error; 2 bad input or configuration (one line says "
    "which setting and the fix); 3 the endpoint failed mid-run (rerun to resume); 4 the run "
    "kept nothing or mostly failed, so it was not published. "
    "--debug or BOOKSMITH_DEBUG=1 shows tracebacks."
)


def debugging() -> bool:
    return os.environ.get("BOOKSMITH_DEBUG", "") not in ("", "0")


def fail(message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    """One line per problem (preflight reports all it found at once), then exit `code`; with
    --debug, the traceback of the exception being handled first."""
    if debugging() and sys.exc_info()[1] is not None:
        console.print_exception()
    for line in message.splitlines() or [""]:
        console.print(f"[red]error:[/red] {escape(line)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def user_errors(*extra: type[BaseException]) -> tuple[type[BaseException], ...]:
    """The exceptions a user's input or setup causes, with `extra` a command adds. Imported
    here, not at the top, so `booksmith --help` stays quick; the trainer's (which import
    torch, seconds) are the train command's `extra`."""
    from booksmith.filters.dedup import DedupIndexError
    from booksmith.filters.inputs import InputError
    from booksmith.generation.backends import BackendError
    from booksmith.generation.estimate import OverBudget
    from booksmith.generation.preflight import PreflightFailed
    from booksmith.generation.seeds import SeedFileError
    from booksmith.prompts import PromptError
    from booksmith.schemas.config import ConfigError
    from booksmith.schemas.filter_settings import FilterError
    from booksmith.schemas.manifest import ManifestError
    from booksmith.shards.encodings import EncodingUnavailable
    from booksmith.shards.export import ExportError
    from booksmith.shards.files import DiskFull

    errors: tuple[type[BaseException], ...] = (
        ConfigError, SeedFileError, PromptError, BackendError, PreflightFailed, FilterError,
        InputError, ManifestError, DedupIndexError, EncodingUnavailable, ExportError, OverBudget,
        DiskFull, FileNotFoundError, NotADirectoryError, PermissionError,
        *extra,
    )  # fmt: skip
    try:  # S3 errors (credentials, endpoint, bucket): botocore is there when S3 is
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        return errors
    return (*errors, BotoCoreError, ClientError)
