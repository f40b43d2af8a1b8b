"""Keep a persistent index in step with the dataset versions under an output directory.

A run that died after writing its manifest but before its commit leaves a dataset the index
lacks; a deleted version leaves entries behind. `reconcile` indexes the first kind from their
text shards and, with `prune`, removes the second. Prune only an index that serves this one
output directory (the default `<out>/_state/minhash`), never a Redis index shared by others.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from booksmith.filters.dedup.engine import index_entries
from booksmith.filters.dedup.index import DedupIndex
from booksmith.schemas.dedup_settings import DedupSettings
from booksmith.shards.version_dir import MANIFEST, list_versions, read_manifest


@dataclass
class Reconciled:
    added: dict[str, int] = field(default_factory=dict)  # run id -> documents indexed
    removed: dict[str, int] = field(default_factory=dict)  # run id -> entries removed


def version_texts(version: Path) -> tuple[list[str], list[str]]:
    """Ids and texts of a dataset version's kept documents (its text shards)."""
    manifest = read_manifest(version)
    tables = [
        pq.read_table(version / rel, columns=["id", "text"]) for rel in manifest.shard_paths("text")
    ]
    if not tables:
        return [], []
    table = pa.concat_tables(tables)
    return table.column("id").to_pylist(), table.column("text").to_pylist()


def reconcile(
    index: DedupIndex, out: Path, settings: DedupSettings | None = None, prune: bool = False
) -> Reconciled:
    result = Reconciled()
    have = {run: rows for run, rows in index.runs().items() if rows >= 0}  # -1: pending
    for version in list_versions(out):
        run_id = read_manifest(version).run_id
        if run_id in have:
            continue
        ids, texts = version_texts(version)
        entry_ids, sigs, exact = index_entries(ids, [t or "" for t in texts], settings)
        result.added[run_id] = index.add(run_id, entry_ids, sigs, exact)
    if prune:
        for run_id in index.runs():
            if not (out / run_id / MANIFEST).is_file():
                result.removed[run_id] = index.remove_run(run_id)
    return result
