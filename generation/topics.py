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
from booksmith.schemas.records import canonical_json, sha256_hex

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
        # bare section words: a textbook's headings, not its subjects
        "about",
        "advanced",
        "application",
        "applications",
        "background",
        "basic",
        "basics",
        "concept",
        "concepts",
        "definition",
        "definitions",
        "description",
        "first",
        "fundamentals",
        "future",
        "general",
        "history",
        "importance",
        "index",
        "lessons",
        "main",
        "module",
        "modules",
        "other",
        "outline",
        "part",
        "preface",
        "principles",
        "second",
        "sections",
        "step",
        "steps",
        "subtopic",
        "theory",
        "third",
        "title",
        "topic",
        "types",
        "units",
        "uses",
    ]
)
# A numbered section label: "Chapter 3: Cells", "Section 2.1", "1. Alkanes", "Part IV", "II. Acids".
_NUMBERED = re.compile(
    r"^\s*(?:(?:chapter|section|part|unit|lesson|module|topic|subtopic|step|week|day|level|"
    r"stage|volume|book)\s+(?:\d+|[ivxlc]+)\b|\d+(?:\.\d+)*[.):]?(?:\s|$)|[ivxlc]+[.)]\s)",
    re.I,
)
_JUNK = re.compile(r"https?://|www\.|\{\{|\}\}|\{%|%\}|<\|?[a-z_]+\|?>|[\x00-\x08\x0b-\x1f]")
# What a small model writes under a JSON schema when it has no title: identifiers
# ("Subtopics_of_Photosynthesis", "concepts_list_5"), stray JSON ("concepts_list}"), the
# question's own words ("subtopic1"), a sentence's tail ("and that includes"), a bare label
# and number ("Premise 1").
_SCHEMA_JUNK = re.compile(
    r"_|[{}\[\]|\\]|\bsub-?topics?|\b(?:concepts?|topics?)\d|^(?:and|but|or|that|which|who|"
    r"however|so|because|this|these|it|is|are|was|were|then|also|etc)\b|\s\d+$",
    re.I,
)


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
    # per root (a title, or the leaf grown): its kept children ("children") and how many of
    # them got at least 2 children of their own ("children_with_2")
    per_root: dict[str, dict[str, int]] = field(default_factory=dict)


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


def subtopics_format(breadth: int, candidates: int | None = None) -> dict[str, Any]:
    """The expansion answer's structured output: {"subtopics": [n short titles]}, n the
    candidates asked (2 x breadth unless given): the answer must propose more than are kept."""
    n = max(breadth, candidates or 2 * breadth)
    titles = {"type": "string", "minLength": 1, "maxLength": SCHEMA_TITLE_CHARS}
    schema = {
        "type": "object",
        "properties": {
            "subtopics": {"type": "array", "items": titles, "minItems": n, "maxItems": n}
        },
        "required": ["subtopics"],
        "additionalProperties": False,
    }
    return {
        "type": "json_schema",
        "json_schema": {"name": "subtopics", "schema": schema, "strict": True},
    }


def bound_subtopics(fmt: dict[str, Any], candidates: int) -> dict[str, Any]:
    """`fmt` with its `subtopics` array bounded as subtopics_format bounds it (`candidates`
    titles), where it sets no bounds of its own: a static schema (the flow's) cannot know them."""
    fmt = copy.deepcopy(fmt)
    spec = fmt.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    props = schema.get("properties") if isinstance(schema, dict) else None
    array = props.get("subtopics") if isinstance(props, dict) else None
    if not (isinstance(array, dict) and array.get("type") == "array"):
        return fmt
    bounds = subtopics_format(candidates, candidates)["json_schema"]["schema"]["properties"]
    for key in ("minItems", "maxItems"):
        array.setdefault(key, bounds["subtopics"][key])
    items = array.get("items")
    if isinstance(items, dict) and items.get("type") == "string":
        for key in ("minLength", "maxLength"):
            items.setdefault(key, bounds["subtopics"]["items"][key])
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


_LIST_SEP = re.compile(r",|;|(?:^|\s)\d{1,2}[.)]\s")


def split_lists(titles: Sequence[str]) -> list[str]:
    """Titles with a list inside one title ("Mantle, Crust, Core", "} 1. Regression 2. Trees":
    a small model's habits under a JSON schema) split into their parts, stray brackets and
    quotes at their edges stripped; a title that ran to the schema's length limit
    loses its last, cut-off part."""
    out: list[str] = []
    for title in titles:
        parts = [p.strip(" {}[]\"'") for p in _LIST_SEP.split(title)]
        if len(parts) > 1 and len(title) >= SCHEMA_TITLE_CHARS:
            parts = parts[:-1]
        out.extend(p for p in parts if p or len(parts) == 1)
    return out


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
    if _NUMBERED.match(title):
        return "numbered"
    if _SCHEMA_JUNK.search(title):
        return "junk"
    return None


