"""The one report renderer: a dataset version's manifest -> report/report.md and PNG plots.

Each stage contributes its section through the manifest (counts, generation, diversity, ...);
this module only reads the manifest, so a report can be rendered again at any time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

# The object-oriented API needs no display backend and no global pyplot state.
from matplotlib.figure import Figure

from booksmith.shards.version import read_manifest

SAMPLES = 3  # documents shown in the report
SAMPLE_CHARS = 600


def quality_histogram(kept: list[float | None], rejected: list[float | None]) -> dict[str, Any]:
    """Counts of quality scores in ten bins over [0, 1], kept and rejected (the manifest keeps
    this, so the report can plot it without reading the shards)."""

    def bins(scores: list[float | None]) -> list[int]:
        out = [0] * 10
        for x in scores:
            if x is not None:
                out[min(9, max(0, int(x * 10)))] += 1
        return out

    return {"edges": [i / 10 for i in range(11)], "kept": bins(kept), "rejected": bins(rejected)}


def plot_quality(hist: dict[str, Any], path: Path) -> None:
    fig = Figure(figsize=(6, 3.2))
    ax = fig.subplots()
    lefts = hist["edges"][:-1]
    ax.bar(lefts, hist["kept"], width=0.1, align="edge", label="kept", color="#4c72b0")
    ax.bar(
        lefts, hist["rejected"], width=0.1, align="edge", bottom=hist["kept"],
        label="rejected", color="#c44e52",
    )  # fmt: skip
    ax.set_xlabel("quality score (P(educational))")
    ax.set_ylabel("documents")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def sample_documents(version: Path, manifest: dict[str, Any], n: int = SAMPLES) -> list[dict]:
    """The first `n` kept documents (what a reader sees first when they open the shards)."""
    for shard in manifest.get("shards", []):
        if shard.get("kind") == "text" and shard.get("rows"):
            columns = ["id", "topic", "audience", "style", "format", "n_tokens", "text"]
            # the first rows only: a shard can hold 256 MB of text
            batches = pq.ParquetFile(version / shard["path"]).iter_batches(n, columns=columns)
            return next(batches).to_pylist()
    return []


def _table(rows: list[tuple[str, Any]]) -> str:
    lines = ["| | |", "| --- | ---: |"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)


def plot_axis_coverage(coverage: dict[str, dict[str, Any]], path: Path) -> None:
    axes = [a for a in coverage if coverage[a]["counts"]]
    fig = Figure(figsize=(4.5 * max(1, len(axes)), 3.6))
    subplots = fig.subplots(1, max(1, len(axes)), squeeze=False)[0]
    for ax, axis in zip(subplots, axes, strict=False):
        counts = coverage[axis]["counts"]
        ax.barh(list(counts), list(counts.values()), color="#4c72b0")
        ax.set_title(f"{axis} ({coverage[axis]['covered']:.0%} of values used)", fontsize=10)
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


def render_report(version: Path) -> Path:
    """Write `version/report/report.md` and its plots from the manifest; returns the .md path."""
    manifest = read_manifest(version)
    out = version / "report"
    out.mkdir(exist_ok=True)
    counts = manifest.get("counts", {})
    gen = counts.get("generate", {})
    div = manifest.get("diversity") or {}
    parts = [f"# Run {manifest['run_id']}", ""]
    parts += [
        "## Counts",
        "",
        _table(
            [
                ("requests planned", gen.get("planned", 0)),
                ("documents kept", manifest.get("documents", 0)),
                ("rejected", counts.get("rejected", 0)),
                ("failed requests", gen.get("failed", 0)),
                ("from cache", gen.get("cached", 0)),
                ("skipped by budget", gen.get("skipped_budget", 0)),
            ]
        ),
        "",
    ]
    filters = counts.get("filter", {})
    if filters:
        parts += [
            "## Filters",
            "",
            "| filter | input | kept | dropped by reason |",
            "| --- | ---: | ---: | --- |",
        ]
        for name, c in filters.items():
            reasons = ", ".join(f"{k}: {v}" for k, v in c.items() if k not in ("input", "kept"))
            parts.append(
                f"| {name} | {c.get('input', 0)} | {c.get('kept', 0)} | {reasons or '-'} |"
            )
        parts.append("")
    elapsed = gen.get("elapsed_s") or 0
    tokens = manifest.get("tokens", {})
    parts += [
        "## Generation",
        "",
        _table(
            [
                ("HTTP requests", gen.get("requests", 0)),
                ("wall time (s)", elapsed),
                (
                    "completion tokens/s",
                    round(gen.get("completion_tokens", 0) / elapsed, 1) if elapsed else "-",
                ),
                ("retries", gen.get("retries", 0)),
                ("prompt tokens", gen.get("prompt_tokens", 0)),
                ("completion tokens", gen.get("completion_tokens", 0)),
                ("cost (USD)", gen.get("cost_usd", 0)),
                ("truncated", gen.get("truncated", 0)),
                (
                    "failures",
                    ", ".join(f"{k}: {v}" for k, v in gen.get("failures", {}).items()) or "-",
                ),
            ]
        ),
        "",
    ]
    if tokens:
        parts += ["## Tokens", "", "| encoding | documents | tokens |", "| --- | ---: | ---: |"]
        for name, entry in tokens.items():
            parts.append(f"| {name} | {entry.get('documents', '-')} | {entry.get('tokens', '-')} |")
        parts.append("")
    fill = counts.get("fill") or {}
    if fill.get("rounds") and fill.get("stopped") != "single_round":
        parts += [
            "## Fill",
            "",
            f"Stopped: **{fill['stopped']}** after {len(fill['rounds'])} round(s); still short: "
            f"{fill.get('short') or 'nothing'}.",
            "",
        ]
    quality = manifest.get("quality") or {}
    if sum(quality.get("kept", [])) + sum(quality.get("rejected", [])):
        plot_quality(quality, out / "quality.png")
        parts += ["## Quality scores", "", "![quality scores](quality.png)", ""]
    if div:
        parts += [
            "## Diversity",
            "",
            _table(
                [
                    ("distinct-1", div["distinct_1"]),
                    ("distinct-2", div["distinct_2"]),
                    ("distinct-3", div["distinct_3"]),
                    ("top opener share", div["top_opener_share"]),
                    ("compression ratio", div["compression_ratio"]),
                    (
                        f"mean pairwise MinHash (sample {div['minhash_sample']})",
                        div["mean_pairwise_minhash"],
                    ),
                ]
            ),
            "",
        ]
        plot_axis_coverage(div["axis_coverage"], out / "axis_coverage.png")
        plot_openers(div["top_openers"], div["documents"], out / "openers.png")
        parts += ["![axis coverage](axis_coverage.png)", "", "![openers](openers.png)", ""]
    samples = sample_documents(version, manifest)
    if samples:
        parts += ["## Sample documents", ""]
        for d in samples:
            text = d["text"][:SAMPLE_CHARS] + ("..." if len(d["text"]) > SAMPLE_CHARS else "")
            quoted = "\n".join("> " + line for line in text.splitlines())
            parts += [
                f"**{d['topic']}** ({d['audience']}, {d['style']}, {d['format']}; "
                f"{d['n_tokens']} tokens; `{d['id']}`)",
                "",
                quoted,
                "",
            ]
    path = out / "report.md"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
