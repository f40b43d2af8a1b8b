"""Token streams for trainers outside booksmith: nanoGPT's and llm.c's uint16 `.bin` files.

Both read one flat uint16 stream of token ids with documents separated by end-of-text:
- `nanogpt`: raw little-endian uint16, no header (`np.memmap(path, dtype=np.uint16, mode="r")`),
  as nanoGPT's `prepare.py` writes `train.bin`;
- `llmc`: llm.c's shard layout, a 256 x int32 header (magic 20240520, version 1, token count)
  then the uint16 tokens, `<prefix>_000000.bin`, `<prefix>_000001.bin`, ... of at most
  `shard_tokens` tokens each.
Only an encoding whose ids fit uint16 qualifies (smollm2 does; cl100k_base does not).

A `.bin` holds no ids, so beside each output the output directory's state keeps which
documents it holds, in stream order, with their token counts (shards/copies.py): a takedown
after the version is retired can still find a document there and cut its tokens out.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from booksmith.shards.copies import Copy, record_bin, spans_path, update_copy
from booksmith.shards.files import tmp_name
from booksmith.shards.version_dir import MANIFEST, read_manifest
from booksmith.shards.writer import commit

LLMC_MAGIC, LLMC_VERSION, LLMC_HEADER_INTS = 20240520, 1, 256
LLMC_HEADER_BYTES = LLMC_HEADER_INTS * 4
DEFAULT_SHARD_TOKENS = 100_000_000  # llm.c's FineWeb shards hold 100M tokens
SPANS_SCHEMA = pa.schema([("id", pa.string()), ("n_tokens", pa.int64())])


def _stream(version: Path, encoding: str, spans: pq.ParquetWriter) -> Iterator[np.ndarray]:
    """The version's token stream, document by document; each document's id and token count
    (end-of-text included) go to `spans` as they pass."""
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
        for batch in pq.ParquetFile(version / rel).iter_batches(columns=["id", "input_ids"]):
            ids = batch.column(1)
            lengths = pc.cast(pc.list_value_length(ids), pa.int64())
            spans.write_table(pa.table([batch.column(0), lengths], schema=SPANS_SCHEMA))
            yield ids.flatten().to_numpy().astype(np.uint16, copy=False)


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


def _write_files(
    tokens: Iterable[np.ndarray], out: Path, fmt: str, prefix: str, shard_tokens: int
) -> list[Path]:
    if fmt == "nanogpt":
        path = out / f"{prefix}.bin"
        _write(path, tokens, header_count=None)
        return [path]
    return _write_llmc(tokens, out, prefix, shard_tokens)


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
    spans = spans_path(version.resolve().parent, out)
    spans.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(spans)
    with pq.ParquetWriter(tmp, SPANS_SCHEMA) as writer:
        paths = _write_files(_stream(version, encoding, writer), out, fmt, prefix, shard_tokens)
    commit(tmp, spans)
    how = {"encoding": encoding, "format": fmt, "prefix": prefix, "shard_tokens": shard_tokens}
    record_bin(version, out, paths, **how)
    return paths


def _write_llmc(
    tokens: Iterable[np.ndarray], out: Path, prefix: str, shard_tokens: int
) -> list[Path]:
    """llm.c's shards of at most `shard_tokens` tokens each (at least one, maybe empty)."""
    paths: list[Path] = []
    pending: list[np.ndarray] = []
    held = 0
    for chunk in tokens:
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


def held_in_bin(out: Path, copy: Copy, ids: set[str]) -> int:
    """How many of these documents a bin output holds, by its recorded spans; an output
    recorded without them (written before they were kept) is an error saying so."""
    table = _spans(out, copy)
    wanted = pa.array(sorted(ids), pa.string())
    return int(pc.sum(pc.is_in(table.column("id"), value_set=wanted)).as_py() or 0)


def cut_from_bin(out: Path, copy: Copy, ids: set[str]) -> int:
    """Cut these documents' tokens out of a bin output whose version is gone (so it cannot be
    written again from it): the files are read against their recorded spans, written again
    without those documents, and the spans and the record follow. Returns documents cut."""
    table = _spans(out, copy)
    wanted = pa.array(sorted(ids), pa.string())
    keep = pc.invert(pc.is_in(table.column("id"), value_set=wanted)).to_numpy(zero_copy_only=False)
    if keep.all():
        return 0
    folder = Path(copy.place)
    old = [folder / name for name in copy.files]
    offset = 0 if copy.format == "nanogpt" else LLMC_HEADER_BYTES
    parts = [np.memmap(p, dtype="<u2", mode="r", offset=offset) for p in old]
    lengths = table.column("n_tokens").to_numpy()
    if sum(len(p) for p in parts) != int(lengths.sum()):
        raise ValueError(
            f"{folder}: its .bin files do not match the documents recorded for them "
            "(written again since by something else?); delete that copy"
        )
    # the old files stay readable through their maps while the new ones replace them
    kept_tokens = _kept_slices(parts, lengths, keep)
    paths = _write_files(kept_tokens, folder, copy.format or "llmc", copy.prefix or "train",
                         copy.shard_tokens or DEFAULT_SHARD_TOKENS)  # fmt: skip
    for stale in set(old) - set(paths):
        stale.unlink(missing_ok=True)  # fewer tokens can make fewer llm.c shards
    spans = spans_path(out, folder)
    tmp = tmp_name(spans)
    pq.write_table(table.filter(pa.array(keep)), tmp)
    commit(tmp, spans)
    update_copy(out, copy, files=sorted(p.name for p in paths))
    return int((~keep).sum())


def _spans(out: Path, copy: Copy) -> pa.Table:
    path = spans_path(out, Path(copy.place))
    if not path.is_file():
        raise ValueError(f"{copy.place}: its documents were not recorded when it was written "
                         "(before booksmith kept them), so it cannot be checked; delete that "
                         "copy or write it again from a version")  # fmt: skip
    return pq.read_table(path)


def _kept_slices(
    parts: Sequence[np.ndarray], lengths: np.ndarray, keep: np.ndarray
) -> Iterator[np.ndarray]:
    """The concatenated `parts` without the documents whose `keep` is False, in pieces."""
    ends = np.cumsum(lengths)
    starts = ends - lengths
    kept = np.flatnonzero(keep)
    if not len(kept):
        return
    # documents kept one after another are read as one range
    s, e = starts[kept], ends[kept]
    breaks = np.flatnonzero(s[1:] != e[:-1]) + 1
    firsts, lasts = np.r_[0, breaks], np.r_[breaks - 1, len(kept) - 1]
    bounds = np.cumsum([0] + [len(p) for p in parts])
    for start, end in zip(s[firsts].tolist(), e[lasts].tolist(), strict=True):
        part = int(np.searchsorted(bounds, start, side="right")) - 1
        while start < end:
            take = min(end, int(bounds[part + 1]))
            yield np.asarray(parts[part][start - bounds[part] : take - bounds[part]])
            start, part = take, part + 1
