"""Streaming token shards: Parquet files of `id`, `input_ids` (list<uint16|uint32>), `n_tokens`.

`open_source` finds the shards (a dataset version, a directory, a glob or one file; local or on
an object store through pyarrow filesystems) and checks them against the vocabulary.
`TokenWindows` streams them as packed windows of seq_len + 1 tokens (documents end with the
end-of-text token, so windows cross document boundaries as Phi-1 and nanoGPT train):

- the unit of work is a row group (split further when there are fewer row groups than streams);
  each epoch shuffles the units with a seeded permutation and deals them round-robin to the
  `world_size x num_workers` streams, so every unit is read by exactly one stream;
- a stream reads `shuffle_block` units at a time, packs them behind the tokens left over from the
  previous block, and yields that block's windows in a seeded random order;
- a stream's position is tiny: (epoch, block, leftover tokens at the block's start, windows
  yielded), attached to every window. The training loop keeps the newest position per stream in
  its checkpoint and a resumed loader re-reads that block and skips what was yielded: an exact
  resume, with or without DataLoader workers.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info

from booksmith.schemas.manifest import MANIFEST, Manifest, ManifestError
from booksmith.shards.fs import filesystem as fsspec_filesystem
from booksmith.shards.fs import is_url

# Known encodings: (n_vocab, end-of-text id); the manifest's own figures win.
KNOWN_ENCODINGS: dict[str, tuple[int, int]] = {
    "cl100k_base": (100277, 100257),
    "smollm2": (49152, 0),
    "gpt2": (50257, 50256),
    "r50k_base": (50257, 50256),
    "o200k_base": (200019, 199999),
}


class DataError(ValueError):
    """Token shards that cannot be trained on; the message names the shard or dataset."""


@dataclass
class TokenSource:
    files: list[str]  # paths inside `fs`
    fs: pafs.FileSystem
    uri: str  # what the user gave
    encoding: str | None
    n_vocab: int
    eot_token: int | None
    root: str | None = None  # the dataset version's root when `uri` is one (local path)
    units: list[tuple[int, int, int, int]] = field(default_factory=list)  # file, rg, lo, hi
    tokens: int = 0  # stored tokens (end-of-text included), from the Parquet metadata
    kind: str = "token shards"  # what `uri` is: a dataset version, tokenized records, ...

    @property
    def n_rows(self) -> int:
        return sum(hi - lo for _, _, lo, hi in self.units)


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it, over booksmith's one filesystem layer
    (shards/fs.py, fsspec): a URL reaches the same store with the same environment
    (AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, AWS_PROFILE, ...) as export and verify. Local paths
    use pyarrow's own filesystem, the fastest reader of a local file."""
    if not is_url(uri):
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    fs, path = fsspec_filesystem(uri)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def _list(fs: pafs.FileSystem, base: str, pattern: str = "*.parquet") -> list[str]:
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    full = pattern if pattern.startswith(base) else f"{base}/{pattern}"
    return sorted(i.path for i in infos if i.is_file and fnmatch.fnmatch(i.path, full))


def _read_manifest(fs: pafs.FileSystem, root: str) -> Manifest:
    path = f"{root}/{MANIFEST}"
    with fs.open_input_stream(path) as f:
        try:
            return Manifest.parse(f.read(), path)
        except ManifestError as e:
            raise DataError(str(e)) from None


