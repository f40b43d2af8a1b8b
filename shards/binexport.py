"""Token streams for trainers outside booksmith: nanoGPT's and llm.c's uint16 `.bin` files.

Both read one flat uint16 stream of token ids with documents separated by end-of-text:
- `nanogpt`: raw little-endian uint16, no header (`np.memmap(path, dtype=np.uint16, mode="r")`),
  as nanoGPT's `prepare.py` writes `train.bin`;
- `llmc`: llm.c's shard layout, a 256 x int32 header (magic 20240520, version 1, token count)
  then the uint16 tokens, `<prefix>_000000.bin`, `<prefix>_000001.bin`, ... of at most
  `shard_tokens` tokens each.
Only an encoding whose ids fit uint16 qualifies (smollm2 does; cl100k_base does not).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow.parquet as pq

from booksmith.shards.copies import record_bin
from booksmith.shards.files import tmp_name
from booksmith.shards.version_dir import MANIFEST, read_manifest
from booksmith.shards.writer import commit

LLMC_MAGIC, LLMC_VERSION, LLMC_HEADER_INTS = 20240520, 1, 256
DEFAULT_SHARD_TOKENS = 100_000_000  # llm.c's FineWeb shards hold 100M tokens


def _stream(version: Path, encoding: str) -> Iterator[np.ndarray]:
    manifest = read_manifest(version)
    entry = manifest.tokens.get(encoding)
    if entry is None:
        raise ValueError(f"{version / MANIFEST}: tokens: no {encoding!r} token shards")
    if entry.dtype != "uint16":
        raise ValueError(
            f"{version / MANIFEST}: tokens.{encoding}: ids are {entry.dtype}; .bin "
            "exports need an encoding that fits uint16 (e.g. smollm2)"
        )
    for rel in manifest.shard_paths("tokens", encoding):
        for batch in pq.ParquetFile(version / rel).iter_batches(columns=["input_ids"]):
            yield batch.column(0).flatten().to_numpy().astype(np.uint16, copy=False)


def _write(path: Path, tokens: Iterable[np.ndarray], header_count: int | None) -> None:
    """Stream token arrays into `path` (atomically), after an llm.c header if given a count."""
    tmp = tmp_name(path)
    with open(tmp, "wb") as f:
        if header_count is not None:
            head = np.zeros(LLMC_HEADER_INTS, dtype="<i4")
            head[:3] = (LLMC_MAGIC, LLMC_VERSION, header_count)
            f.write(head.tobytes())
        for t in tokens:
            f.write(t.astype("<u2", copy=False).tobytes())
    commit(tmp, path)


def export_bin(
    version: Path,
    out: Path,
    *,
    encoding: str = "smollm2",
    fmt: Literal["nanogpt", "llmc"] = "llmc",
    prefix: str = "train",
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
) -> list[Path]:
    """Write the version's token stream as .bin files under `out` and record them in the
    version's output directory (shards/copies.py: a takedown writes them again); returns
    their paths."""
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "nanogpt":
        paths = [out / f"{prefix}.bin"]
        _write(paths[0], _stream(version, encoding), header_count=None)
    else:
        paths = _write_llmc(version, out, encoding, prefix, shard_tokens)
    how = {"encoding": encoding, "format": fmt, "prefix": prefix, "shard_tokens": shard_tokens}
    record_bin(version, out, paths, **how)
    return paths


def _write_llmc(
    version: Path, out: Path, encoding: str, prefix: str, shard_tokens: int
) -> list[Path]:
    """llm.c's shards of at most `shard_tokens` tokens each (at least one, maybe empty)."""
    paths: list[Path] = []
    pending: list[np.ndarray] = []
    held = 0
    for chunk in _stream(version, encoding):
        while len(chunk):
            take = min(len(chunk), shard_tokens - held)
            pending.append(chunk[:take])
            held += take
            chunk = chunk[take:]
            if held == shard_tokens:
                paths.append(out / f"{prefix}_{len(paths):06d}.bin")
                _write(paths[-1], pending, header_count=held)
                pending, held = [], 0
    if held or not paths:
        paths.append(out / f"{prefix}_{len(paths):06d}.bin")
        _write(paths[-1], pending, header_count=held)
    return paths
