"""The one report renderer: a dataset version's manifest -> report/report.md and PNG plots.

Each stage contributes its section through the manifest (counts, generation, diversity, ...);
this module only reads the manifest (and the first rows of the text shards for samples), so a
report can be rendered again at any time. One function per section, each returning its lines.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.dataset as ds

# The object-oriented API needs no display backend and no global pyplot state.
from matplotlib.figure import Figure

from booksmith.schemas.manifest import Diversity, GenerateCounts, Manifest, QualityHistogram
from booksmith.shards.fs import filesystem, is_url, join, open_parquet
from booksmith.shards.version_dir import MANIFEST, read_manifest

SAMPLES = 3  # documents shown in the report
SAMPLES_HEADING = "## Sample documents"


class VersionFiles:
    """A version's files, local or at a URL (an export: read through shards/fs.py, only the
    columns and rows a section needs)."""

    def __init__(self, location: str | Path) -> None:
        self.location = str(location)
        self.fs, self.root = filesystem(location)

    def path(self, relative: str) -> str:
        return join(self.root, relative)

    def manifest(self) -> Manifest:
        if not is_url(self.location):
            return read_manifest(Path(self.location))
        try:
            data = self.fs.cat_file(self.path(MANIFEST))
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.location}/{MANIFEST}: no manifest, not a dataset "
                                    "version") from None  # fmt: skip
        return Manifest.parse(data, f"{self.location}/{MANIFEST}")


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


def sample_documents(version: VersionFiles, manifest: Manifest, n: int = SAMPLES) -> list[dict]:
    """The first `n` kept documents (what a reader sees first when they open the shards)."""
    for shard in manifest.shards:
        if shard.kind == "text" and shard.rows:
            columns = ["id", "topic", "audience", "style", "format", "n_tokens", "text"]
            # the first rows only: a shard can hold 256 MB of text
            with open_parquet(version.fs, version.path(shard.path)) as parquet:
                return next(parquet.iter_batches(n, columns=columns)).to_pylist()
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


def _sources(m: Manifest) -> list[str]:
    """What each source gave the plan, and what the filters refused before any request."""
    if not m.counts.plan.sources:
        return []
    lines = [
        "## Sources",
        "",
        "| source | records | candidates | planned passages | requests | rejected before "
        "generation | recipes | licences |",
        "| --- | ---: | ---: | ---: | ---: | --- | --- | --- |",
    ]
    for name, a in m.counts.plan.sources.items():
        cells = [
            ", ".join(f"{k}: {v}" for k, v in sorted(a.get(key, {}).items())) or "-"
            for key in ("rejected", "recipes", "licenses")
        ]
        lines.append(
            f"| {name} | {a.get('records', 0)} | {a.get('candidates', 0)} | "
            f"{a.get('planned', 0)} | {a.get('requests', 0)} | {' | '.join(cells)} |"
        )
    return [*lines, ""]


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
    if j := m.counts.judge:
        lines += ["", (f"The faithfulness judge was asked about {j.get('judged', 0)} grounded "
                       f"documents ({j.get('unparsed', 0)} answers unparsed and "
                       f"{j.get('failed', 0)} requests failed, both kept): {j.get('requests', 0)} "
                       f"requests, {j.get('prompt_tokens', 0)} prompt and "
                       f"{j.get('completion_tokens', 0)} completion tokens.")]  # fmt: skip
    return [*lines, ""]


def _generation(m: Manifest) -> list[str]:
    gen = m.counts.generate
    elapsed = gen.elapsed_s
    rows = [
        ("HTTP requests", gen.requests),
        ("wall time (s)", elapsed),
        ("completion tokens/s", round(gen.completion_tokens / elapsed, 1) if elapsed else "-"),
        ("retries", gen.retries),
        ("rate-limited answers (429)", gen.rate_limited),
        ("prompt tokens", gen.prompt_tokens),
        ("completion tokens", gen.completion_tokens),
        ("cost (USD)", gen.cost_usd),
        ("truncated", gen.truncated),
        ("failed requests", gen.failed),
    ]
    return ["## Generation", "", _table(rows), "", *_reasons(gen), *_rate(gen.rate)]


def _reasons(gen: GenerateCounts) -> list[str]:
    """Retries and failed requests by reason (timeout, connection, http_429, http_503, ...).
    A version written before retries had reasons counts the rest as not recorded."""
    retries, failures = dict(gen.retry_reasons), dict(gen.failures)
    if unknown := gen.retries - sum(retries.values()):
        retries["(reason not recorded)"] = unknown
    if not retries and not failures:
        return []
    lines = [
        "### Retries and failures by reason",
        "",
        "| reason | retries | failed requests |",
        "| --- | ---: | ---: |",
    ]
    for reason in sorted(set(retries) | set(failures)):
        lines.append(f"| {reason} | {retries.get(reason, 0)} | {failures.get(reason, 0)} |")
    return [*lines, ""]


RATE_ROWS = 24  # the effective-rate table shows at most this many points, evenly spread


def _rate(points: list[dict[str, Any]]) -> list[str]:
    """The effective request rate over the run (the adaptive limits' series): what the endpoint
    let through, the 429s, and the limits the client held at each point."""
    if not points:
        return []
    step = max(1, -(-len(points) // RATE_ROWS))
    lines = [
        "Effective rate over the run (generation/limits.py):",
        "",
        "| t (s) | requests/min | 429s | limit (req/min) | concurrency |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for p in points[::step]:
        limit = p.get("limit_rpm")
        lines.append(
            f"| {p.get('t_s', 0):.0f} | {p.get('rpm', 0):.0f} | {p.get('rate_limited', 0)} | "
            f"{'-' if limit is None else f'{limit:.0f}'} | {p.get('concurrency', '-')} |"
        )
    return [*lines, ""]


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


OPENERS_PLOT_MIN = 100  # below this many documents the openers are a table, not a plot
TOPICS_LISTED = 40  # the per-topic table lists every topic up to this many, else the widest gaps


def _column_counts(version: VersionFiles, relative: str, column: str) -> Counter[str]:
    """Values of one column of a Parquet file or folder, counted batch by batch."""
    counts: Counter[str] = Counter()
    if not version.fs.exists(version.path(relative)):
        return counts
    dataset = ds.dataset(version.path(relative), format="parquet", filesystem=version.fs)
    if column not in dataset.schema.names:
        return counts
    for batch in dataset.to_batches(columns=[column], batch_size=65_536):
        counts.update(v if v is not None else "-" for v in batch.column(0).to_pylist())
    return counts


def plot_balance(planned: Counter[str], kept: Counter[str], path: Path) -> None:
    names = sorted(planned, key=lambda s: -planned[s])
    fig = Figure(figsize=(7, 0.4 * len(names) + 1.4))
    ax = fig.subplots()
    y = range(len(names))
    ax.barh([i - 0.2 for i in y], [planned[n] for n in names], 0.4, label="planned")
    ax.barh([i + 0.2 for i in y], [kept[n] for n in names], 0.4, label="kept")
    ax.set_yticks(list(y), names, fontsize=8)
    ax.invert_yaxis()
    ax.legend(fontsize=8)
    ax.set_title("Requests planned and documents kept per subject", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _balance(m: Manifest, version: VersionFiles, out: Path) -> list[str]:
    """Planned requests and kept documents per subject and per topic: whether fill rounds
    kept the corpus balanced (they aim every subject at an equal share of the kept set)."""
    planned = _column_counts(version, "plan.parquet", "subject")
    kept = _column_counts(version, "text", "subject")
    if not planned:
        return []
    share = sum(kept.values()) / len(planned)
    lines = [
        "## Balance",
        "",
        f"Equal share of the kept set: {share:.1f} documents per subject.",
        "",
        "| subject | planned | kept | kept vs share |",
        "| --- | ---: | ---: | ---: |",
    ]
    for subject in sorted(planned, key=lambda s: -planned[s]):
        gap = kept[subject] - share
        lines.append(f"| {subject} | {planned[subject]} | {kept[subject]} | {gap:+.1f} |")
    plot_balance(planned, kept, out / "balance.png")
    lines += ["", "![planned and kept per subject](balance.png)", ""]
    by_topic_planned = _column_counts(version, "plan.parquet", "topic")
    by_topic_kept = _column_counts(version, "text", "topic")
    topics = sorted(by_topic_planned, key=lambda t: (by_topic_kept[t] - by_topic_planned[t], t))
    if len(topics) > TOPICS_LISTED:
        lines += [f"The {TOPICS_LISTED} topics that kept least of what they planned, "
                  f"of {len(topics)}:", ""]  # fmt: skip
        topics = topics[:TOPICS_LISTED]
    lines += ["| topic | planned | kept |", "| --- | ---: | ---: |"]
    lines += [f"| {t} | {by_topic_planned[t]} | {by_topic_kept[t]} |" for t in topics]
    return [*lines, ""]


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
    lines = ["## Diversity", "", _table(rows), "", "![axis coverage](axis_coverage.png)", ""]
    if div.documents < OPENERS_PLOT_MIN:  # a few documents: bars of 1 and 2 say nothing
        (out / "openers.png").unlink(missing_ok=True)
        openers = [(f"`{o}`" if o else "-", n) for o, n in div.top_openers[:10]]
        return [*lines, "Most common openers:", "", _table(openers or [("-", 0)]), ""]
    plot_openers(div.top_openers, div.documents, out / "openers.png")
    return [*lines, "![openers](openers.png)", ""]


def _samples(m: Manifest, version: VersionFiles) -> list[str]:
    samples = sample_documents(version, m)
    if not samples:
        return []
    lines = [SAMPLES_HEADING, ""]
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


def render_report(location: str | Path, out: Path | None = None) -> Path:
    """Write the report (report.md and its plots) of the version at `location` (a local
    directory or a URL) into `out`, by default the version's own `report/`; returns the .md
    path."""
    version = VersionFiles(location)
    m = version.manifest()
    if out is None:
        if is_url(location):
            raise ValueError(f"{location}: a version at a URL needs a local folder for its report")
        out = Path(location) / "report"
    out.mkdir(parents=True, exist_ok=True)
    parts = [f"# Run {m.run_id}", ""]
    parts += _counts(m) + _sources(m) + _filters(m) + _generation(m) + _tokens(m) + _fill(m)
    parts += _balance(m, version, out)
    parts += _quality(m, out) + _diversity(m, out) + _samples(m, version)
    path = out / "report.md"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
