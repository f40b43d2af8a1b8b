"""The one report renderer: a dataset version's manifest -> report/report.md and PNG plots.

Each stage contributes its section through the manifest (counts, generation, diversity, ...);
this module only reads the manifest (and the first rows of the text shards for samples), so a
report can be rendered again at any time. One function per section, each returning its lines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

# The object-oriented API needs no display backend and no global pyplot state.
from matplotlib.figure import Figure

from booksmith.schemas.manifest import Diversity, Manifest, QualityHistogram
from booksmith.shards.version_dir import read_manifest

SAMPLES = 3  # documents shown in the report
SAMPLE_CHARS = 600


def plot_quality(hist: QualityHistogram, path: Path) -> None:
    fig = Figure(figsize=(6, 3.2))
    ax = fig.subplots()
    lefts = hist.edges[:-1]
    ax.bar(lefts, hist.kept, width=0.1, align="edge", label="kept", color="#4c72b0")
    ax.bar(
        lefts, hist.rejected, width=0.1, align="edge", bottom=hist.kept,
        label="rejected", color="#c44e52",
    )  # fmt: skip
    ax.set_xlabel("quality score (P(educational))")
    ax.set_ylabel("documents")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def sample_documents(version: Path, manifest: Manifest, n: int = SAMPLES) -> list[dict]:
    """The first `n` kept documents (what a reader sees first when they open the shards)."""
    for shard in manifest.shards:
        if shard.kind == "text" and shard.rows:
            columns = ["id", "topic", "audience", "style", "format", "n_tokens", "text"]
            # the first rows only: a shard can hold 256 MB of text
            batches = pq.ParquetFile(version / shard.path).iter_batches(n, columns=columns)
            return next(batches).to_pylist()
    return []


def _table(rows: list[tuple[str, Any]]) -> str:
    lines = ["| | |", "| --- | ---: |"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)


def plot_axis_coverage(div: Diversity, path: Path) -> None:
    coverage = div.axis_coverage
    axes = [a for a in coverage if coverage[a].counts]
    fig = Figure(figsize=(4.5 * max(1, len(axes)), 3.6))
    subplots = fig.subplots(1, max(1, len(axes)), squeeze=False)[0]
    for ax, axis in zip(subplots, axes, strict=False):
        counts = coverage[axis].counts
        ax.barh(list(counts), list(counts.values()), color="#4c72b0")
        ax.set_title(f"{axis} ({coverage[axis].covered:.0%} of values used)", fontsize=10)
        ax.invert_yaxis()
        ax.tick_params(labelsize=8)
    fig.suptitle("Documents per axis value")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_openers(openers: list[tuple[str, int]], documents: int, path: Path) -> None:
    fig = Figure(figsize=(8, 3.6))
    ax = fig.subplots()
    labels = [o if len(o) <= 40 else o[:37] + "..." for o, _ in openers] or ["(none)"]
    shares = [n / documents for _, n in openers] if documents else [0.0]
    ax.barh(labels, shares or [0.0], color="#dd8452")
    ax.set_xlabel("share of documents")
    ax.set_title("Most common opening five words")
    ax.invert_yaxis()
    ax.tick_params(labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _counts(m: Manifest) -> list[str]:
    gen = m.counts.generate
    rows = [
        ("requests planned", gen.planned),
        ("documents kept", m.documents),
        ("rejected", m.counts.rejected),
        ("failed requests", gen.failed),
        ("from cache", gen.cached),
        ("skipped by budget", gen.skipped_budget),
    ]
    return ["## Counts", "", _table(rows), ""]


def _filters(m: Manifest) -> list[str]:
    if not m.counts.filter:
        return []
    lines = [
        "## Filters",
        "",
        "| filter | input | kept | dropped by reason |",
        "| --- | ---: | ---: | --- |",
    ]
    for name, c in m.counts.filter.items():
        reasons = ", ".join(f"{k}: {v}" for k, v in c.items() if k not in ("input", "kept"))
        lines.append(f"| {name} | {c.get('input', 0)} | {c.get('kept', 0)} | {reasons or '-'} |")
    return [*lines, ""]


def _generation(m: Manifest) -> list[str]:
    gen = m.counts.generate
    elapsed = gen.elapsed_s
    rows = [
        ("HTTP requests", gen.requests),
        ("wall time (s)", elapsed),
        ("completion tokens/s", round(gen.completion_tokens / elapsed, 1) if elapsed else "-"),
        ("retries", gen.retries),
        ("prompt tokens", gen.prompt_tokens),
        ("completion tokens", gen.completion_tokens),
        ("cost (USD)", gen.cost_usd),
        ("truncated", gen.truncated),
        ("failures", ", ".join(f"{k}: {v}" for k, v in gen.failures.items()) or "-"),
    ]
    return ["## Generation", "", _table(rows), ""]


def _tokens(m: Manifest) -> list[str]:
    if not m.tokens:
        return []
    lines = ["## Tokens", "", "| encoding | documents | tokens |", "| --- | ---: | ---: |"]
    lines += [f"| {name} | {e.documents} | {e.tokens} |" for name, e in m.tokens.items()]
    return [*lines, ""]


def _fill(m: Manifest) -> list[str]:
    fill = m.counts.fill
    if fill is None or not fill.rounds or fill.stopped == "single_round":
        return []
    return [
        "## Fill",
        "",
        f"Stopped: **{fill.stopped}** after {len(fill.rounds)} round(s); still short: "
        f"{fill.short or 'nothing'}.",
        "",
    ]


def _quality(m: Manifest, out: Path) -> list[str]:
    hist = m.quality
    if hist is None or not sum(hist.kept) + sum(hist.rejected):
        return []
    plot_quality(hist, out / "quality.png")
    return ["## Quality scores", "", "![quality scores](quality.png)", ""]


def _diversity(m: Manifest, out: Path) -> list[str]:
    div = m.diversity
    if not div.documents:
        return []
    rows = [
        ("distinct-1", div.distinct_1),
        ("distinct-2", div.distinct_2),
        ("distinct-3", div.distinct_3),
        ("top opener share", div.top_opener_share),
        ("compression ratio", div.compression_ratio),
        (f"mean pairwise MinHash (sample {div.minhash_sample})", div.mean_pairwise_minhash),
    ]
    plot_axis_coverage(div, out / "axis_coverage.png")
    plot_openers(div.top_openers, div.documents, out / "openers.png")
    return [
        "## Diversity",
        "",
        _table(rows),
        "",
        "![axis coverage](axis_coverage.png)",
        "",
        "![openers](openers.png)",
        "",
    ]


def _samples(m: Manifest, version: Path) -> list[str]:
    samples = sample_documents(version, m)
    if not samples:
        return []
    lines = ["## Sample documents", ""]
    for d in samples:
        text = d["text"][:SAMPLE_CHARS] + ("..." if len(d["text"]) > SAMPLE_CHARS else "")
        quoted = "\n".join("> " + line for line in text.splitlines())
        lines += [
            f"**{d['topic']}** ({d['audience']}, {d['style']}, {d['format']}; "
            f"{d['n_tokens']} tokens; `{d['id']}`)",
            "",
            quoted,
            "",
        ]
    return lines


def render_report(version: Path) -> Path:
    """Write `version/report/report.md` and its plots from the manifest; returns the .md path."""
    m = read_manifest(version)
    out = version / "report"
    out.mkdir(exist_ok=True)
    parts = [f"# Run {m.run_id}", ""]
    parts += _counts(m) + _filters(m) + _generation(m) + _tokens(m) + _fill(m)
    parts += _quality(m, out) + _diversity(m, out) + _samples(m, version)
    path = out / "report.md"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
