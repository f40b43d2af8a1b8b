"""JSON Lines input, one object per line, with errors that name the file and line."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


def iter_jsonl(
    path: Path, error: type[Exception] = ValueError
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line; `error` is raised for bad JSON, a
    non-object line or bytes that are not UTF-8."""
    try:
        with open(path, encoding="utf-8") as f:
            yield from parse_lines(f, str(path), error)
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (byte {e.start})") from None


def parse_lines(
    lines: Iterable[str], where: str, error: type[Exception] = ValueError
) -> Iterator[tuple[int, dict[str, Any]]]:
    """`iter_jsonl` over lines already opened (a file in an object store, say); `where` names
    the file in errors."""
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{where}:{lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise error(f"{where}:{lineno}: expected a JSON object per line")
        yield lineno, row
