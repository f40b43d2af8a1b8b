"""Topic expansion: grow seed topics into a tree of subtopics with an LLM.

Per level, every frontier topic asks the LLM for `breadth` subtopics. Answers are parsed as a
JSON list when they are one (structured output where the endpoint supports it), and as a
tolerant list (numbers, bullets, bold, "Title: description") when they are not. Children are
dropped, with a counted reason, when they are empty or junk (URLs, template syntax, chatter,
over 12 words, generic section names such as "Introduction" or "Summary"), repeat their parent,
each other or a topic already in the tree (normalised text, or word-set Jaccard >= 0.7 as with
near-duplicate titles), or are off-topic: the LLM is asked whether each child belongs under its
parent. Where it gives no usable answer (a small model often cannot), the lexical rules above
are the fallback: a child that passed them is kept, counted as `lexical`. Requests go through
the generation client, so expansion is cached (a killed expansion resumes without re-asking),
rate-limited and budgeted.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from booksmith.schemas import GenerationRequest, GenerationResult, Sampling, TopicSeed

Complete = Callable[[Sequence[GenerationRequest]], Awaitable[dict[str, GenerationResult]]]

MAX_TITLE_CHARS = 100
MAX_TITLE_WORDS = 12
SIMILAR = 0.7  # word-set Jaccard at which two titles are the same topic
_STOP = frozenset(
    [
        "a",
        "an",
        "the",
        "of",
        "and",
        "or",
        "in",
        "on",
        "to",
        "for",
        "with",
        "by",
        "from",
        "at",
        "as",
        "its",
        "their",
        "into",
        "about",
        "how",
        "what",
        "why",
    ]
)
_BULLET = re.compile(r"^\s*(?:[-*•·+]|\(?\d{1,3}[.)\]:]|\(?[a-zA-Z][.)])\s+")
_CHATTER = re.compile(
    r"^(sure|here (are|is)|certainly|of course|i('| a)m|i can|sorry|as an ai|below|these|"
    r"subtopics?\b)",
    re.I,
)
# Section names, not topics: what small models list when they misread the request.
_GENERIC = frozenset(
    [
        "answer",
        "answers",
        "appendix",
        "bibliography",
        "chapter",
        "conclusion",
        "example",
        "examples",
        "exercise",
        "exercises",
        "further",
        "glossary",
        "introduction",
        "key",
        "lesson",
        "no",
        "none",
        "note",
        "notes",
        "overview",
        "practice",
        "problems",
        "questions",
        "quiz",
        "reading",
        "references",
        "review",
        "section",
        "subtopics",
        "summary",
        "terms",
        "topics",
        "unit",
        "yes",
    ]
)
_JUNK = re.compile(r"https?://|www\.|\{\{|\}\}|\{%|%\}|<\|?[a-z_]+\|?>|[\x00-\x08\x0b-\x1f]")


@dataclass
class TopicNode:
    topic: str
    path: list[str]  # ancestors, root first
    depth: int

    @property
    def subject(self) -> str:
        return self.path[0] if self.path else self.topic

    def to_seed(self) -> TopicSeed:
        return TopicSeed(topic=self.topic, subject=self.subject, path=self.path)


@dataclass
class ExpansionReport:
    requests: int = 0
    answers_unparsed: int = 0
    answers_failed: int = 0  # the request itself failed (recorded in the failures table)
    proposed: int = 0
    kept: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    relevance: Counter[str] = field(default_factory=Counter)  # llm_yes, llm_no, lexical_*


def normalise(title: str) -> str:
    text = unicodedata.normalize("NFKC", title).casefold()
    text = re.sub(r"[^\w\s]", " ", text)
    words = [w for w in text.split() if w not in ("the", "a", "an")]
    return " ".join(words)


def _words(text: str) -> set[str]:
    return {w.rstrip("s") for w in normalise(text).split() if w not in _STOP}


def similar(a: str, b: str) -> bool:
    if normalise(a) == normalise(b):
        return True
    wa, wb = _words(a), _words(b)
    return bool(wa and wb) and len(wa & wb) / len(wa | wb) >= SIMILAR


def parse_subtopics(answer: str) -> list[str] | None:
    """Titles from an LLM answer, or None when nothing list-like is in it."""
    answer = answer.strip()
    match = re.search(r"\[.*\]", answer, re.S)
    if match:
        try:
            data = json.loads(match.group(0))
        except json.JSONDecodeError:
            data = None
        if isinstance(data, list):
            titles = []
            for item in data:
                if isinstance(item, dict):
                    item = next(
                        (item[k] for k in ("topic", "title", "name", "subtopic") if k in item), ""
                    )
                if isinstance(item, str | int | float):
                    titles.append(str(item).strip())
            return titles
    if answer.startswith("{"):
        try:
            data = json.loads(answer)
            values = data.get("subtopics") or data.get("topics") if isinstance(data, dict) else None
            if isinstance(values, list):
                return [str(v).strip() for v in values if isinstance(v, str | int | float)]
        except json.JSONDecodeError:
            pass
    lines = [line.strip() for line in answer.splitlines() if line.strip()]
    if not any(_BULLET.match(line) for line in lines) and (
        len(lines) < 2 or any(len(line.split()) > 8 for line in lines)
    ):
        return None  # prose, not a list
    titles = []
    for line in lines:
        if not line or (line.endswith(":") and not _BULLET.match(line)):
            continue
        if not _BULLET.match(line) and _CHATTER.match(line):
            continue
        line = _BULLET.sub("", line)
        line = re.sub(r"[*_`#]+", "", line).strip()
        line = re.split(r"\s+[-–—]\s+|:\s+", line, maxsplit=1)[0].strip()  # drop descriptions
        line = line.strip(" .;,\"'")
        if line:
            titles.append(line)
    return titles or None


def junk_reason(title: str) -> str | None:
    if not title.strip():
        return "empty"
    if len(title) > MAX_TITLE_CHARS or len(title.split()) > MAX_TITLE_WORDS:
        return "too_long"
    if _JUNK.search(title) or not re.search(r"[^\W\d_]", title):
        return "junk"
    if _CHATTER.match(title):
        return "junk"
    words = normalise(title).split()
    if all(w in _GENERIC or w.isdigit() for w in words) or normalise(title) in _GENERIC:
        return "generic"
    return None


def expansion_prompt(node: TopicNode, breadth: int, existing: Sequence[str]) -> str:
    where = " > ".join([*node.path, node.topic])
    avoid = f" Do not repeat: {'; '.join(existing[:20])}." if existing else ""
    return (
        f'List {breadth} distinct subtopics of "{node.topic}" (within {where}) that a textbook '
        f"would teach as separate sections.{avoid} Answer with a JSON list of short titles only, "
        'like ["First subtopic", "Second subtopic"].'
    )


def relevance_prompt(child: str, node: TopicNode) -> str:
    where = " > ".join([*node.path, node.topic])
    return (
        f'Is "{child}" a subtopic of "{node.topic}" ({where}) that belongs in a textbook about '
        f'it? Answer only "yes" or "no".'
    )


def parse_yes_no(answer: str) -> bool | None:
    words = re.findall(r"[a-z]+", answer.casefold())[:3]
    if words and words[0] in ("yes", "y", "true", "correct"):
        return True
    if words and words[0] in ("no", "n", "false", "not"):
        return False
    return None


@dataclass
class TopicExpander:
    complete: Complete
    model: str
    breadth: int = 8
    depth: int = 2
    relevance_check: bool = True
    sampling: Sampling = field(
        default_factory=lambda: Sampling(max_tokens=256, temperature=0.7, top_p=0.95)
    )
    response_format: dict[str, object] | None = None  # JSON schema, where the endpoint has it
    report: ExpansionReport = field(default_factory=ExpansionReport)

    def _request(
        self, prompt: str, sampling: Sampling, *, structured: bool = False, **meta: Any
    ) -> GenerationRequest:
        fmt = json.dumps(self.response_format) if structured and self.response_format else None
        return GenerationRequest.build(
            messages=[{"role": "user", "content": prompt}],
            model=self.model,
            sampling=sampling,
            response_format=fmt,
            **meta,
        )

    async def expand(self, roots: Sequence[str], existing: Sequence[str] = ()) -> list[TopicNode]:
        """The tree, parents before children, roots first (depth 0)."""
        tree = [TopicNode(topic=r.strip(), path=[], depth=0) for r in roots if r.strip()]
        known = [*existing, *(n.topic for n in tree)]
        frontier = list(tree)
        for level in range(1, self.depth + 1):
            asks = [
                (
                    node,
                    self._request(
                        expansion_prompt(node, self.breadth, [t for t in known if t != node.topic]),
                        self.sampling,
                        topic=node.topic,
                        topic_path=[*node.path, node.topic],
                        structured=True,
                    ),
                )
                for node in frontier
            ]
            results = await self.complete([req for _, req in asks])
            self.report.requests += len(asks)
            candidates: list[tuple[TopicNode, str]] = []
            for node, req in asks:
                result = results.get(req.id)
                if result is None or not result.ok:
                    self.report.answers_failed += 1
                    continue
                titles = parse_subtopics(result.text)
                if titles is None:
                    self.report.answers_unparsed += 1
                    continue
                kept_here: list[str] = []
                for title in titles[: self.breadth * 2]:
                    self.report.proposed += 1
                    reason = self._drop_reason(title, node, kept_here, known)
                    if reason:
                        self.report.dropped[reason] += 1
                        continue
                    kept_here.append(title)
                    candidates.append((node, title))
                known.extend(kept_here)
            accepted = await self._relevant(candidates)
            frontier = []
            for node, title in accepted:
                if sum(1 for n in frontier if n.path == [*node.path, node.topic]) >= self.breadth:
                    self.report.dropped["over_breadth"] += 1
                    continue
                child = TopicNode(topic=title, path=[*node.path, node.topic], depth=level)
                frontier.append(child)
            tree.extend(frontier)
            self.report.kept += len(frontier)
        return tree

    def _drop_reason(
        self, title: str, parent: TopicNode, siblings: Sequence[str], known: Sequence[str]
    ) -> str | None:
        if reason := junk_reason(title):
            return reason
        if similar(title, parent.topic) or any(similar(title, p) for p in parent.path):
            return "repeats_parent"
        if any(similar(title, s) for s in siblings):
            return "duplicate_sibling"
        if any(similar(title, k) for k in known):
            return "duplicate_existing"
        return None

    async def _relevant(
        self, candidates: list[tuple[TopicNode, str]]
    ) -> list[tuple[TopicNode, str]]:
        verdicts: dict[int, bool | None] = {}
        if self.relevance_check and candidates:
            check = Sampling(max_tokens=4, temperature=0.0, top_p=1.0)
            reqs = [
                self._request(relevance_prompt(title, node), check) for node, title in candidates
            ]
            results = await self.complete(reqs)
            self.report.requests += len(reqs)
            for i, req in enumerate(reqs):
                result = results.get(req.id)
                verdicts[i] = parse_yes_no(result.text) if result and result.ok else None
        kept = []
        for i, (node, title) in enumerate(candidates):
            verdict = verdicts.get(i)
            if verdict is None:  # no usable answer: the lexical rules it passed decide
                verdict = True
                self.report.relevance["lexical"] += 1
            else:
                self.report.relevance["llm_yes" if verdict else "llm_no"] += 1
            if verdict:
                kept.append((node, title))
            else:
                self.report.dropped["off_topic"] += 1
        return kept


def write_topic_file(nodes: Sequence[TopicNode], path: Path, *, leaves_only: bool = False) -> int:
    """Write the tree as a JSONL seed file that `booksmith run --topics` reads; atomically."""
    parents = {tuple([*n.path, n.topic]) for n in nodes}
    has_child = {tuple(n.path) for n in nodes if n.path}
    rows = [
        n.to_seed().model_dump(exclude={"weight"})
        for n in nodes
        if not leaves_only or tuple([*n.path, n.topic]) not in has_child
    ]
    assert all(tuple(r["path"]) in parents or not r["path"] for r in rows)
    tmp = path.with_name(f".{path.name}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    tmp.replace(path)
    return len(rows)
