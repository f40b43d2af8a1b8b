"""Deduplication: exact and MinHash near-duplicates, within a run and against every earlier run.

For the nightly flow (docs/design.md's commit order):

    index = open_index(cfg.dedup, cfg.output.dir)          # None when dedup.index == "none"
    chain = [ExactDedup(index), ..., MinHashDedup(cfg.dedup, index)]   # read the index only
    ... write shards, then the manifest ...
    commit(index, run_id, kept_docs, cfg.dedup)            # only now add this run's documents

`remove_run(index, run_id)` takes a deleted dataset version's documents back out, and
`reconcile(index, out, prune=True)` (at the start of a run) indexes versions whose commit never
happened and drops entries of versions deleted from `out`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from booksmith.filters.dedup.engine import EXACT, MINHASH, Verdict, find_duplicates, index_entries
from booksmith.filters.dedup.exact import ExactDedup
from booksmith.filters.dedup.file_index import FileIndex
from booksmith.filters.dedup.index import DedupIndex, DedupIndexError, Match
from booksmith.filters.dedup.minhash import MinHashParams, signatures, to_lean
from booksmith.filters.dedup.near import MinHashDedup
from booksmith.filters.dedup.redis_index import RedisIndex
from booksmith.filters.dedup.sync import Reconciled, reconcile
from booksmith.schemas import Document
from booksmith.schemas.dedup_settings import DedupSettings

STATE_SUBDIR = "minhash"


def default_index_path(out: Path) -> Path:
    from booksmith.shards.version_dir import state_dir

    return state_dir(out) / STATE_SUBDIR


def _file_index_path(settings: DedupSettings, out: Path | None) -> Path:
    if settings.index_path is not None:
        return settings.index_path
    if out is None:
        raise ValueError("dedup.index 'file' needs dedup.index_path or an output directory")
    return default_index_path(out)


def open_index(settings: DedupSettings, out: Path | None = None) -> DedupIndex | None:
    """The persistent index the settings name (file under `<out>/_state/minhash/`, or Redis)."""
    if settings.index == "none":
        return None
    if settings.index == "redis":
        assert settings.redis_url is not None  # checked by DedupSettings
        return RedisIndex(settings.redis_url, settings.redis_basename, settings.params)
    return FileIndex(_file_index_path(settings, out), settings.params)


def index_spec(settings: DedupSettings, out: Path) -> str | None:
    """The index the settings name, as `open_index_spec` reads it (a directory, or
    redis://...?basename=...); None for none, or for a file index never written."""
    if settings.index == "none":
        return None
    if settings.index == "redis":
        url = settings.redis_url or ""
        return f"{url}{'&' if '?' in url else '?'}basename={settings.redis_basename}"
    path = _file_index_path(settings, out)
    return str(path) if (path / "index.json").is_file() else None


def redis_spec(spec: str) -> tuple[str, str] | None:
    """(URL, basename) of a redis://host:port/db[?basename=NAME] spec; None for a directory."""
    from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

    if not spec.startswith(("redis://", "rediss://", "unix://")):
        return None
    parts = urlsplit(spec)
    query = parse_qs(parts.query)
    basename = query.pop("basename", ["booksmith"])[0]
    return urlunsplit(parts._replace(query=urlencode(query, doseq=True))), basename


def open_index_spec(spec: str, settings: DedupSettings | None = None) -> DedupIndex:
    """An index from a command-line spec: a directory, or redis://host:port/db[?basename=NAME]."""
    params = (settings or DedupSettings()).params
    if (redis := redis_spec(spec)) is not None:
        return RedisIndex(*redis, params)
    return FileIndex(Path(spec), params)


def open_as_built(spec: str) -> DedupIndex:
    """An existing index from a spec, opened with the parameters it was built with: for work
    that brings no signatures of its own (flagging taken-down documents, removing a run)."""
    import json

    from booksmith.filters.dedup.file_index import MANIFEST

    if (redis := redis_spec(spec)) is not None:
        return RedisIndex.as_built(*redis)
    path = Path(spec)
    try:
        built = json.loads((path / MANIFEST).read_text(encoding="utf-8"))["params"]
    except (OSError, ValueError, KeyError) as e:
        raise DedupIndexError(f"{path / MANIFEST}: not a readable MinHash index ({e})") from None
    fields = {k: v for k, v in built.items() if k in MinHashParams.__annotations__}
    return FileIndex(path, MinHashParams(**fields))


def commit(
    index: DedupIndex | None,
    run_id: str,
    docs: Sequence[Document],
    settings: DedupSettings | None = None,
) -> int:
    """Add a finished run's kept documents to the index (after its manifest is written)."""
    if index is None:
        return 0
    ids, sigs, exact = index_entries([d.id for d in docs], [d.text for d in docs], settings)
    return index.add(run_id, ids, sigs, exact)


def remove_run(index: DedupIndex | None, run_id: str) -> int:
    """Remove one run's entries (e.g. when its dataset version is deleted)."""
    return 0 if index is None else index.remove_run(run_id)


__all__ = [
    "EXACT",
    "MINHASH",
    "DedupIndex",
    "DedupIndexError",
    "DedupSettings",
    "ExactDedup",
    "FileIndex",
    "Match",
    "MinHashDedup",
    "MinHashParams",
    "Reconciled",
    "RedisIndex",
    "Verdict",
    "commit",
    "default_index_path",
    "find_duplicates",
    "index_spec",
    "open_as_built",
    "open_index",
    "open_index_spec",
    "reconcile",
    "redis_spec",
    "remove_run",
    "signatures",
    "to_lean",
]
