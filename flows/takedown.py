"""A takedown that reaches every copy (issue 20, point 2): `booksmith datasets takedown`.

Documents leave, with their rejected near-duplicates, every version under the output directory
and every finished run set aside there (`_state/failed/`); their answers leave the response
cache and the requests are tombstoned; their MinHash index entries are flagged (hashes and
signatures stay, so the text is still found as a duplicate); the affected reports are
regenerated; then the recorded copies (shards/copies.py: `datasets bin` folders, export
targets) are written again from the new versions, and the bin outputs of versions retired
since have the documents' tokens cut out (by the spans recorded beside them). What could not be
reached is listed, one line each, and the command exits 1: a copy that failed, an export of a
version retired since that holds one of the documents (checked there), a bin output of a
retired version that cannot be checked, and a run not finished (killed or running) whose
spilled chunks hold one (it would publish it). `plan_takedown` changes nothing: it is the dry
run.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from booksmith.schemas.redact import MASK, redact_url
from booksmith.shards.copies import (
    Copy,
    copies_to_rewrite,
    orphaned_exports,
    retired_bins,
    rows_in_export,
)
from booksmith.shards.version_dir import FAILED_DIR, RUNS_DIR, state_dir


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


@dataclass
class TakedownPlan:
    out: Path
    asked: list[str]
    drop: set[str]  # the ids asked for and their rejected near-duplicates
    places: dict[str, dict[str, int]]  # version -> rows per kind (text, rejected)
    set_aside: dict[str, dict[str, int]]  # the same for runs under _state/failed/
    cache_answers: int
    indexes: list[str]  # file index directories and Redis URLs to flag (maybe none)
    copies: list[Copy]
    unfinished: dict[str, int] = field(default_factory=dict)  # run -> rows in its spills
    orphans: list[str] = field(default_factory=list)  # exports of retired versions holding them
    cuts: list[tuple[Copy, int]] = field(default_factory=list)  # retired bins: documents held

    @property
    def cache_path(self) -> Path:
        return state_dir(self.out) / "responses.sqlite"

    def to_json(self) -> dict[str, Any]:
        return {"places": self.places, "set_aside": self.set_aside,
                "cache_answers": self.cache_answers,
                "indexes": [redact_url(i) for i in self.indexes],
                "copies": [{"kind": c.kind, "version": c.version, "place": c.place}
                           for c in self.copies], "unfinished": self.unfinished,
                "orphans": self.orphans,
                "cuts": [{"place": c.place, "version": c.version, "documents": n}
                         for c, n in self.cuts]}  # fmt: skip


@dataclass
class TakedownResult:
    removed: dict[str, int] = field(default_factory=dict)  # version -> rows removed
    set_aside: dict[str, int] = field(default_factory=dict)
    cache_answers: int = 0
    index_flagged: int = 0
    rewritten: list[str] = field(default_factory=list)  # copies written again
    unreached: list[str] = field(default_factory=list)  # "place: why", one per copy

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def plan_takedown(out: Path, asked: list[str], index: str | None = None) -> TakedownPlan:
    """Everything a takedown of `asked` would touch under `out`; changes nothing. `index`:
    the MinHash index to flag (default: those the versions' configs name, see
    `recorded_index`)."""
    from booksmith.shards.catalog import takedown_places, with_near_duplicates
    from booksmith.shards.version_dir import list_versions, read_manifest

    failed = state_dir(out) / FAILED_DIR
    drop = with_near_duplicates(out, asked) | with_near_duplicates(failed, asked)
    places = takedown_places(out, drop)
    indexes, unreachable = ([index], []) if index is not None else ([], [])
    if index is None:
        for version in [*list_versions(out), *list_versions(failed)]:
            try:
                spec = recorded_index(out, read_manifest(version).config)
            except ValueError as e:
                unreachable.append(f"the MinHash index of {version.name}: {e}")
                continue
            if spec is not None and spec not in indexes:
                indexes.append(spec)
    plan = TakedownPlan(
        out, asked, drop, places, takedown_places(failed, drop), 0, indexes,
        copies_to_rewrite(out, set(places)), _unfinished(out, drop),
    )  # fmt: skip
    plan.cache_answers = _cached_answers(plan.cache_path, drop)
    plan.orphans = [line for c in orphaned_exports(out) if (line := _orphan(out, c, drop))]
    plan.orphans += list(dict.fromkeys(unreachable))
    _retired_bins(plan)
    return plan


def recorded_index(out: Path, config: dict[str, Any]) -> str | None:
    """The MinHash index a version's run committed to, from the config in its manifest (see
    `index_spec`). A Redis URL recorded without its password (redacted) is taken from
    $BOOKSMITH_REDIS_URL when that is the same URL; otherwise a ValueError says what to pass."""
    import os

    from booksmith.filters.dedup import DedupSettings, index_spec

    recorded = config.get("dedup") or {}
    dedup = {k: v for k, v in recorded.items() if k in DedupSettings.model_fields}
    url = str(dedup.get("redis_url") or "")
    if dedup.get("index") == "redis" and MASK in url:
        env = os.environ.get("BOOKSMITH_REDIS_URL", "")
        if not env or redact_url(env) != url:
            raise ValueError(f"{url} is recorded without its password; set BOOKSMITH_REDIS_URL "
                             "to it or pass --index with it")  # fmt: skip
        dedup["redis_url"] = env
    return index_spec(DedupSettings.model_validate(dedup), out)


def _retired_bins(plan: TakedownPlan) -> None:
    """The bin outputs of retired versions that hold one of the documents (to cut), or that
    cannot be checked (listed); a folder that is gone holds nothing."""
    from booksmith.shards.binexport import held_in_bin

    for copy in retired_bins(plan.out):
        if not Path(copy.place).is_dir():
            continue
        try:
            if held := held_in_bin(plan.out, copy, plan.drop):
                plan.cuts.append((copy, held))
        except (OSError, ValueError) as e:
            plan.orphans.append(f"bin output {copy.place} of {copy.version}, a version no "
                                f"longer under {plan.out}: {one_line(e)}")  # fmt: skip


def _orphan(out: Path, copy: Copy, drop: set[str]) -> str | None:
    """Why an export of a retired version is out of reach, if it holds one of the documents."""
    where = f"export {copy.place} of {copy.version}, a version no longer under {out}"
    try:
        rows = rows_in_export(copy.place, drop)
    except Exception as e:  # any failure to read it: it may hold them, so it is listed
        return f"{where}: could not be checked ({one_line(e)})"
    if not rows:
        return None
    return (f"{where}: it holds {rows} of these documents and cannot be written again from "
            "here; delete that copy")  # fmt: skip


def _unfinished(out: Path, drop: set[str]) -> dict[str, int]:
    """Rows of these ids in the spilled chunks of runs not finished (killed, or running):
    a resumed run would publish them, and its spills are not a version to rewrite."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    wanted = pa.array(sorted(drop), pa.string())
    found: dict[str, int] = {}
    for path in sorted((state_dir(out) / RUNS_DIR).glob("*/chunks/chunk-*.parquet")):
        ids = pq.read_table(path, columns=["id"]).column("id")
        if n := int(pc.sum(pc.is_in(ids, value_set=wanted)).as_py() or 0):
            run_id = path.parent.parent.name
            found[run_id] = found.get(run_id, 0) + n
    return found