def _contains(words: Sequence[str], part: Sequence[str]) -> bool:
    n = len(part)
    return n > 0 and any(list(words[i : i + n]) == list(part) for i in range(len(words) - n + 1))


def affix_reason(title: str, ancestors: Sequence[str]) -> str | None:
    """Why `title` is an ancestor's name dressed up rather than a subtopic: the name with a
    suffix ("Plate tectonics theory", "Linear algebra: vectors") is `parent_name`; the name
    with only section words around it ("History of the French Revolution", "Introduction to
    linear algebra") is `generic`."""
    words = normalise(title).split()
    for ancestor in ancestors:
        name = normalise(ancestor).split()
        if not name:
            continue
        if words[: len(name)] == name and len(words) > len(name):
            return "parent_name"
        if _contains(words, name):
            rest = set(words) - set(name)
            if all(w in _GENERIC or w in _STOP or w.isdigit() for w in rest):
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
class _Candidate:
    node: TopicNode
    title: str
    votes: int = 1  # answers (samples) that proposed it
    order: int = 0  # its place in the first answer that did
    verdict: bool | None = None


@dataclass
class TopicExpander:
    complete: Complete
    model: str
    breadth: int = 8
    depth: int = 2
    relevance_check: bool = True
    sampling: Sampling = field(
        default_factory=lambda: Sampling(
            max_tokens=256, temperature=0.7, top_p=0.95, presence_penalty=0.8
        )
    )
    # The expansion answer's structured output (a subtopics JSON schema), or None for none;
    # bounded by `candidates` here (bound_subtopics). It also turns on the relevance enum.
    response_format: dict[str, Any] | None = None
    # Each request's sampling seed follows from this, its prompt and its sample index, so a
    # run is reproducible and another seed asks (and caches) other answers. None: the seed
    # follows from the request alone.
    seed: int | None = None
    # Titles asked of each answer (None: 2 x breadth) and answers per topic: the candidates are
    # ranked (the relevance verdict, then how many answers proposed them, then their place)
    # and the best `breadth` kept.
    candidates: int | None = None
    samples: int = 1  # the flow asks expansion.samples (2)
    # Rounds asked again (other samples) of a topic left with fewer than 2 children.
    retries: int = 0  # the flow asks expansion.retries (2)
    report: ExpansionReport = field(default_factory=ExpansionReport)

    def __post_init__(self) -> None:
        self._structured = self.response_format is not None
        self._asked = max(self.breadth, self.candidates or 2 * self.breadth)
        self._subtopics_format = (
            bound_subtopics(self.response_format, self._asked) if self.response_format else None
        )

    def _request(
        self,
        prompt: str,
        sampling: Sampling,
        fmt: dict[str, Any] | None,
        sample_index: int = 0,
        **meta: Any,
    ) -> GenerationRequest:
        if self.seed is not None and sampling.seed is None:
            key = canonical_json([self.seed, prompt, fmt, sample_index])
            sampling = sampling.model_copy(update={"seed": int(sha256_hex(key)[:8], 16)})
        return GenerationRequest.build(
            messages=[{"role": "user", "content": prompt}],
            model=self.model,
            sampling=sampling,
            sample_index=sample_index,
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

    def _expansion_ask(self, node: TopicNode, known: Sequence[str], sample: int = 0) -> Ask:
        existing = [t for t in known if t != node.topic]

        def build(structured: bool) -> GenerationRequest:
            return self._request(
                expansion_prompt(node, self._asked, existing, structured=structured),
                self.sampling,
                self._subtopics_format if structured else None,
                sample,
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
        roots_ = list(tree)
        known = [*existing, *(n.topic for n in tree)]
        frontier = list(tree)
        for level in range(1, self.depth + 1):
            children: list[TopicNode] = []
            pending = list(frontier)
            for attempt in range(1 + self.retries):
                if not pending:
                    break
                first = attempt * self.samples  # another round asks other samples
                asks = [
                    (node, self._expansion_ask(node, known, first + k))
                    for node in pending
                    for k in range(self.samples)
                ]
                results = await self._ask([ask for _, ask in asks])
                candidates: dict[int, list[_Candidate]] = {id(node): [] for node in pending}
                for (node, _), result in zip(asks, results, strict=True):
                    self._propose(node, result, candidates[id(node)], known)
                have = Counter(tuple(c.path) for c in children)
                chosen = await self._choose(
                    list(candidates.values()),
                    known,
                    level,
                    [have[(*n.path, n.topic)] for n in pending],
                )
                children.extend(chosen)
                have = Counter(tuple(c.path) for c in children)
                # a topic left with fewer than 2 children is asked again
                pending = [n for n in pending if have[(*n.path, n.topic)] < min(2, self.breadth)]
            order = {(*n.path, n.topic): i for i, n in enumerate(frontier)}
            frontier = sorted(children, key=lambda c: order[tuple(c.path)])
            tree.extend(frontier)
            self.report.kept += len(frontier)
        self._tally(tree[: len(roots_)], tree)
        return tree

    def _propose(
        self,
        node: TopicNode,
        result: GenerationResult | None,
        here: list[_Candidate],
        known: Sequence[str],
    ) -> None:
        """The candidates of one answer, added to `here` (a repeat is a vote for one there)."""
        if result is None or not result.ok:
            self.report.answers_failed += 1
            return
        titles = parse_subtopics(result.text)
        if titles is None:
            self.report.answers_unparsed += 1
            return
        for order, title in enumerate(split_lists(titles)[: self._asked * 2]):
            self.report.proposed += 1
            same = next((c for c in here if similar(title, c.title)), None)
            if same is not None:  # a sibling, or another answer's vote for it
                same.votes += 1
                self.report.dropped["duplicate_sibling"] += 1
                continue
            if reason := self._drop_reason(title, node, (), known):
                self.report.dropped[reason] += 1
                continue
            here.append(_Candidate(node, title, order=order))

    def _tally(self, roots: Sequence[TopicNode], tree: Sequence[TopicNode]) -> None:
        """Per root: its kept children, and how many of them got at least 2 of their own."""
        children = Counter(tuple(n.path) for n in tree if n.path)
        for root in roots:
            key = (*root.path, root.topic)
            level1 = [n for n in tree if tuple(n.path) == key]
            self.report.per_root[root.topic] = {
                "children": len(level1),
                "children_with_2": sum(children[(*key, n.topic)] >= 2 for n in level1),
            }

    def _drop_reason(
        self, title: str, parent: TopicNode, siblings: Sequence[str], known: Sequence[str]
    ) -> str | None:
        if reason := junk_reason(title):
            return reason
        if similar(title, parent.topic) or any(similar(title, p) for p in parent.path):
            return "repeats_parent"
        if reason := affix_reason(title, [parent.topic, *parent.path]):
            return reason
        if any(similar(title, s) for s in siblings):
            return "duplicate_sibling"
        if any(similar(title, k) for k in known):
            return "duplicate_existing"
        return None

    async def _choose(
        self,
        per_node: Sequence[list[_Candidate]],
        known: list[str],
        level: int,
        have: Sequence[int],
    ) -> list[TopicNode]:
        """Each node's best `breadth` candidates: ranked by how many answers proposed them,
        then by their place in the answer; the relevance question is asked of as many as a
        node still needs (again for the next ones when some are rejected), and a title another
        node of the level took first is skipped: no title sits under two parents."""
        ranked = [sorted(c, key=lambda c: (-c.votes, c.order)) for c in per_node]
        kept: list[list[_Candidate]] = [[] for _ in per_node]
        while True:
            batch: list[_Candidate] = []
            for i, queue in enumerate(ranked):
                need = self.breadth - have[i] - len(kept[i])
                while need > 0 and queue:
                    cand = queue.pop(0)
                    if any(similar(cand.title, k) for k in known):
                        self.report.dropped["duplicate_existing"] += 1
                        continue
                    batch.append(cand)
                    need -= 1
            if not batch:
                break
            await self._judge(batch)
            for cand in batch:
                i = next(i for i, c in enumerate(per_node) if cand in c)
                if cand.verdict is False:
                    continue
                if any(similar(cand.title, k) for k in known):  # another node took it
                    self.report.dropped["duplicate_existing"] += 1
                    continue
                kept[i].append(cand)
                known.append(cand.title)
        if left := sum(len(q) for q in ranked):
            self.report.dropped["over_breadth"] += left
        nodes = []
        for chosen in kept:
            for cand in chosen:
                path = [*cand.node.path, cand.node.topic]
                nodes.append(TopicNode(topic=cand.title, path=path, depth=level))
        return nodes

    async def _judge(self, candidates: Sequence[_Candidate]) -> None:
        """Each candidate's relevance verdict; the ones the LLM rejects are dropped."""
        if self.relevance_check and candidates:
            results = await self._ask([self._relevance_ask(c.node, c.title) for c in candidates])
            for cand, result in zip(candidates, results, strict=True):
                cand.verdict = parse_verdict(result.text) if result and result.ok else None
        for cand in candidates:
            if cand.verdict is None:  # no usable answer: the lexical rules it passed decide
                self.report.relevance["lexical"] += 1
            else:
                self.report.relevance["llm_yes" if cand.verdict else "llm_no"] += 1
            if cand.verdict is False:
                self.report.dropped["off_topic"] += 1


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
