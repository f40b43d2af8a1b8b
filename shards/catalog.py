"""Dataset versions under an output directory: list them, union them for training, retire one,
and take documents down from every version.

Each nightly run is one version, `<out>/<run_id>/`. A takedown rebuilds each affected version
beside it (`<out>/.takedown-<run_id>/`, unchanged files hard-linked), then swaps it in with
two renames; `recover()` finishes or discards a swap a crash interrupted, so a version is always
either the old complete one, the new complete one, or (between the renames) not visible.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from booksmith.schemas.manifest import Manifest, ShardEntry, ShardKind, Takedown
from booksmith.shards.dataset import commit_manifest
from booksmith.shards.encodings import get_encoding
from booksmith.shards.files import fsync_dir
from booksmith.shards.tokens import (
    Packer,
    arrow_token_type,
    count_stored_tokens,
    packed_dir,
    packed_schema,
)
from booksmith.shards.version_dir import (
    MANIFEST,
    STATE_DIR,
    is_dataset,
    list_versions,
    read_manifest,
)
from booksmith.shards.writer import (
    COMPRESSION,
    DEFAULT_SHARD_BYTES,
    ROW_GROUP_ROWS,
    ShardWriter,
    commit,
    describe,
    tmp_name,
)

TAKEDOWN_PREFIX = ".takedown-"
RETIRED_PREFIX = ".retired-"

# Called with (out, run_id) when a version is retired: the MinHash index registers a function
# here that drops the version's entries, so a retired version no longer counts as "seen".
RETIRE_HOOKS: list[Callable[[Path, str], Any]] = []


@dataclass(frozen=True)
class VersionSummary:
    run_id: str
    path: Path
    created_at: str
    documents: int
    rejected: int
    bytes: int
    tokens: dict[str, int]  # text tokens per encoding

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "path": str(self.path)}


def summarize(out: Path) -> list[VersionSummary]:
    """Every version under `out`, oldest first, with its size and token counts."""
    recover(out)
    rows = []
    for path in list_versions(out):
        m = read_manifest(path)
        rows.append(
            VersionSummary(
                run_id=m.run_id,
                path=path,
                created_at=m.created_at,
                documents=m.documents,
                rejected=m.counts.rejected,
                bytes=sum(s.bytes for s in m.shards),
                tokens={k: v.tokens for k, v in m.tokens.items()},
            )
        )
    return rows


def _url_versions(url: str) -> list[tuple[str, Manifest]]:
    """(folder name, manifest) of every version under an export URL, by name, read through
    fsspec (shards/fs.py)."""
    from booksmith.shards.fs import filesystem

    fs, root = filesystem(url)
    found = []
    for entry in sorted(fs.ls(root, detail=False)):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        where = f"{entry.rstrip('/')}/{MANIFEST}"
        if name == STATE_DIR or not fs.exists(where):
            continue
        shown = f"{url.rstrip('/')}/{name}/{MANIFEST}"
        found.append((name, Manifest.parse(fs.cat_file(where), shown)))
    return found


def summarize_url(url: str) -> list[VersionSummary]:
    """`summarize` for versions in an object store (an export target, `s3://bucket/prefix`):
    every folder under it with a manifest."""
    rows = [
        VersionSummary(
            run_id=m.run_id,
            path=Path(name),
            created_at=m.created_at,
            documents=m.documents,
            rejected=m.counts.rejected,
            bytes=sum(s.bytes for s in m.shards),
            tokens={k: v.tokens for k, v in m.tokens.items()},
        )
        for name, m in _url_versions(url)
    ]
    return sorted(rows, key=lambda r: r.run_id)


def _version_dir(out: Path, run_id: str) -> Path:
    if run_id in ("", ".", "..") or "/" in run_id or run_id == STATE_DIR:
        raise ValueError(f"{run_id!r} is not a run id")
    path = out / run_id
    if not is_dataset(path):
        raise FileNotFoundError(f"{path}: no such dataset version (no {MANIFEST})")
    return path


def retire(out: Path, run_id: str) -> None:
    """Remove a version: its manifest first (from then on it is not a dataset), then its files,
    then its entries in the MinHash index (RETIRE_HOOKS)."""
    path = _version_dir(out, run_id)
    (path / MANIFEST).unlink()
    fsync_dir(path)
    parked = out / f"{RETIRED_PREFIX}{run_id}"
    os.replace(path, parked)
    shutil.rmtree(parked)
    for hook in RETIRE_HOOKS:
        hook(out, run_id)


@dataclass(frozen=True)
class Corpus:
    """Chosen versions' token shards under one encoding, as one training corpus."""

    encoding: str
    versions: list[str]
    files: list[str]  # local paths, or URLs under `location`
    documents: int
    tokens: int  # stored tokens, end-of-text included
    location: str = ""  # the export URL the versions are under ("" for a local directory)

    def dataset(self) -> pads.Dataset:
        """A pyarrow dataset over every shard (stream it with `.to_batches()`)."""
        if not self.location:
            return pads.dataset(self.files, format="parquet")
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        from booksmith.shards.fs import filesystem

        fs, root = filesystem(self.location)
        base = self.location.rstrip("/")
        inner = [root + f[len(base) :] for f in self.files]
        return pads.dataset(inner, format="parquet", filesystem=PyFileSystem(FSSpecHandler(fs)))

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _corpus_part(m: Manifest, where: str, encoding: str) -> tuple[list[str], int, int]:
    """One version's token shards under `encoding` (paths under `where`), documents, tokens."""
    entry = m.tokens.get(encoding)
    if entry is None:
        tokenize = f"`booksmith datasets tokenize {where} --encoding {encoding}`"
        if "://" in where:  # an export: tokenize where it came from, then export again
            tokenize = (f"`booksmith datasets tokenize OUT/{m.run_id} --encoding {encoding}` "
                        "where it was exported from, then export it again")  # fmt: skip
        raise ValueError(
            f"{where}/{MANIFEST}: tokens: no {encoding!r} token shards in this version "
            f"(it has {sorted(m.tokens)}); add them with {tokenize}"
        )
    files = [f"{where}/{p}" for p in m.shard_paths("tokens", encoding)]
    return files, entry.documents, entry.stored_tokens