def describe(plan: TakedownPlan) -> list[str]:
    """One line per place the takedown touches."""
    lines = [f"ids: {len(set(plan.asked))} asked, {len(plan.drop)} with their near-duplicates"]
    for where, rows in (("version", plan.places), ("set-aside run", plan.set_aside)):
        for run_id, n in rows.items():
            lines.append(f"{where} {run_id}: {n['text']} kept and {n['rejected']} rejected "
                         "rows; its report regenerated")  # fmt: skip
    lines.append(f"response cache {plan.cache_path}: {plan.cache_answers} answers removed, "
                 f"{len(plan.drop)} requests tombstoned")  # fmt: skip
    for index in plan.indexes:
        lines.append(f"MinHash index {redact_url(index)}: their entries flagged as taken "
                     "down")  # fmt: skip
    for run_id, spilled in plan.unfinished.items():
        lines.append(f"not reachable: {_unfinished_line(plan.out, run_id, spilled)}")
    lines += [f"not reachable: {orphan}" for orphan in plan.orphans]
    for c in plan.copies:
        what = "bin output" if c.kind == "bin" else "export"
        lines.append(f"{what} of {c.version} at {c.place}: written again")
    for c, held in plan.cuts:
        lines.append(f"bin output of {c.version} (retired) at {c.place}: {held} documents cut "
                     "out")  # fmt: skip
    return lines


