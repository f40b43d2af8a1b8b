"""The passage cutter against the one it replaced (kept below, verbatim but for names, as the
reference): the same spans and counts on varied texts, windows and counters, so passage keys
(which a span decides) stay what earlier runs recorded; and the text it counts, which is what
planning a source costs."""

from __future__ import annotations

import pydoc_data.topics
import random
import re
from collections.abc import Callable

import pytest

from benchmarks.sources_scale import write_source
from booksmith.generation.passages import cut_passages
from booksmith.shards.encodings import get_encoding

Counter = Callable[[str], int]


# -- the reference: generation/passages.py before its counts were reused ----------------------

_REF_PARAGRAPH = re.compile(r"\n[ \t]*\n\s*")
_REF_LINE = re.compile(r"\n")
_REF_SLACK = 8


def reference_cut(
    text: str, count: Counter, min_tokens: int, max_tokens: int
) -> list[tuple[int, int, int]]:
    paragraphs = _ref_split(text, 0, len(text), _REF_PARAGRAPH)
    units = [u for p in paragraphs for u in _ref_fit(text, p, count, max_tokens)]
    spans = _ref_exact(text, _ref_pack(text, units, count, max_tokens, bounded=True), count)
    if any(n > max_tokens for _, _, n in spans):  # a bound that did not hold: count every join
        spans = _ref_pack(text, units, count, max_tokens)
    if len(spans) > 1 and spans[-1][2] < min_tokens:
        n = count(text[spans[-2][0] : spans[-1][1]])
        if n <= max_tokens:
            last = spans.pop()
            spans[-1] = (spans[-1][0], last[1], n)
    out: list[tuple[int, int, int]] = []
    for start, end, n in spans:
        if n >= min_tokens:
            out.append((start, end, n))
    return out


def _ref_split(text: str, start: int, end: int, sep: re.Pattern[str]) -> list[tuple[int, int]]:
    """Spans of the non-blank pieces of text[start:end] between matches of `sep`, trailing
    whitespace trimmed."""
    spans, at = [], start
    for m in sep.finditer(text, start, end):
        spans.append((at, m.start()))
        at = m.end()
    spans.append((at, end))
    trimmed = []
    for s, e in spans:
        piece = text[s:e]
        lead = len(piece) - len(piece.lstrip())
        body = piece.strip()
        if body:
            trimmed.append((s + lead, s + lead + len(body)))
    return trimmed


def _ref_fit(
    text: str, span: tuple[int, int], count: Counter, max_tokens: int
) -> list[tuple[int, int, int]]:
    """(start, end, tokens) pieces of one paragraph, each within max_tokens: the paragraph
    whole, else its lines, else runs of words."""
    start, end = span
    n = count(text[start:end])
    if n <= max_tokens:
        return [(start, end, n)]
    lines = _ref_split(text, start, end, _REF_LINE)
    if len(lines) > 1:
        pieces = [p for line in lines for p in _ref_fit(text, line, count, max_tokens)]
        return _ref_pack(text, pieces, count, max_tokens)
    words = [(start + m.start(), start + m.end()) for m in re.finditer(r"\S+", text[start:end])]
    # (a single word over the window is kept whole: there is no boundary to cut it at)
    return _ref_pack(text, [(s, e, count(text[s:e])) for s, e in words], count, max_tokens)


def _ref_pack(
    text: str,
    pieces: list[tuple[int, int, int]],
    count: Counter,
    max_tokens: int,
    bounded: bool = False,
) -> list[tuple[int, int, int]]:
    """Consecutive pieces joined while the joined text (whitespace between them included)
    stays within max_tokens, counted exactly. `bounded`: a join whose bound (the two counts,
    a token per character of the whitespace between, one more for the seam) fits with room
    to spare is taken without counting; counting the growing passage at every join was most
    of the time a source took to plan. The caller counts the results exactly."""
    out: list[tuple[int, int, int]] = []
    for s, e, n in pieces:
        if out and out[-1][2] + n <= max_tokens:
            start, end, had = out[-1]
            bound = had + n + (s - end) + 1
            if bounded and bound + _REF_SLACK <= max_tokens:
                out[-1] = (start, e, bound)
                continue
            joined = count(text[start:e])
            if joined <= max_tokens:
                out[-1] = (start, e, joined)
                continue
        out.append((s, e, n))
    return out


def _ref_exact(
    text: str, spans: list[tuple[int, int, int]], count: Counter
) -> list[tuple[int, int, int]]:
    return [(s, e, count(text[s:e])) for s, e, _ in spans]


# -- the cutter against it ---------------------------------------------------------------------

ENC = get_encoding("cl100k_base")


def tokens(text: str) -> int:
    return len(ENC.encode_ordinary(text))


def squared(text: str) -> int:
    """A count that grows faster than its parts' (bounds fail: the exact repacking path)."""
    return len(text) * len(text) // 4000


@pytest.fixture(scope="module")
def texts(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """pydoc's topics (code, lists, long lines), the benchmark's synthetic records, and texts
    built for the edges: a paragraph of one long line, a word longer than the window, CRLF and
    blank lines of spaces, non-ASCII text, nothing but whitespace, a record under the window."""
    import json

    out = list(pydoc_data.topics.topics.values())
    source = tmp_path_factory.mktemp("synthetic") / "s.jsonl"
    write_source(source, 300)
    rows = [json.loads(line)["text"] for line in source.read_text().splitlines()]
    out += rows
    rng = random.Random(5)
    words = " ".join(rows[:50]).split()
    for _ in range(60):  # records of several synthetic extracts, some paragraphs run together
        parts = rng.sample(rows, rng.randint(2, 6))
        glue = rng.choice(["\n\n", "\n \t\n\n", "\r\n\r\n", "\n"])
        out.append(glue.join(parts))
    return [
        *out,
        " ".join(rng.choice(words) for _ in range(2000)),  # one paragraph, one line
        "\n".join(" ".join(rng.choice(words) for _ in range(40)) for _ in range(80)),
        "x" * 5000 + "\n\nshort tail after a word longer than any window",
        "Ünïcödé — ça va? 日本語のテキスト。\n\n" * 200,
        " \n\t\n  \n",
        "",
        "too short",
    ]


@pytest.mark.parametrize("count", [tokens, squared], ids=["tiktoken", "non_additive"])
@pytest.mark.parametrize("window", [(64, 512), (64, 256), (16, 64), (8, 8)])
def test_passages_are_the_reference_cutters(
    texts: list[str], count: Counter, window: tuple[int, int]
) -> None:
    """Same spans and counts as before, so a passage's key (its span) is what earlier runs
    recorded and a later run skips it."""
    lo, hi = window
    for text in texts:
        got = [(p.start, p.end, p.n_tokens) for p in cut_passages(text, count, lo, hi)]
        assert got == reference_cut(text, count, lo, hi), text[:80]


def test_the_cutter_counts_less_text_than_the_reference(texts: list[str]) -> None:
    """A span that is one piece, or that an exact join already counted, is not counted again:
    the characters encoded are most of what cutting a source costs (5% fewer on these texts;
    a passage that is one paragraph is not counted twice)."""
    counted = {"new": 0, "old": 0}

    def counter(key: str) -> Counter:
        def count(text: str) -> int:
            counted[key] += len(text)
            return tokens(text)

        return count

    for text in texts:
        cut_passages(text, counter("new"), 64, 512)
        reference_cut(text, counter("old"), 64, 512)
    assert counted["new"] < 0.97 * counted["old"], counted