def corpus(
    out: Path | str, encoding: str = "cl100k_base", run_ids: Iterable[str] | None = None
) -> Corpus:
    """The union of the chosen versions (all by default) for training under `encoding`;
    `out` is an output directory or an export URL (`s3://bucket/prefix`)."""
    from booksmith.shards.fs import is_url

    if is_url(out):
        return _corpus_url(str(out), encoding, run_ids)
    out = Path(out)
    recover(out)
    chosen = list(run_ids) if run_ids is not None else [p.name for p in list_versions(out)]
    files: list[str] = []
    documents = tokens = 0
    for run_id in chosen:
        path = _version_dir(out, run_id)
        part, docs, toks = _corpus_part(read_manifest(path), str(path), encoding)
        files, documents, tokens = files + part, documents + docs, tokens + toks
    return Corpus(encoding, chosen, files, documents, tokens)


def _corpus_url(url: str, encoding: str, run_ids: Iterable[str] | None) -> Corpus:
    base = url.rstrip("/")
    found = dict(_url_versions(base))
    chosen = list(run_ids) if run_ids is not None else list(found)
    if missing := [r for r in chosen if r not in found]:
        raise FileNotFoundError(
            f"{base}/{missing[0]}: no such dataset version there (it holds "
            f"{', '.join(found) or 'none'}); `booksmith datasets list {base}` lists them"
        )
    files: list[str] = []
    documents = tokens = 0
    for run_id in chosen:
        part, docs, toks = _corpus_part(found[run_id], f"{base}/{run_id}", encoding)
        files, documents, tokens = files + part, documents + docs, tokens + toks
    return Corpus(encoding, chosen, files, documents, tokens, location=base)


