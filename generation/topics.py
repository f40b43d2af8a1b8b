"""Topic expansion: grow seed topics into a tree of subtopics with an LLM.

Per level, every frontier topic asks the LLM for `breadth` subtopics. With structured output
(`response_format`, on by default) the answer is JSON that a schema bounds: at most `breadth`
titles of at most SCHEMA_TITLE_CHARS characters, and the relevance question below answers from
an enum. An endpoint that rejects response_format (a 400 naming it) is asked again without it,
counted as `structured_fallbacks`, and not asked for it again. Answers are parsed as JSON when
they are, and as a tolerant list (numbers, bullets, bold, "Title: description") when not.
Children are dropped, with a counted reason, when they are empty or junk (URLs, template syntax,
chatter, over 12 words, generic section names such as "Introduction" or "Summary"), repeat their
parent, each other or a topic already in the tree (normalised text, or word-set Jaccard >= 0.7
as with near-duplicate titles), or are off-topic: the LLM is asked whether each child belongs
under its parent. Where it gives no usable answer (a small model often cannot), the lexical
rules above are the fallback: a child that passed them is kept, counted as `lexical`. Requests
go through the generation client, so expansion is cached (a killed expansion resumes without
re-asking), rate-limited and budgeted.
"""

from __future__ import annotations

import copy
import json
import re
import unicodedata
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from booksmith.generation.client import RESPONSE_FORMAT_REJECTED
from booksmith.prompts import render_prompt
from booksmith.schemas import GenerationRequest, GenerationResult, Sampling, TopicSeed

Complete = Callable[[Sequence[GenerationRequest]], Awaitable[dict[str, GenerationResult]]]

MAX_TITLE_CHARS = 100
SCHEMA_TITLE_CHARS = 64  # the length a structured answer's titles are held to
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
    structured_fallbacks: int = 0  # requests re-asked without response_format (rejected)


# The relevance question's structured answer: {"answer": "yes"} or {"answer": "no"}.
RELEVANCE_FORMAT: dict[str, Any] = {
    "type": "json_schema",
    "json_schema": {
        "name": "relevance",
        "schema": {
            "type": "object",
            "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
            "required": ["answer"],
            "additionalProperties": False,
        },
        "strict": True,
    },
}


def subtopics_format(breadth: int) -> dict[str, Any]:
    """The expansion answer's structured output: {"subtopics": [1..breadth short titles]}."""
    titles = {"type": "string", "minLength": 1, "maxLength": SCHEMA_TITLE_CHARS}
    schema = {
        "type": "object",
        "properties": {
            "subtopics": {"type": "array", "items": titles, "minItems": 1, "maxItems": breadth}
        },
        "required": ["subtopics"],
        "additionalProperties": False,
    }
    return {
        "type": "json_schema",
        "json_schema": {"name": "subtopics", "schema": schema, "strict": True},
    }


def bound_subtopics(fmt: dict[str, Any], breadth: int) -> dict[str, Any]:
    """`fmt` with its `subtopics` array bounded as subtopics_format bounds it, where it sets no
    bounds of its own: a static schema (the flow's) cannot know the breadth."""
    fmt = copy.deepcopy(fmt)
    spec = fmt.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    props = schema.get("properties") if isinstance(schema, dict) else None
    array = props.get("subtopics") if isinstance(props, dict) else None
    if not (isinstance(array, dict) and array.get("type") == "array"):
        return fmt
    bounds = subtopics_format(breadth)["json_schema"]["schema"]["properties"]["subtopics"]
    for key in ("minItems", "maxItems"):
        array.setdefault(key, bounds[key])
    items = array.get("items")
    if isinstance(items, dict) and items.get("type") == "string":
        for key in ("minLength", "maxLength"):
            items.setdefault(key, bounds["items"][key])
    return fmt


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


def expansion_prompt(
    node: TopicNode, breadth: int, existing: Sequence[str], *, structured: bool = False
) -> str:
    return render_prompt(
        "expansion/subtopics.j2",
        topic=node.topic,
        path=[*node.path, node.topic],
        breadth=breadth,
        existing=list(existing),
        structured=structured,
    )


def relevance_prompt(child: str, node: TopicNode) -> str:
    return render_prompt(
        "expansion/relevance.j2", child=child, topic=node.topic, path=[*node.path, node.topic]
    )


