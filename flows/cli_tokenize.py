"""`booksmith datasets tokenize INPUT --out DIR`: token shards of a corpus of one's own.

INPUT is what `booksmith filter` and `booksmith dedup` write (their output directory, or its
`kept.parquet`), any JSONL or Parquet file of `{id, text, ...}` records, or a dataset version
(its text shards). DIR gets `tokens/<encoding>/part-NNNNN.parquet` (the token-shard layout of a
version: `id`, `input_ids` ending with end-of-text, `n_tokens`; optionally packed rows) and
`tokens.json` (each encoding's vocabulary, end-of-text, documents and tokens, and the input),
which `booksmith train --data DIR` reads. Running it again with the same encoding replaces that
encoding's shards; another encoding is added beside them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from booksmith.filters.inputs import InputError, iter_tables
from booksmith.shards.encodings import PRIMARY, EncodingSpec
from booksmith.shards.files import write_bytes_atomically
from booksmith.shards.tokens import tokens_dir, write_token_shards
from booksmith.shards.version_dir import is_dataset

KEPT = "kept.parquet"  # what `booksmith filter` and `booksmith dedup` keep
TOKENS_INFO = "tokens.json"  # read by the trainer (trainer/data.py, the same name)


def records_file(path: Path) -> Path:
    """The records to tokenize: a filter or dedup output directory means its kept.parquet."""
    if path.is_dir() and not is_dataset(path):
        if (path / KEPT).is_file():
            return path / KEPT
        raise InputError(
            f"{path}: neither a dataset version (no manifest.json) nor the output of "
            f"`booksmith filter` or `booksmith dedup` (no {KEPT})"
        )
    return path


def _records(path: Path) -> Iterator[tuple[str, str]]:
    for table in iter_tables(path, required=("id", "text")):
        ids = table.column("id").to_pylist()
        texts = table.column("text").to_pylist()
        yield from ((str(i), t or "") for i, t in zip(ids, texts, strict=True))


def _clear(out: Path, name: str) -> None:
    """Remove one encoding's earlier shards (and packed rows) from a directory this command
    wrote; refuse a directory of someone else's Parquet files."""
    shard_dirs = [out / tokens_dir(name), *out.glob(f"{tokens_dir(name)}-packed-*")]
    found = [p for d in shard_dirs if d.is_dir() for p in d.glob("*.parquet")]
    if found and not (out / TOKENS_INFO).is_file():
        raise InputError(
            f"{out / tokens_dir(name)}: holds Parquet files this command did not write "
            f"(no {TOKENS_INFO}); choose another --out"
        )
    for p in found:
        p.unlink()


def tokenize_records(
    input: Path,
    out: Path,
    spec: EncodingSpec | str = PRIMARY,
    *,
    pack_seq_len: int | None = None,
    shard_rows: int | None = None,
    num_threads: int | None = None,
) -> dict[str, Any]:
    """Write token shards of INPUT's records under OUT; returns what tokens.json records."""
    source = records_file(input)
    if is_dataset(out):
        raise InputError(
            f"{out}: is a dataset version; add an encoding to it with "
            "`booksmith datasets tokenize VERSION --encoding NAME` (no --out)"
        )
    enc = EncodingSpec.of(spec).load()
    out.mkdir(parents=True, exist_ok=True)
    info_path = out / TOKENS_INFO
    info: dict[str, Any] = json.loads(info_path.read_text()) if info_path.is_file() else {}
    _clear(out, enc.name)
    result = write_token_shards(
        _records(source),
        enc,
        root=out,
        shard_rows=shard_rows,
        num_threads=num_threads,
        pack_seq_len=pack_seq_len,
    )
    entry = result.manifest_entry(enc).model_dump(mode="json", exclude_none=True)
    shards = [
        s.model_dump(mode="json", exclude_none=True) for s in result.shards + result.packed_shards
    ]
    info.setdefault("tokens", {})[enc.name] = {**entry, "source": str(source), "shards": shards}
    write_bytes_atomically(info_path, (json.dumps(info, indent=2) + "\n").encode())
    entry_out: dict[str, Any] = info["tokens"][enc.name]
    return entry_out
