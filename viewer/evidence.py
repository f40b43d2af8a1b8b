"""What the pages show beside a document's fields: its text as markdown, the passages a
near-duplicate shares with the document it matched, the reason's figures, a manifest with every
credential redacted, and what changed between two configs."""

from __future__ import annotations

import json
import unicodedata
from typing import Any

import regex
from markdown_it import MarkdownIt
from markupsafe import Markup, escape

from booksmith.schemas.redact import redact_config

# Raw HTML in a generated text is shown as text, never run; markdown-it also refuses
# javascript: and data: links. Math stays as written (no renderer ships offline).
_MARKDOWN = MarkdownIt("commonmark", {"html": False}).enable(["table", "strikethrough"])
# dedup's word rule (filters/dedup/normalize.py): runs of letters, marks and digits
_WORD = regex.compile(r"[\p{L}\p{M}\p{N}]+")
NGRAM = 5  # dedup's default shingle


def render_markdown(text: str) -> Markup:
    return Markup(_MARKDOWN.render(text))  # markdown-it escapes: html is off


def _words(text: str) -> list[tuple[int, int, str]]:
    return [
        (m.start(), m.end(), unicodedata.normalize("NFKC", m.group()).lower())
        for m in _WORD.finditer(text)
    ]


def _shingles(words: list[tuple[int, int, str]], n: int) -> list[tuple[str, ...]]:
    if not words:
        return []
    if len(words) < n:
        return [tuple(w[2] for w in words)]
    return [tuple(w[2] for w in words[i : i + n]) for i in range(len(words) - n + 1)]


def _marked(text: str, words: list[tuple[int, int, str]], shared: set, n: int) -> Markup:
    """`text`, escaped, with every run of words covered by a shared shingle in <mark>."""
    covered = [False] * len(words)
    for i, shingle in enumerate(_shingles(words, n)):
        if shingle in shared:
            covered[i : i + n] = [True] * min(n, len(words) - i)
    parts, pos, i = [], 0, 0
    while i < len(words):
        if not covered[i]:
            i += 1
            continue
        j = i
        while j + 1 < len(words) and covered[j + 1]:
            j += 1
        start, end = words[i][0], words[j][1]
        parts += [str(escape(text[pos:start])), f"<mark>{escape(text[start:end])}</mark>"]
        pos, i = end, j + 1
    parts.append(str(escape(text[pos:])))
    return Markup("".join(parts))  # every piece of text above is escaped


def shared_passages(a: str, b: str, n: int = NGRAM) -> tuple[Markup, Markup, float]:
    """Both texts with the passages they share highlighted, and the exact Jaccard of their
    word n-gram sets (the figure dedup's MinHash estimates)."""
    wa, wb = _words(a), _words(b)
    sa, sb = set(_shingles(wa, n)), set(_shingles(wb, n))
    shared = sa & sb
    jaccard = len(shared) / len(sa | sb) if sa | sb else 1.0
    return _marked(a, wa, shared, n), _marked(b, wb, shared, n), jaccard


def detail(raw: str | None) -> dict[str, Any]:
    """A rejected record's `detail` JSON as a dict ({"detail": raw} when it is not JSON)."""
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        return {"detail": raw}
    return value if isinstance(value, dict) else {"detail": value}


def redacted(value: Any) -> Any:
    """Any JSON-like value with credentials in every URL masked, whatever the manifest holds
    (written before redaction existed, or by hand)."""
    return redact_config(value)


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out |= flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    return {prefix: value}


def config_changes(before: dict[str, Any], after: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, before, after) for each config setting that differs, keys dotted."""
    a, b = flatten(redacted(before)), flatten(redacted(after))
    return [(k, a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]