def open_source(uri: str, encoding: str | None = None) -> TokenSource:
    """Find the token shards behind `uri` and check them; raises DataError with the reason."""
    fs, path = filesystem(uri)
    n_vocab: int | None = None
    eot: int | None = None
    root: str | None = None
    if any(c in path for c in "*?["):
        base = path[: min(path.find(c) for c in "*?[" if c in path)].rsplit("/", 1)[0]
        files = _list(fs, base, path)
    else:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise DataError(f"{uri}: no such dataset, directory or file")
        if info.type == pafs.FileType.File:
            files = [path]
        elif fs.get_file_info(f"{path}/{MANIFEST}").is_file:
            root = path
            manifest = _read_manifest(fs, path)
            tokens = manifest.tokens
            by_vocab = sorted(tokens, key=lambda k: (tokens[k].n_vocab, k))
            encoding = _choose_encoding(uri, by_vocab, encoding)
            n_vocab, eot = tokens[encoding].n_vocab, tokens[encoding].eot_token
            files = [f"{path}/{p}" for p in manifest.shard_paths("tokens", encoding)]
        elif fs.get_file_info(f"{path}/tokens").type == pafs.FileType.Directory:
            found = fs.get_file_info(pafs.FileSelector(f"{path}/tokens"))
            names = sorted(
                i.base_name
                for i in found
                if i.type == pafs.FileType.Directory and "-packed-" not in i.base_name
            )
            encoding = _choose_encoding(uri, names, encoding)
            files = _list(fs, f"{path}/tokens/{encoding}")
            n_vocab, eot = _tokens_info(fs, path, encoding)
        else:
            files = _list(fs, path)
    if not files:
        raise DataError(f"{uri}: no token shards (*.parquet) found")
    if encoding in KNOWN_ENCODINGS:  # bare shards: the figures of a known encoding
        n_vocab = n_vocab or KNOWN_ENCODINGS[encoding][0]
        eot = eot if eot is not None else KNOWN_ENCODINGS[encoding][1]
    local_root = root if root and "://" not in uri else None
    src = TokenSource(files, fs, uri, encoding, n_vocab or 0, eot, local_root)
    if root is not None:
        src.kind = "dataset version"
    elif n_vocab is not None:
        src.kind = "datasets tokenize output"
    _scan(src)
    return src


# `booksmith datasets tokenize INPUT --out DIR` writes DIR/tokens/<encoding>/ and DIR/tokens.json
# (the encodings' manifest entries: vocabulary, end-of-text, documents, tokens).
TOKENS_INFO = "tokens.json"


def _tokens_info(fs: pafs.FileSystem, path: str, encoding: str) -> tuple[int | None, int | None]:
    """(n_vocab, end-of-text id) from DIR/tokens.json when the directory has one."""
    info_path = f"{path}/{TOKENS_INFO}"
    if not fs.get_file_info(info_path).is_file:
        return None, None
    with fs.open_input_stream(info_path) as f:
        try:
            entry = json.loads(f.read())["tokens"][encoding]
            return int(entry["n_vocab"]), int(entry["eot_token"])
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{info_path}: no usable entry for {encoding!r} ({e})") from None


def _choose_encoding(uri: str, available: list[str], wanted: str | None) -> str:
    """`wanted`, or else the first of `available` (ordered by vocabulary size when known)."""
    if not available:
        raise DataError(f"{uri}: the dataset has no token shards (manifest lists no encodings)")
    if wanted is None:
        return available[0]  # the smallest vocabulary first: the cheapest head to train
    if wanted not in available:
        raise DataError(
            f"{uri}: token shards are for {available}, not {wanted!r} (data.encoding in the config)"
        )
    return wanted


def _scan(src: TokenSource) -> None:
    """Row groups of every shard, their schema, and token ids against the vocabulary (from the
    Parquet statistics, so no data is read)."""
    max_id = -1
    for i, f in enumerate(src.files):
        try:
            pf = pq.ParquetFile(src.fs.open_input_file(f))
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{f}: not a readable Parquet file: {e}") from None
        schema = pf.schema_arrow
        col = schema.field("input_ids") if "input_ids" in schema.names else None
        if (
            col is None
            or not pa.types.is_list(col.type)
            or not pa.types.is_integer(col.type.value_type)
        ):
            raise DataError(f"{f}: not a token shard (needs an `input_ids` list<uint> column)")
        paths = [pf.metadata.schema.column(j).path for j in range(pf.metadata.num_columns)]
        leaf = next((j for j, p in enumerate(paths) if p.startswith("input_ids.")), None)
        for rg in range(pf.metadata.num_row_groups):
            md = pf.metadata.row_group(rg)
            if md.num_rows:
                src.units.append((i, rg, 0, md.num_rows))
            if leaf is not None:
                src.tokens += md.column(leaf).num_values  # list elements: the tokens
                stats = md.column(leaf).statistics
                if stats is not None and stats.has_min_max:
                    max_id = max(max_id, int(stats.max))
                    if int(stats.min) < 0:
                        raise DataError(f"{f}: row group {rg}: negative token id {stats.min}")
    if not src.units:
        raise DataError(f"{src.uri}: the token shards are empty (no rows)")
    if src.n_vocab == 0:
        # bare shards without a manifest: the vocabulary is what the shards use
        src.n_vocab = max_id + 1
    elif max_id >= src.n_vocab:
        raise DataError(
            f"{src.uri}: token id {max_id} is outside the vocabulary of {src.n_vocab} "
            f"({src.encoding or 'unknown encoding'}); were the shards made with another encoding?"
        )


