"""The viewer's pages: one function per page, each a stable URL reached by plain links.

/                            versions, and what changed since the one before
/v/{run}                     a version: funnel, quality, diversity, coverage, report plots, manifest
/v/{run}/docs                documents, paged and filtered (?kind=rejected for rejects; ?text=...)
/v/{run}/doc/{id}            a document: text, metadata, prompt; a reject's reason and evidence
/v/{run}/rejects             rejects grouped by reason, with counts and samples
/v/{run}/topics              the topic tree with planned, kept and rejected documents per node
/v/{run}/manifest.json       the manifest, credentials redacted
/v/{run}/report/{file}.png   the report's plots, when the version has them
/compare?a=RUN&b=RUN         two versions side by side

Read-only: every route is a GET and nothing under a version is written.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from booksmith.schemas.records import GROUNDING_COLUMNS
from booksmith.schemas.redact import redact_text
from booksmith.viewer import evidence
from booksmith.viewer.search import SearchIndex
from booksmith.viewer.store import (
    AXES,
    GROUNDED,
    KINDS,
    MAX_PAGE,
    PAGE,
    SOURCE_ID,
    Output,
    Query,
    Version,
    ViewError,
    Where,
)
from booksmith.viewer.summary import (
    compare_rows,
    funnel,
    summary,
    topic_tree,
    version_changes,
)

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=HERE / "templates")
templates.env.filters["markdown"] = evidence.render_markdown
templates.env.filters["num"] = lambda v: f"{v:,}" if isinstance(v, int) else v


def _version(request: Request) -> Version:
    out: Output = request.app.state.output
    try:
        return out.version(request.path_params["run"])
    except KeyError:
        raise HTTPException(404, f"no version {request.path_params['run']} here") from None


def _page(request: Request, name: str, **context: Any) -> Response:
    out: Output = request.app.state.output
    return templates.TemplateResponse(
        request, name, {"location": redact_text(out.location), "runs": out.run_ids(), **context}
    )


def versions_page(request: Request) -> Response:
    out: Output = request.app.state.output
    rows = version_changes([out.version(r) for r in out.run_ids()])
    return _page(request, "versions.html", rows=list(reversed(rows)))


def version_page(request: Request) -> Response:
    v = _version(request)
    plots = []
    if v.has("report"):
        plots = sorted(p.rsplit("/", 1)[-1] for p in v.output.fs.glob(f"{v.path}/report/*.png"))
    coverage = v.cached("coverage", lambda: _coverage_counts(v))
    manifest = json.dumps(evidence.redacted(v.manifest.model_dump(mode="json")), indent=2)
    return _page(
        request, "version.html", v=v, s=summary(v), funnel=funnel(v.manifest), plots=plots,
        coverage=_matrix(coverage), manifest=manifest,
    )  # fmt: skip


def _coverage_counts(v: Version) -> list[tuple[Any, ...]]:
    """(audience, format, recipe, documents) over the kept documents; recipe None throughout
    for a version written before grounded generation (its shards have no such column)."""
    if "recipe" in v.columns("text"):
        return v.group_counts("text", ("audience", "format", "recipe"))
    return [(a, f, None, n) for a, f, n in v.group_counts("text", ("audience", "format"))]


def _matrix(rows: list[tuple[Any, ...]]) -> dict[str, Any]:
    """(audience, format, recipe, n) rows as a table of the documents that have both an
    audience and a format (row and column labels, cells, the largest cell), and the others
    apart, by recipe: a grounded document's recipe may set no audience or format (stored "").

    Each count that the page links is the number of documents its link's filters list, counted
    over all the rows: the documents page cannot filter for an empty value (an empty filter is
    no filter), so the documents outside the table are reached by their recipe (and audience)."""
    inside = [(a, f, n) for a, f, _, n in rows if a and f]
    cells: dict[tuple[str, str], int] = {}
    for a, f, n in inside:
        cells[a, f] = cells.get((a, f), 0) + n

    def listed(**match: Any) -> int:  # what /docs?{match} lists
        keys = ("audience", "format", "recipe")
        return sum(r[3] for r in rows if all(r[keys.index(k)] == x for k, x in match.items()))

    outside: dict[Any, dict[str, Any]] = {}
    for a, f, recipe, n in rows:
        if a and f:
            continue
        entry = outside.setdefault(recipe, {"recipe": recipe, "n": 0, "audiences": {}})
        entry["n"] += n
        if a:
            entry["audiences"][a] = entry["audiences"].get(a, 0) + n
    grounded = []
    for recipe in sorted(outside, key=lambda r: (r is None, r or "")):
        entry = outside[recipe]
        entry["listed"] = listed(recipe=recipe) if recipe is not None else None
        entry["audiences"] = [
            (a, n, listed(recipe=recipe, audience=a) if recipe is not None else None)
            for a, n in sorted(entry["audiences"].items())
        ]
        grounded.append(entry)
    return {
        "rows": sorted({a for a, _, _ in inside}),
        "cols": sorted({f for _, f, _ in inside}),
        "cells": cells,
        "max": max(cells.values(), default=0),
        "grounded": grounded,
        "outside": sum(e["n"] for e in grounded),
    }


def _query(request: Request) -> Query:
    p = request.query_params

    def number(key: str) -> float | None:
        try:
            return float(p[key]) if p.get(key) else None
        except ValueError:
            raise HTTPException(400, f"{key}={p[key]!r}: give a number, e.g. 0.5") from None

    kind = p.get("kind") or "text"
    if kind not in ("text", "rejected"):
        raise HTTPException(400, f"kind={kind!r}: text (kept documents) or rejected")
    page, per = p.get("page") or "1", p.get("per") or str(PAGE)
    if not page.isdigit() or int(page) < 1:
        raise HTTPException(400, f"page={page!r}: a page number from 1")
    if not per.isdigit() or not 1 <= int(per) <= MAX_PAGE:
        raise HTTPException(400, f"per={per!r}: documents per page, 1 to {MAX_PAGE}")
    return Query(
        kind=kind, topic=p.get("topic") or None, reason=p.get("reason") or None,
        qmin=number("qmin"), qmax=number("qmax"), text=(p.get("text") or "").strip() or None,
        page=int(page), per=int(per),
        **{a: p.get(a) or None for a in (*AXES, *GROUNDED, SOURCE_ID)},
    )  # fmt: skip


LABELS = {"recipe": "recipe", "source_name": "source", "license": "licence", SOURCE_ID: "source id"}


def _check_grounded(v: Version, q: Query) -> None:
    """A provenance filter names a value some document of the version has (of either kind, so
    switching between kept and rejected keeps it), or the page says what there is instead of
    querying a column the version may not have."""
    for key in (*GROUNDED, SOURCE_ID):
        value = getattr(q, key)
        if value is None:
            continue
        if key == SOURCE_ID:
            present = any(v.has_source_ids(kind) for kind in KINDS)
        else:
            values = {r[0] for kind in KINDS for r in v.grounded_facets(kind).get(key, [])}
            present = bool(values)
            if values and value not in values:
                known = ", ".join(sorted(values)[:20]) + (", ..." if len(values) > 20 else "")
                raise HTTPException(
                    400, f"{key}={value!r}: no document of {v.run_id} has this {LABELS[key]}; "
                    f"its {LABELS[key]}s: {known}",
                )  # fmt: skip
        if not present:
            raise HTTPException(
                400, f"{key}={value!r}: no document of {v.run_id} records a {LABELS[key]} (it "
                "was written from topics, or before grounded generation): drop this filter",
            )  # fmt: skip


def _search_index(request: Request, v: Version) -> SearchIndex:
    indexes: dict[str, SearchIndex] = request.app.state.indexes
    known = indexes.get(v.run_id)
    if known is None or known.version is not v:
        known = indexes[v.run_id] = SearchIndex(v)
    return known


def _named(counts: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """A select's (value, documents): without null and empty values (a grounded document has
    no audience, style or format: "" would read as the select's "any")."""
    return [row for row in counts if row[0] not in (None, "")]