def apply_takedown(plan: TakedownPlan) -> TakedownResult:
    """Take the plan's documents down everywhere it found them (see the module docstring)."""
    from booksmith.flows.report import render_report
    from booksmith.generation.cache import ResponseCache
    from booksmith.shards.catalog import takedown

    out, drop = plan.out, plan.drop
    result = TakedownResult(removed=takedown(out, drop))
    failed = state_dir(out) / FAILED_DIR
    result.set_aside = takedown(failed, drop)
    result.unreached += [_unfinished_line(out, r, n) for r, n in plan.unfinished.items()]
    result.unreached += plan.orphans
    cache = ResponseCache(plan.cache_path)
    try:
        result.cache_answers = cache.take_down(drop)
    finally:
        cache.close()
    result.index_flagged = sum(_flag_index(spec, drop, result) for spec in plan.indexes)
    for run_id in result.removed:
        refigure(out / run_id)
        render_report(out / run_id)  # before the copies: an export carries report/
    for run_id in result.set_aside:
        refigure(failed / run_id)
        if (failed / run_id / "report").is_dir():
            render_report(failed / run_id)
    for copy in plan.copies:
        _rewrite(out, copy, result)
    for copy, _ in plan.cuts:
        _cut(out, copy, drop, result)
    _log(plan, result)
    return result