def doc_hash(doc_id: str) -> float:
    """A stable number in [0, 1) per document id: the held-out choice."""
    return int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "big") / 2**64


def read_units(
    src: TokenSource, units: list[tuple[int, int, int, int]], exclude: frozenset[str] = frozenset()
) -> np.ndarray:
    """Tokens of the given units, concatenated (int64), minus the excluded document ids."""
    parts = []
    for f, rg, lo, hi in units:
        cols = ["input_ids", "id"] if exclude else ["input_ids"]
        table = _parquet(src, f).read_row_group(rg, columns=cols).slice(lo, hi - lo)
        if exclude:
            keep = np.array([i not in exclude for i in table.column("id").to_pylist()], dtype=bool)
            table = table.filter(pa.array(keep))
        for chunk in table.column("input_ids").chunks:
            parts.append(chunk.flatten().to_numpy(zero_copy_only=False))
    if not parts:
        return np.zeros(0, dtype=np.int64)
    tokens = np.concatenate(parts).astype(np.int64, copy=False)
    if tokens.size and (tokens.max() >= src.n_vocab):
        shard = src.files[units[0][0]]
        raise DataError(
            f"{shard}: token id {tokens.max()} is outside the vocabulary ({src.n_vocab})"
        )
    return tokens


_OPEN: dict[tuple[int, int], tuple[TokenSource, pq.ParquetFile]] = {}


def _parquet(src: TokenSource, f: int) -> pq.ParquetFile:
    # One open file per shard per process (object stores pay a round trip per open). The entry
    # holds its source: an id is reused once its object is freed, and a later source at the
    # same address must not read the earlier one's files.
    key = (id(src), f)
    entry = _OPEN.get(key)
    if entry is None or entry[0] is not src:
        if len(_OPEN) > 64:
            _OPEN.clear()
        entry = _OPEN[key] = (src, pq.ParquetFile(src.fs.open_input_file(src.files[f])))
    return entry[1]


def split_units(
    units: list[tuple[int, int, int, int]], streams: int
) -> list[tuple[int, int, int, int]]:
    """Halve the largest unit until every stream can get one."""
    units = list(units)
    while len(units) < streams:
        i = max(range(len(units)), key=lambda j: units[j][3] - units[j][2])
        f, rg, lo, hi = units[i]
        if hi - lo < 2:
            raise DataError(
                f"{sum(u[3] - u[2] for u in units)} documents are too few for {streams} loader "
                "streams (ranks x workers); use fewer workers"
            )
        mid = (lo + hi) // 2
        units[i : i + 1] = [(f, rg, lo, mid), (f, rg, mid, hi)]
    return units


@dataclass
class StreamState:
    epoch: int = 0
    block: int = 0
    carry: list[int] = field(default_factory=list)  # tokens left over before this block
    emitted: int = 0  # windows of this block already yielded

    def to_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "block": self.block,
            "carry": self.carry,
            "emitted": self.emitted,
        }


