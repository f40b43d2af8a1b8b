"""Read topic seeds from YAML, JSONL or CSV.

Each seed has a `topic` and optionally `subject`, `path` (ancestors, root first: a list, or a
string joined by " > ") and `weight`. A YAML file is a list of seeds (strings or mappings) or a
mapping with a `topics` list. Every error names the file and the line, and is raised before
anything is written.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from booksmith.schemas import TopicSeed

# Topic text is data: template syntax in a seed is almost surely a mistake or an injection.
_TEMPLATE_SYNTAX = re.compile(r"\{\{|\}\}|\{%|%\}|\{#|#\}")
_PATH_SEP = re.compile(r"\s*(?:>|/)\s*")


class SeedFileError(ValueError):
    def __init__(self, path: Path | str, line: int | None, message: str) -> None:
        where = f"{path}:{line}" if line else str(path)
        super().__init__(f"{where}: {message}")
        self.path, self.line = str(path), line


def default_seeds_path() -> Path:
    return Path(str(resources.files("booksmith.prompts") / "topics" / "default.yaml"))


def load_seeds(path: Path | str | None = None) -> list[TopicSeed]:
    """Read a seed file (the bundled default when `path` is None), in file order."""
    path = Path(path) if path is not None else default_seeds_path()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SeedFileError(path, None, "seed file not found") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise SeedFileError(path, line, f"not UTF-8 text (byte {e.start})") from None
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        items = _yaml_items(path, text)
    elif suffix in (".jsonl", ".ndjson"):
        items = _jsonl_items(path, text)
    elif suffix == ".csv":
        items = _csv_items(path, text)
    else:
        raise SeedFileError(path, None, "unknown seed format: use .yaml, .yml, .jsonl or .csv")
    seeds = [_to_seed(path, line, item) for line, item in items]
    if not seeds:
        raise SeedFileError(path, None, "no topics in the file")
    return seeds


def _yaml_items(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark else None
        msg = f"invalid YAML: {getattr(e, 'problem', e)}"
        context = getattr(e, "context_mark", None)
        if context is not None and context.line + 1 != line:
            msg += f" ({getattr(e, 'context', 'started')} at line {context.line + 1})"
        raise SeedFileError(path, line, msg) from None
    if data is None or node is None:
        return
    if isinstance(data, dict):
        if "topics" not in data:
            raise SeedFileError(path, 1, "expected a list of topics or a mapping with `topics`")
        data = data["topics"]
        node = next(v for k, v in node.value if k.value == "topics")
    if not isinstance(data, list):
        raise SeedFileError(path, 1, "expected a list of topics")
    for item_node, item in zip(node.value, data, strict=True):
        yield item_node.start_mark.line + 1, item


def _jsonl_items(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise SeedFileError(path, n, f"invalid JSON: {e.msg} (column {e.colno})") from None


def _csv_items(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is None:
        return
    if "topic" not in reader.fieldnames:
        raise SeedFileError(path, 1, f"CSV header needs a `topic` column, has {reader.fieldnames}")
    for row in reader:
        if None in row:
            raise SeedFileError(path, reader.line_num, "more fields than the header names")
        yield reader.line_num, {k: v for k, v in row.items() if v not in (None, "")}


def _to_seed(path: Path, line: int, item: Any) -> TopicSeed:
    if isinstance(item, str):
        item = {"topic": item}
    if not isinstance(item, dict):
        raise SeedFileError(path, line, f"expected a topic string or mapping, got {item!r}")
    item = dict(item)
    if isinstance(item.get("topic"), str):
        item["topic"] = item["topic"].strip()
    if not item.get("topic"):
        raise SeedFileError(path, line, "missing `topic`")
    if isinstance(item.get("path"), str):
        item["path"] = [p for p in _PATH_SEP.split(item["path"].strip()) if p]
    for key in ("topic", "subject"):
        value = item.get(key)
        if isinstance(value, str) and _TEMPLATE_SYNTAX.search(value):
            raise SeedFileError(
                path, line, f"`{key}` contains template syntax ({value!r}): topics are plain text"
            )
    for part in item.get("path") or []:
        if isinstance(part, str) and _TEMPLATE_SYNTAX.search(part):
            raise SeedFileError(path, line, f"`path` contains template syntax ({part!r})")
    try:
        return TopicSeed.model_validate(item)
    except ValidationError as e:
        msgs = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()
        )
        raise SeedFileError(path, line, msgs) from None