def refigure(version: Path) -> None:
    """The manifest's figures of what a version holds, measured again from its shards after a
    takedown: the kept count, languages, the quality histogram and the diversity section (the
    same bottom-k sample a run draws, so they read as a run of the remaining documents would;
    the report quotes the openers, and an opener of one document is its first words). The
    funnel's counts stay as the run counted them; the takedowns are listed beside them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from booksmith.generation.diversity import DiversitySample
    from booksmith.pipeline.finalize import BINS, quality_bins
    from booksmith.schemas.manifest import Diversity, QualityHistogram, ShardKind
    from booksmith.shards.dataset import commit_manifest
    from booksmith.shards.version_dir import read_manifest

    m = read_manifest(version)
    axes = {axis: list(cov.counts) for axis, cov in m.diversity.axis_coverage.items()}
    sample = DiversitySample(axes)
    languages: Counter[str] = Counter()
    hist = {"kept": [0] * BINS, "rejected": [0] * BINS}
    kinds: list[tuple[ShardKind, str]] = [("text", "kept"), ("rejected", "rejected")]
    for kind, counted in kinds:
        for rel in m.shard_paths(kind):
            shard = pq.ParquetFile(version / rel)
            wanted = ["id", "text", "lang", "quality_score", *axes] if kind == "text" else []
            columns = [c for c in [*wanted, "quality_score"] if c in shard.schema_arrow.names]
            for batch in shard.iter_batches(columns=list(dict.fromkeys(columns))):
                t = pa.Table.from_batches([batch])
                if "quality_score" in t.column_names:
                    scores = quality_bins(t.column("quality_score"))
                    hist[counted] = [a + b for a, b in zip(hist[counted], scores, strict=True)]
                if kind == "text":
                    if "lang" in t.column_names:
                        languages.update(x for x in t.column("lang").to_pylist() if x)
                    rows = t.select(list(axes)).to_pylist()
                    sample.add(t["id"].to_pylist(), t["text"].to_pylist(), rows)
    if m.counts.kept:  # as the run counted its kept documents
        m.counts.kept = sample.documents
    m.languages = dict(languages)
    if m.quality is not None and len(m.quality.edges) == BINS + 1:
        m.quality = QualityHistogram(edges=m.quality.edges, **hist)
    if m.diversity.documents:  # a version measured when written (not, e.g., `booksmith dedup`'s)
        m.diversity = Diversity.model_validate(sample.report())
    commit_manifest(version, m)


def _unfinished_line(out: Path, run_id: str, rows: int) -> str:
    where = state_dir(out) / RUNS_DIR / run_id
    partial = out / run_id  # its shards written before the kill, if it got that far
    both = f"{where} and {partial}" if partial.is_dir() else str(where)
    return (f"unfinished run {run_id} ({where}): its spilled chunks hold {rows} of these "
            f"documents; let it finish (run it again) or remove {both}, then take down "
            "again")  # fmt: skip


def _flag_index(spec: str, drop: set[str], result: TakedownResult) -> int:
    from booksmith.filters.dedup import DedupIndexError, open_as_built

    try:
        return open_as_built(spec).flag_taken_down(drop)
    except (OSError, ValueError, TypeError, DedupIndexError) as e:
        result.unreached.append(f"MinHash index {redact_url(spec)}: {one_line(e)}")
        return 0


def _rewrite(out: Path, copy: Copy, result: TakedownResult) -> None:
    """Write one recorded copy again from its (new) version; a failure is listed, not raised,
    so that every other copy is still reached."""
    where = f"{'bin output' if copy.kind == 'bin' else 'export'} {copy.place}"
    try:
        if copy.kind == "bin":
            _rewrite_bin(out, copy)
        else:
            _rewrite_export(out, copy)
    except Exception as e:  # any failure of this copy: listed, the others still go
        result.unreached.append(f"{where}: {one_line(e)}")
        return
    result.rewritten.append(where)


def _cut(out: Path, copy: Copy, drop: set[str], result: TakedownResult) -> None:
    from booksmith.shards.binexport import cut_from_bin

    where = f"bin output {copy.place}"
    try:
        cut_from_bin(out, copy, drop)
    except Exception as e:  # any failure of this copy: listed, the others still go
        result.unreached.append(f"{where}: {one_line(e)}")
        return
    result.rewritten.append(where)


def _rewrite_bin(out: Path, copy: Copy) -> None:
    from booksmith.shards.binexport import export_bin

    folder = Path(copy.place)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: the folder is gone; remove its entry from "
                                f"{state_dir(out) / 'copies.json'} if that is meant")  # fmt: skip
    paths = export_bin(out / copy.version, folder, encoding=copy.encoding or "smollm2",
                       fmt="nanogpt" if copy.format == "nanogpt" else "llmc",
                       prefix=copy.prefix or "train",
                       shard_tokens=copy.shard_tokens or 100_000_000)  # fmt: skip
    for name in set(copy.files) - {p.name for p in paths}:
        (folder / name).unlink(missing_ok=True)  # fewer tokens can make fewer llm.c shards


def _rewrite_export(out: Path, copy: Copy) -> None:
    from booksmith.shards.export import export
    from booksmith.shards.reachable import export_target
    from booksmith.shards.verify import verify

    if MASK in copy.place:
        raise ValueError("recorded without its credentials; export the version there again")
    if problems := export_target(copy.place, "target"):  # a missing bucket: say so, and how
        raise ValueError("; ".join(problems))
    report = export(out / copy.version, copy.place)
    check = verify(report.url)
    if not check.ok:
        raise ValueError(f"verify failed there: {'; '.join(check.problems[:3])}")


def _cached_answers(path: Path, ids: set[str]) -> int:
    from booksmith.generation.cache import ResponseCache

    if not path.is_file():
        return 0
    cache = ResponseCache(path)
    try:
        return sum(cache.get(i) is not None for i in ids)
    finally:
        cache.close()


def _log(plan: TakedownPlan, result: TakedownResult) -> None:
    """One JSON line per takedown in _state/takedowns.jsonl: when, which ids, what changed."""
    from booksmith.shards.files import write_bytes_atomically

    path = state_dir(plan.out) / "takedowns.jsonl"
    asked = set(plan.asked)
    entry = {"at": datetime.now(UTC).isoformat(), "ids": sorted(asked),
             "with_near_duplicates": sorted(plan.drop - asked), "versions": result.removed,
             **{k: v for k, v in result.to_json().items() if k != "removed"}}  # fmt: skip
    old = path.read_bytes() if path.is_file() else b""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomically(path, old + (json.dumps(entry) + "\n").encode())


__all__ = ["TakedownPlan", "TakedownResult", "apply_takedown", "describe", "plan_takedown"]