def recover(out: Path) -> None:
    """Finish or discard takedown swaps and retirements a crash interrupted."""
    if not out.is_dir():
        return
    for staged in out.glob(f"{TAKEDOWN_PREFIX}*"):
        run_id = staged.name.removeprefix(TAKEDOWN_PREFIX)
        old = out / f"{RETIRED_PREFIX}{run_id}"
        if not (out / run_id).exists() and is_dataset(staged):
            os.replace(staged, out / run_id)  # crashed between the two renames: finish
        else:
            shutil.rmtree(staged)  # crashed while building: the old version still stands
        if old.exists() and (out / run_id).exists():
            shutil.rmtree(old)
    for parked in out.glob(f"{RETIRED_PREFIX}*"):
        if (out / parked.name.removeprefix(RETIRED_PREFIX)).exists() or not is_dataset(parked):
            shutil.rmtree(parked)


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _filter_shards(
    src: Path, dst: Path, paths: list[str], kind: ShardKind, drop: set[str], extra: dict[str, Any]
) -> tuple[list[ShardEntry], int]:
    """Rewrite one group of shards without the dropped ids; (new shards, rows removed)."""
    first = pq.ParquetFile(src / paths[0])
    subdir = Path(paths[0]).parent.as_posix()
    writer = ShardWriter(
        dst,
        subdir,
        first.schema_arrow,
        kind=kind,
        max_rows=max(pq.ParquetFile(src / p).metadata.num_rows for p in paths) or None,
        max_bytes=DEFAULT_SHARD_BYTES,
        extra=extra,
        count=count_stored_tokens if kind == "tokens" else None,
    )
    removed = 0
    keep_set = pa.array(sorted(drop), pa.string())
    for p in paths:
        table = pq.read_table(src / p)
        mask = pc.invert(pc.is_in(table.column("id"), value_set=keep_set))
        kept = table.filter(mask)
        removed += table.num_rows - kept.num_rows
        if kept.num_rows:
            writer.write(kept)
    return writer.close(), removed


def _filter_file(src: Path, dst: Path, entry: ShardEntry, drop: set[str]) -> ShardEntry:
    """One single-file table (plan.parquet) rewritten without the dropped ids, batch by batch."""
    source = pq.ParquetFile(src / entry.path)
    target = dst / entry.path
    target.parent.mkdir(parents=True, exist_ok=True)
    dropped = pa.array(sorted(drop), pa.string())
    rows = 0
    with pq.ParquetWriter(tmp_name(target), source.schema_arrow, compression=COMPRESSION) as w:
        for batch in source.iter_batches(ROW_GROUP_ROWS):
            kept = batch.filter(pc.invert(pc.is_in(batch.column("id"), value_set=dropped)))
            w.write_batch(kept)
            rows += kept.num_rows
    commit(tmp_name(target), target)
    return describe(target, root=dst, rows=rows, kind=entry.kind)


def _takedown_version(out: Path, path: Path, drop: set[str]) -> int:
    """Rebuild one version without the given ids and swap it in; returns rows removed."""
    m = read_manifest(path)
    staged = out / f"{TAKEDOWN_PREFIX}{path.name}"
    if staged.exists():
        shutil.rmtree(staged)
    new_shards: list[ShardEntry] = []
    removed = {"text": 0, "rejected": 0}
    groups: dict[tuple[ShardKind, str | None], list[str]] = {}
    for s in m.shards:
        if s.kind in ("text", "rejected", "tokens"):
            groups.setdefault((s.kind, s.encoding), []).append(s.path)
        elif s.kind == "plan":  # the request goes with its document (a grounded prompt
            new_shards.append(_filter_file(path, staged, s, drop))  # holds its source's text)
        elif s.kind != "packed":
            _link_or_copy(path / s.path, staged / s.path)
            new_shards.append(s)
    for (kind, enc_name), paths in groups.items():
        extra = {"encoding": enc_name} if enc_name else {}
        shards, n = _filter_shards(path, staged, paths, kind, drop, extra)
        new_shards += shards
        if kind in removed:
            removed[kind] += n
        if kind == "tokens" and enc_name is not None:
            entry = m.tokens[enc_name]
            table = pads.dataset([str(staged / s.path) for s in shards]).to_table(
                columns=["n_tokens"]
            )
            entry.documents = table.num_rows
            entry.tokens = int(pc.sum(table.column("n_tokens")).as_py() or 0)
            entry.stored_tokens = entry.tokens + entry.documents
            if packed := entry.packed:
                # packed rows cross document boundaries: rebuild them from the token shards
                repacked, stats = _repack(staged, shards, enc_name, packed.seq_len)
                new_shards += repacked
                entry.packed = packed.model_copy(update=stats)
    m.shards = new_shards
    m.documents -= removed["text"]
    m.counts.rejected -= removed["rejected"]
    m.takedowns.append(Takedown(removed=removed, ids=len(drop)))
    commit_manifest(staged, m)
    # swap: old out of the way, new in; recover() completes this if a crash comes between
    old = out / f"{RETIRED_PREFIX}{path.name}"
    os.replace(path, old)
    os.replace(staged, path)
    fsync_dir(out)
    shutil.rmtree(old)
    return removed["text"] + removed["rejected"]


