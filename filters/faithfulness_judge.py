"""An LLM judge of grounded documents' faithfulness: a constrained yes/no answer (issue 18).

The rules of filters/faithfulness.py see words; a judge reads meaning ("the passage says the
opposite"). Given the passage a grounded document was written from (read back from its own
prompt, `passage_of`) and the document, the judge is asked "Does the document state anything
the passage does not support?" (prompts/judge/faithfulness-v1.txt), the answer constrained to
{"yes", "no"} by a JSON-schema enum, the way LLM-as-judge factual-consistency checks ask a
binary question (e.g. Luo et al. 2023, "ChatGPT as a factual inconsistency evaluator"). "yes"
rejects the document as `grounding:judge`, with the answer and the reply in its detail.

An endpoint that rejects `response_format` is asked again in plain text and its reply read
from its first yes/no word. A reply with neither, or a failed request, keeps the document: a
judge's error never drops one. Requests go through `generation.client.GenerationClient` and the
run's response cache (ids from the request key), so a resumed or repeated run asks nothing
twice; each document is judged alone, so the verdicts do not depend on the chunking.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from booksmith.filters.faithfulness import passage_of
from booksmith.generation.client import RESPONSE_FORMAT_REJECTED
from booksmith.generation.ledger import GenerationReport
from booksmith.prompts import prompt_text
from booksmith.schemas import Document, GenerationRequest, Sampling

PROMPT_VERSION = "faithfulness-v1"
PROMPT = prompt_text(f"judge/{PROMPT_VERSION}.txt")  # the judge's prompt, as data
REASON = "grounding:judge"
UNSUPPORTED = "yes"  # the answer that rejects: "yes, it states something unsupported"
REPLY_KEPT = 200  # characters of the raw reply kept in a rejected document's detail

_YES_NO = re.compile(r"\b(yes|no)\b", re.IGNORECASE)

JUDGE_FORMAT: dict[str, object] = {
    "type": "json_schema",
    "json_schema": {
        "name": "faithfulness",
        "strict": True,
        "schema": {
            "type": "object",
            "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
            "required": ["answer"],
            "additionalProperties": False,
        },
    },
}


def parse_answer(reply: str) -> str | None:
    """ "yes" or "no": a structured answer's `answer`, else the reply's first yes/no word;
    None when it has neither."""
    if reply.lstrip().startswith("{"):
        try:
            answer = json.loads(reply).get("answer")
        except (ValueError, AttributeError):
            answer = None
        if isinstance(answer, str) and answer.strip().lower() in ("yes", "no"):
            return answer.strip().lower()
    found = _YES_NO.search(reply)
    return found.group(1).lower() if found else None


def judge_request(
    doc: Document, passage: str, model: str, *, max_tokens: int, max_chars: int,
    structured: bool,
) -> GenerationRequest:  # fmt: skip
    """The judge's request for one document: greedy and seeded, so its id (the cache key) is
    the same in every run that judges this document with this model and prompt."""
    text = PROMPT.format(passage=passage[:max_chars], document=doc.text[:max_chars])
    return GenerationRequest.build(
        messages=[{"role": "user", "content": text}],
        model=model,
        sampling=Sampling(max_tokens=max_tokens, temperature=0.0, top_p=1.0, seed=0),
        response_format=json.dumps(JUDGE_FORMAT) if structured else None,
        topic=doc.id,
        template=PROMPT_VERSION,
    )


@dataclass
class Verdict:
    """One grounded document's judgement. `answer` None: not judged (`error` says why)."""

    doc: Document
    answer: str | None
    reply: str
    error: str | None = None

    @property
    def unsupported(self) -> bool:
        return self.answer == UNSUPPORTED

    def detail(self, model: str) -> dict[str, str]:
        return {"answer": self.answer or "", "reply": self.reply[:REPLY_KEPT], "judge": model}


Ask = Callable[[list[GenerationRequest]], Awaitable[GenerationReport]]


async def judge_documents(
    docs: Sequence[Document], ask: Ask, model: str, *, max_tokens: int = 16,
    max_chars: int = 6_000, structured: bool = True,
) -> tuple[list[Verdict], list[GenerationReport]]:  # fmt: skip
    """A Verdict per grounded document of `docs` (those without a source are not asked), and
    the reports of the requests made: the structured ones, then the plain-text retries of
    those the endpoint rejected for their response_format. `ask`: a client's `run`."""
    grounded = [(d, p) for d in docs if (p := passage_of(d)) is not None]
    if not grounded:
        return [], []

    def build(pairs: Sequence[tuple[Document, str]], fmt: bool) -> list[GenerationRequest]:
        limits = {"max_tokens": max_tokens, "max_chars": max_chars}
        return [judge_request(d, p, model, **limits, structured=fmt) for d, p in pairs]

    requests = build(grounded, structured)
    reports = [await ask(requests)]
    results = {r.request_id: r for r in reports[0].results}
    again = [
        k for k, req in enumerate(requests)
        if (r := results.get(req.id)) is not None and r.error == RESPONSE_FORMAT_REJECTED
    ]  # fmt: skip
    if again:
        plain = build([grounded[k] for k in again], False)
        reports.append(await ask(plain))
        results.update({r.request_id: r for r in reports[-1].results})
        for k, req in zip(again, plain, strict=True):
            requests[k] = req
    verdicts = []
    for (doc, _), req in zip(grounded, requests, strict=True):
        result = results.get(req.id)
        if result is None:  # the budget or the breaker stopped it before it was asked
            verdicts.append(Verdict(doc, None, "", "not_asked"))
        elif not result.ok:
            verdicts.append(Verdict(doc, None, "", result.error or "failed"))
        else:
            answer = parse_answer(result.text)
            verdicts.append(Verdict(doc, answer, result.text, None if answer else "unparsed"))
    return verdicts, reports