def docs_page(request: Request) -> Response:
    v = _version(request)
    q = _query(request)
    _check_grounded(v, q)
    building = None
    if q.text:
        index = _search_index(request, v)
        if not index.ready:
            building = index.start()
            if building.error:
                raise HTTPException(500, f"the search index failed to build: {building.error}")
            if index.ready:  # it finished between the two looks
                building = None
        page = index.search(q) if index.ready else None
    else:
        page = v.page(q)
    facets = v.cached(
        f"facets-{q.kind}", lambda: {a: _named(v.group_counts(q.kind, (a,))) for a in AXES}
    )
    reasons = v.cached("reasons", lambda: v.group_counts("rejected", ("reason",)))
    topics = v.cached(f"topics-{q.kind}", lambda: v.group_counts(q.kind, ("topic",))[:500])
    pages = math.ceil(page.total / q.per) if page else 0
    return _page(
        request, "docs.html", v=v, q=q, page=page, pages=pages, building=building,
        facets=facets, reasons=reasons, topics=topics, filters=q.filters(),
        grounded=v.grounded_facets(q.kind), source_ids=v.has_source_ids(q.kind), labels=LABELS,
    )  # fmt: skip


def doc_page(request: Request) -> Response:
    v = _version(request)
    doc_id = request.path_params["id"]
    found = v.find(doc_id, Where.parse(request.query_params.get("at", "")))
    if found is None:
        raise HTTPException(404, f"no document {doc_id} in version {v.run_id}")
    where, row = found
    why = evidence.detail(row.get("detail"))
    pair = _matched(v, row, why) if row.get("duplicate_of") else None
    grounded = row.get(SOURCE_ID) is not None
    return _page(
        request, "doc.html", v=v, doc=row, where=where, why=why, pair=pair,
        request_row=v.request(doc_id), grounded=grounded,
        hidden=("text", "prompt", "detail", *GROUNDING_COLUMNS),  # provenance has its own table
    )  # fmt: skip