def _repack(
    staged: Path, shards: list[ShardEntry], enc_name: str, seq_len: int
) -> tuple[list[ShardEntry], dict[str, int]]:
    """Packed rows from the (already filtered) token shards, without re-encoding any text."""
    enc = get_encoding(enc_name)
    writer = ShardWriter(
        staged,
        packed_dir(enc_name, seq_len),
        packed_schema(arrow_token_type(enc), seq_len),
        kind="packed",
        max_bytes=DEFAULT_SHARD_BYTES,
        extra={"encoding": enc_name},
        count=lambda t: {"stored_tokens": t.num_rows * (seq_len + 1)},
    )
    packer = Packer(writer, enc, seq_len)
    for s in shards:
        for batch in pq.ParquetFile(staged / s.path).iter_batches(columns=["input_ids"]):
            packer.feed(pa.Table.from_batches([batch]))
    return writer.close(), {"rows": packer.rows, "dropped_tokens": packer.dropped}


def ids_from_sources(out: Path, records: Iterable[tuple[str | None, str]]) -> list[str]:
    """The ids of every document (kept or rejected, in every version under `out`) derived from
    these source records: (source name, or None for any source, record id)."""
    wanted = list(records)
    found: list[str] = []
    for path in list_versions(out):
        m = read_manifest(path)
        for rel in [*m.shard_paths("text"), *m.shard_paths("rejected")]:
            if "source_id" not in pq.read_schema(path / rel).names:
                continue  # written before sources existed
            table = pq.read_table(path / rel, columns=["id", "source_name", "source_id"])
            hit = pa.array([False] * table.num_rows)
            for name, rid in wanted:
                match = pc.equal(table.column("source_id"), rid)
                if name is not None:
                    match = pc.and_(match, pc.equal(table.column("source_name"), name))
                hit = pc.or_(hit, pc.fill_null(match, False))
            found += table.filter(hit).column("id").to_pylist()
    return list(dict.fromkeys(found))


def with_near_duplicates(out: Path, ids: Iterable[str]) -> set[str]:
    """`ids` and the ids of the rejected near- and exact duplicates of them (their
    `duplicate_of`), in every version, and of those in turn (an exact duplicate of a
    rejected near-duplicate points at it): they carry nearly the same text."""
    drop = {i.strip() for i in ids if i.strip()}
    pairs: list[pa.Table] = []
    for path in list_versions(out):
        for rel in read_manifest(path).shard_paths("rejected"):
            pairs.append(pq.read_table(path / rel, columns=["id", "duplicate_of"]))
    if not pairs:
        return drop
    table = pa.concat_tables(pairs)
    while True:
        hits = table.filter(
            pc.is_in(table.column("duplicate_of"), value_set=pa.array(sorted(drop)))
        )
        more = set(hits.column("id").to_pylist()) - drop
        if not more:
            return drop
        drop |= more


def takedown_places(out: Path, ids: Iterable[str]) -> dict[str, dict[str, int]]:
    """Where these ids are: rows per version and kind (text, rejected), nothing changed."""
    wanted = pa.array(sorted({i.strip() for i in ids if i.strip()}))
    places: dict[str, dict[str, int]] = {}
    for path in list_versions(out):
        m = read_manifest(path)
        for kind in ("text", "rejected"):
            for rel in m.shard_paths(kind):
                column = pq.read_table(path / rel, columns=["id"]).column("id")
                n = int(pc.sum(pc.is_in(column, value_set=wanted)).as_py() or 0)
                if n:
                    counts = places.setdefault(path.name, {"text": 0, "rejected": 0})
                    counts[kind] += n
    return places


def takedown(out: Path, ids: Iterable[str]) -> dict[str, int]:
    """Remove documents by id from every version (text, token, packed and rejected shards);
    returns rows removed per affected run id."""
    recover(out)
    drop = {i.strip() for i in ids if i.strip()}
    results: dict[str, int] = {}
    if not drop:
        return results
    for path in list_versions(out):
        m = read_manifest(path)
        hit = False
        for rel in m.shard_paths("text") + m.shard_paths("rejected"):
            ids_col = pq.read_table(path / rel, columns=["id"]).column("id")
            if pc.any(pc.is_in(ids_col, value_set=pa.array(sorted(drop)))).as_py():
                hit = True
                break
        if hit:
            results[path.name] = _takedown_version(out, path, drop)
    return results


__all__ = [
    "RETIRE_HOOKS",
    "Corpus",
    "VersionSummary",
    "corpus",
    "recover",
    "retire",
    "summarize",
    "takedown",
    "takedown_places",
    "with_near_duplicates",
]