class TokenWindows(IterableDataset):
    """Endless packed windows (seq_len + 1 tokens) with their stream's position.

    Yields (window int64 tensor, stream id, StreamState dict)."""

    def __init__(
        self,
        src: TokenSource,
        seq_len: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle_block: int = 8,
        exclude: frozenset[str] = frozenset(),
        states: dict[int, dict[str, Any]] | None = None,
        worker_offset: int = 0,
    ) -> None:
        self.src, self.seq_len, self.seed = src, seq_len, seed
        self.rank, self.world_size, self.shuffle_block = rank, world_size, shuffle_block
        self.exclude = exclude
        self.states = states or {}
        self.worker_offset = worker_offset  # which worker serves first after a resume

    def stream_units(
        self, stream: int, n_streams: int, epoch: int
    ) -> list[tuple[int, int, int, int]]:
        """The units one stream reads in one epoch: a seeded shuffle, dealt round-robin."""
        units = split_units(self.src.units, n_streams)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(units))
        return [units[i] for i in order[stream::n_streams]]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int, dict[str, Any]]]:
        info = get_worker_info()
        n_workers, wid = (info.num_workers, info.id) if info else (1, 0)
        stream = self.rank * n_workers + (wid + self.worker_offset) % n_workers
        n_streams = self.world_size * n_workers
        st = StreamState(**self.states[stream]) if stream in self.states else StreamState()
        T = self.seq_len
        carry = np.asarray(st.carry, dtype=np.int64)
        while True:
            mine = self.stream_units(stream, n_streams, st.epoch)
            blocks = [
                mine[i : i + self.shuffle_block] for i in range(0, len(mine), self.shuffle_block)
            ]
            read_any = st.block > 0
            for b in range(st.block, len(blocks)):
                tokens = np.concatenate([carry, read_units(self.src, blocks[b], self.exclude)])
                read_any = read_any or tokens.size > carry.size
                n = max(0, (tokens.size - 1) // T)
                perm = np.random.default_rng([self.seed, st.epoch, stream, b]).permutation(n)
                start_carry = carry.tolist()
                for j in range(st.emitted, n):
                    k = int(perm[j]) * T
                    state = {"epoch": st.epoch, "block": b, "carry": start_carry, "emitted": j + 1}
                    yield torch.from_numpy(tokens[k : k + T + 1].copy()), stream, state
                carry = tokens[n * T :]
                st.emitted = 0
            if not read_any:
                raise DataError(
                    f"{self.src.uri}: loader stream {stream} read no tokens in an epoch"
                )
            st.epoch, st.block = st.epoch + 1, 0


def collate(
    samples: list[tuple[torch.Tensor, int, dict[str, Any]]],
) -> tuple[torch.Tensor, int, dict[str, Any]]:
    """Stack windows; keep the position after the batch's last window (one stream per batch)."""
    return torch.stack([s[0] for s in samples]), samples[-1][1], samples[-1][2]


def eval_windows(tokens: np.ndarray, seq_len: int, max_windows: int) -> torch.Tensor:
    """Consecutive windows over the eval tokens, in order (the same for every run and rank)."""
    if tokens.size < 2:
        raise DataError("the eval set has fewer than 2 tokens; raise data.eval_fraction")
    T = min(seq_len, tokens.size - 1)
    n = min(max_windows, (tokens.size - 1) // T)
    idx = np.arange(n)[:, None] * T + np.arange(T + 1)[None, :]
    return torch.from_numpy(tokens[idx])


def held_out(src: TokenSource, fraction: float, max_docs: int) -> tuple[list[str], np.ndarray]:
    """The documents whose id hashes below `fraction` (at most `max_docs`, in shard order):
    their ids and their tokens concatenated. Stable across runs for the same shards. A corpus
    too small for any hash to fall below `fraction` gives up its lowest-hashing document."""
    ids: list[str] = []
    parts: list[np.ndarray] = []
    lowest: tuple[float, int, int, int, str] | None = None  # hash, file, row group, row, id
    n_docs = 0
    for f in range(len(src.files)):
        pf = _parquet(src, f)
        if "id" not in pf.schema_arrow.names:
            raise DataError(f"{src.files[f]}: token shard without an `id` column")
        for rg in range(pf.metadata.num_row_groups):
            doc_ids = pf.read_row_group(rg, columns=["id"]).column("id").to_pylist()
            hashes = [doc_hash(str(i)) for i in doc_ids]
            n_docs += len(doc_ids)
            for r, hv in enumerate(hashes):
                if lowest is None or hv < lowest[0]:
                    lowest = (hv, f, rg, r, str(doc_ids[r]))
            rows = [r for r, hv in enumerate(hashes) if hv < fraction]
            rows = rows[: max_docs - len(ids)]
            if rows:
                table = pf.read_row_group(rg, columns=["input_ids"]).take(pa.array(rows))
                parts.append(table.column("input_ids").combine_chunks().flatten().to_numpy())
                ids += [str(doc_ids[r]) for r in rows]
            if len(ids) >= max_docs:
                return ids, np.concatenate(parts).astype(np.int64)
    if not ids and lowest is not None and n_docs > 1 and fraction > 0:
        _, f, rg, r, doc_id = lowest
        table = _parquet(src, f).read_row_group(rg, columns=["input_ids"]).slice(r, 1)
        return [doc_id], table.column("input_ids").combine_chunks().flatten().to_numpy().astype(
            np.int64
        )
    tokens = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)
    return ids, tokens