def _matched(v: Version, row: dict[str, Any], why: dict[str, Any]) -> dict[str, Any] | None:
    """The document a duplicate matched, looked for in the run its evidence names, then in this
    version, then in every other; both texts with their shared passages marked."""
    out = v.output
    runs = [why.get("matched_run"), v.run_id, *reversed(out.run_ids())]
    for run in dict.fromkeys(r for r in runs if r):
        try:
            other = out.version(run)
        except (KeyError, ViewError):
            continue
        found = other.find(row["duplicate_of"])
        if found is not None:
            where, match = found
            mine, theirs, exact = evidence.shared_passages(row["text"], match["text"])
            return {
                "run": run, "where": where, "doc": match, "mine": mine, "theirs": theirs,
                "exact": exact, "estimated": why.get("jaccard"),
            }  # fmt: skip
    return None


def rejects_page(request: Request) -> Response:
    v = _version(request)
    counts = v.cached("reasons", lambda: v.group_counts("rejected", ("reason",)))
    return _page(request, "rejects.html", v=v, counts=counts, samples=v.samples_by_reason())


def topics_page(request: Request) -> Response:
    v = _version(request)
    tree = v.cached("tree", lambda: topic_tree(v))
    return _page(request, "topics.html", v=v, tree=tree)


def manifest_json(request: Request) -> Response:
    v = _version(request)
    return JSONResponse(evidence.redacted(v.manifest.model_dump(mode="json")))


def report_file(request: Request) -> Response:
    v = _version(request)
    name = request.path_params["name"]
    if "/" in name or not name.endswith(".png") or not v.has(f"report/{name}"):
        raise HTTPException(404, f"no plot {name} in {v.run_id}/report")
    data = v.output.fs.cat_file(f"{v.path}/report/{name}")
    return Response(data, media_type="image/png")


def compare_page(request: Request) -> Response:
    out: Output = request.app.state.output
    runs = out.run_ids()
    a = request.query_params.get("a") or (runs[-2] if len(runs) > 1 else runs[-1])
    b = request.query_params.get("b") or runs[-1]
    try:
        va, vb = out.version(a), out.version(b)
    except KeyError as e:
        raise HTTPException(404, f"no version {e.args[0]} here") from None
    return _page(
        request, "compare.html", a=va, b=vb, rows=compare_rows(va, vb),
        changes=evidence.config_changes(va.manifest.config, vb.manifest.config),
    )  # fmt: skip


def start_page(request: Request) -> Response:
    """A version given on the command line opens at that version."""
    out: Output = request.app.state.output
    if out.given and "all" not in request.query_params:
        return RedirectResponse(f"/v/{out.given}", status_code=307)
    return versions_page(request)


async def _error(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    message = exc.detail if isinstance(exc, HTTPException) else f"{type(exc).__name__}: {exc}"
    out: Output = request.app.state.output
    return templates.TemplateResponse(
        request, "error.html",
        {"location": redact_text(out.location), "runs": out.run_ids(), "status": status,
         "message": redact_text(str(message))},
        status_code=status,
    )  # fmt: skip


def create_app(output: Output) -> Starlette:
    routes: list[Route | Mount] = [
        Route("/", start_page),
        Route("/compare", compare_page),
        Route("/v/{run}", version_page),
        Route("/v/{run}/docs", docs_page),
        Route("/v/{run}/doc/{id}", doc_page),
        Route("/v/{run}/rejects", rejects_page),
        Route("/v/{run}/topics", topics_page),
        Route("/v/{run}/manifest.json", manifest_json),
        Route("/v/{run}/report/{name}", report_file),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    handlers: dict[Any, Callable[..., Any]] = {HTTPException: _error, Exception: _error}
    app = Starlette(routes=routes, exception_handlers=handlers)
    app.state.output = output
    app.state.indexes = {}
    return app