def parse_yes_no(answer: str) -> bool | None:
    words = re.findall(r"[a-z]+", answer.casefold())[:3]
    if words and words[0] in ("yes", "y", "true", "correct"):
        return True
    if words and words[0] in ("no", "n", "false", "not"):
        return False
    return None


def parse_verdict(answer: str) -> bool | None:
    """A relevance answer: the structured {"answer": "yes"|"no"}, or a plain yes or no."""
    if answer.lstrip().startswith("{"):
        try:
            data = json.loads(answer)
        except json.JSONDecodeError:
            data = None
        if isinstance(data, dict) and isinstance(data.get("answer"), str):
            return parse_yes_no(data["answer"])
    return parse_yes_no(answer)


# Builds an ask's request, with structured output (True) or without it (False).
Ask = Callable[[bool], GenerationRequest]


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
    # The expansion answer's structured output (a subtopics JSON schema), or None for none;
    # bounded by breadth here (bound_subtopics). It also turns on the relevance enum.
    response_format: dict[str, Any] | None = None
    report: ExpansionReport = field(default_factory=ExpansionReport)

    def __post_init__(self) -> None:
        self._structured = self.response_format is not None
        self._subtopics_format = (
            bound_subtopics(self.response_format, self.breadth) if self.response_format else None
        )

    def _request(
        self, prompt: str, sampling: Sampling, fmt: dict[str, Any] | None, **meta: Any
    ) -> GenerationRequest:
        return GenerationRequest.build(
            messages=[{"role": "user", "content": prompt}],
            model=self.model,
            sampling=sampling,
            response_format=json.dumps(fmt) if fmt else None,
            **meta,
        )

    async def _ask(self, asks: Sequence[Ask]) -> list[GenerationResult | None]:
        """One result per ask, in order: structured while the endpoint takes it; the asks it
        rejected for their response_format are asked again without."""
        requests = [ask(self._structured) for ask in asks]
        results = await self.complete(requests)
        self.report.requests += len(requests)
        out = [results.get(req.id) for req in requests]
        rejected = [
            i for i, r in enumerate(out) if r is not None and r.error == RESPONSE_FORMAT_REJECTED
        ]
        if rejected:
            self._structured = False  # this endpoint has no structured output: stop asking
            self.report.structured_fallbacks += len(rejected)
            plain = {i: asks[i](False) for i in rejected}
            again = await self.complete(list(plain.values()))
            self.report.requests += len(plain)
            for i, req in plain.items():
                out[i] = again.get(req.id)
        return out

    def _expansion_ask(self, node: TopicNode, known: Sequence[str]) -> Ask:
        existing = [t for t in known if t != node.topic]

        def build(structured: bool) -> GenerationRequest:
            return self._request(
                expansion_prompt(node, self.breadth, existing, structured=structured),
                self.sampling,
                self._subtopics_format if structured else None,
                topic=node.topic,
                topic_path=[*node.path, node.topic],
            )

        return build

    def _relevance_ask(self, node: TopicNode, title: str) -> Ask:
        def build(structured: bool) -> GenerationRequest:
            # {"answer": "yes"} takes about 8 tokens; a plain "yes" one.
            check = Sampling(max_tokens=16 if structured else 4, temperature=0.0, top_p=1.0)
            fmt = RELEVANCE_FORMAT if structured else None
            return self._request(relevance_prompt(title, node), check, fmt)

        return build

    async def expand(
        self, roots: Sequence[str | TopicNode], existing: Sequence[str] = ()
    ) -> list[TopicNode]:
        """The tree, parents before children, roots first: titles (depth 0), or nodes of a
        tree already grown (a leaf's new children, `expansion.grow`)."""
        tree = [
            r if isinstance(r, TopicNode) else TopicNode(topic=r.strip(), path=[], depth=0)
            for r in roots
            if isinstance(r, TopicNode) or r.strip()
        ]
        known = [*existing, *(n.topic for n in tree)]
        frontier = list(tree)
        for level in range(1, self.depth + 1):
            results = await self._ask([self._expansion_ask(node, known) for node in frontier])
            candidates: list[tuple[TopicNode, str]] = []
            for node, result in zip(frontier, results, strict=True):
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
            results = await self._ask([self._relevance_ask(n, t) for n, t in candidates])
            for i, result in enumerate(results):
                verdicts[i] = parse_verdict(result.text) if result and result.ok else None
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
