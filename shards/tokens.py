"""Token shards: documents encoded with a tiktoken encoding, written as Parquet.

`tokens/<encoding>/part-NNNNN.parquet` has one row per document: `id`, `input_ids` (uint16 when
the vocabulary fits, else uint32) ending with the encoding's end-of-text token, and `n_tokens`
(the tokens of the text, end-of-text excluded, as in the text shards). Packed mode adds
`tokens/<encoding>-packed-<L>/`: fixed rows of L+1 tokens cut from the concatenated stream
across document boundaries (the layout Phi-1 and nanoGPT train on: x = row[:-1], y = row[1:]).

Encoding runs on a thread pool (tiktoken releases the GIL) straight into NumPy buffers, and
each batch's Parquet write runs on its own thread while the next batch encodes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import tiktoken

from booksmith.schemas.manifest import EncodingEntry, Packed, ShardEntry
from booksmith.shards.encodings import token_dtype
from booksmith.shards.writer import DEFAULT_SHARD_BYTES, ShardWriter

BATCH_DOCS = 2_000  # documents per encoded batch (and per row group)
CHUNK_DOCS = 16  # documents per thread-pool task: amortizes the pool's per-task cost


def tokens_dir(encoding: str) -> str:
    return f"tokens/{encoding}"


def packed_dir(encoding: str, seq_len: int) -> str:
    return f"tokens/{encoding}-packed-{seq_len}"


def arrow_token_type(enc: tiktoken.Encoding) -> pa.DataType:
    return pa.uint16() if token_dtype(enc) == np.uint16 else pa.uint32()


def token_schema(value_type: pa.DataType) -> pa.Schema:
    """Token-shard schema for uint16 or uint32 token ids."""
    return pa.schema(
        [
            pa.field("id", pa.string(), nullable=False),
            pa.field("input_ids", pa.list_(value_type), nullable=False),
            pa.field("n_tokens", pa.int64(), nullable=False),
        ]
    )


def packed_schema(value_type: pa.DataType, seq_len: int) -> pa.Schema:
    return pa.schema([pa.field("input_ids", pa.list_(value_type, seq_len + 1), nullable=False)])


def count_stored_tokens(table: pa.Table) -> dict[str, int]:
    """Tokens in a token-shard table (or a slice of one: `.values` would ignore the slice)."""
    return {"stored_tokens": int(pc.sum(pc.list_value_length(table["input_ids"])).as_py() or 0)}


def _encode(enc: tiktoken.Encoding, text: str) -> np.ndarray:
    try:
        return enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
    except UnicodeEncodeError:  # lone surrogates: the same repair tiktoken's encode() makes
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        return enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=())


def encode_texts(
    enc: tiktoken.Encoding, texts: list[str], num_threads: int = 2
) -> list[np.ndarray]:
    """Each text's tokens (special-token strings as text), as the token shards hold them
    before end-of-text, encoded on threads."""
    chunks = [texts[i : i + CHUNK_DOCS] for i in range(0, len(texts), CHUNK_DOCS)]
    with ThreadPoolExecutor(num_threads, thread_name_prefix="encode") as pool:
        parts = list(pool.map(lambda c: [_encode(enc, t) for t in c], chunks))
    return [a for part in parts for a in part]


def _encode_chunk(
    enc: tiktoken.Encoding, texts: list[str], dtype: np.dtype[Any]
) -> tuple[np.ndarray, np.ndarray]:
    """(the texts' tokens, each followed by end-of-text, as one array; each text's count)."""
    arrays = [_encode(enc, t) for t in texts]
    counts = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
    out = np.empty(int(counts.sum()) + len(arrays), dtype=dtype)
    pos = 0
    for a in arrays:
        out[pos : pos + len(a)] = a
        out[pos + len(a)] = enc.eot_token
        pos += len(a) + 1
    return out, counts


def encode_batch(
    enc: tiktoken.Encoding, ids: list[str], texts: list[str], pool: ThreadPoolExecutor
) -> pa.Table:
    """One token-shard table for a batch of documents, encoded on `pool`."""
    dtype = token_dtype(enc)
    chunks = [texts[i : i + CHUNK_DOCS] for i in range(0, len(texts), CHUNK_DOCS)]
    parts = list(pool.map(lambda c: _encode_chunk(enc, c, dtype), chunks))
    values = np.concatenate([p[0] for p in parts]) if parts else np.empty(0, dtype)
    counts = np.concatenate([p[1] for p in parts]) if parts else np.empty(0, np.int64)
    offsets = np.zeros(len(counts) + 1, dtype=np.int32)  # a batch holds far fewer than 2**31
    np.cumsum(counts + 1, out=offsets[1:])
    return pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "input_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values)),
            "n_tokens": pa.array(counts, pa.int64()),
        }
    )


class Packer:
    """Cuts the token stream into rows of seq_len+1 tokens, carrying the remainder over."""

    def __init__(self, writer: ShardWriter, enc: tiktoken.Encoding, seq_len: int) -> None:
        self.writer, self.width, self.dtype = writer, seq_len + 1, token_dtype(enc)
        self.carry = np.empty(0, self.dtype)
        self.rows = 0

    def feed(self, table: pa.Table) -> None:
        flat = table.column("input_ids").combine_chunks().flatten().to_numpy()
        stream = np.concatenate([self.carry, flat.astype(self.dtype, copy=False)])
        n_rows = len(stream) // self.width
        self.carry = stream[n_rows * self.width :].copy()
        if n_rows:
            rows = pa.FixedSizeListArray.from_arrays(
                pa.array(stream[: n_rows * self.width]), self.width
            )
            self.writer.write(pa.table({"input_ids": rows}))
            self.rows += n_rows

    @property
    def dropped(self) -> int:
        """Tokens of the final partial row (not written)."""
        return len(self.carry)


@dataclass
class TokenResult:
    encoding: str
    shards: list[ShardEntry]
    documents: int = 0
    text_tokens: int = 0  # end-of-text excluded
    packed: Packed | None = None
    packed_shards: list[ShardEntry] = field(default_factory=list)

    def manifest_entry(self, enc: tiktoken.Encoding) -> EncodingEntry:
        return EncodingEntry(
            documents=self.documents,
            tokens=self.text_tokens,
            stored_tokens=self.text_tokens + self.documents,
            n_vocab=enc.n_vocab,
            eot_token=enc.eot_token,
            dtype=str(token_dtype(enc)),
            path=tokens_dir(self.encoding),
            packed=self.packed,
        )


def _batches(items: Iterable[tuple[str, str]], size: int) -> Iterator[list[tuple[str, str]]]:
    it = iter(items)
    while batch := list(islice(it, size)):
        yield batch


class TokenShardWriter:
    """Token shards (and packed rows, if asked) of one encoding, written as tables of
    `encode_batch`'s shape arrive: from texts (`write_token_shards`) or from ids a run already
    has (`with_end_of_text`), so no text need be encoded twice."""

    def __init__(
        self,
        enc: tiktoken.Encoding,
        *,
        root: Path,
        shard_rows: int | None = None,
        shard_bytes: int | None = DEFAULT_SHARD_BYTES,
        batch_docs: int = BATCH_DOCS,
        pack_seq_len: int | None = None,
    ) -> None:
        self.enc, self.pack_seq_len = enc, pack_seq_len
        self.writer = ShardWriter(
            root,
            tokens_dir(enc.name),
            token_schema(arrow_token_type(enc)),
            kind="tokens",
            max_rows=shard_rows,
            max_bytes=shard_bytes,
            row_group_rows=batch_docs,
            extra={"encoding": enc.name},
            count=count_stored_tokens,
        )
        self.packer: Packer | None = None
        if pack_seq_len is not None:
            packed_writer = ShardWriter(
                root,
                packed_dir(enc.name, pack_seq_len),
                packed_schema(arrow_token_type(enc), pack_seq_len),
                kind="packed",
                max_bytes=shard_bytes,
                row_group_rows=max(1, (1 << 20) // (pack_seq_len + 1)),  # about 1M tokens a group
                extra={"encoding": enc.name},
                count=lambda t: {"stored_tokens": t.num_rows * (pack_seq_len + 1)},
            )
            self.packer = Packer(packed_writer, enc, pack_seq_len)
        self.result = TokenResult(encoding=enc.name, shards=[])

    def add(self, table: pa.Table) -> None:
        """Rows of `encode_batch`'s shape: id, input_ids (end-of-text last), n_tokens."""
        self.result.documents += table.num_rows
        self.result.text_tokens += int(pc.sum(table.column("n_tokens")).as_py() or 0)
        self.writer.write(table)
        if self.packer is not None:
            self.packer.feed(table)

    def close(self) -> TokenResult:
        self.result.shards = self.writer.close()
        if self.packer is not None:
            self.result.packed_shards = self.packer.writer.close()
            self.result.packed = Packed(
                seq_len=self.pack_seq_len or 0,
                rows=self.packer.rows,
                dropped_tokens=self.packer.dropped,
                path=packed_dir(self.enc.name, self.pack_seq_len or 0),
            )
        return self.result

    def abort(self) -> None:
        self.writer.abort()
        if self.packer is not None:
            self.packer.writer.abort()

    def discard(self, root: Path) -> None:
        """Abort, and delete the shards already finished (a glob must not find them)."""
        self.abort()
        writers = [self.writer, *([self.packer.writer] if self.packer else [])]
        for entry in (e for w in writers for e in w.shards):
            (root / entry.path).unlink(missing_ok=True)


def with_end_of_text(enc: tiktoken.Encoding, ids: pa.Array, tokens: pa.Array) -> pa.Table:
    """`encode_batch`'s table from ids already encoded (a list per document, end-of-text not
    yet appended), so a run that counted its documents' tokens stores those very ids."""
    tokens = tokens.cast(pa.list_(arrow_token_type(enc)))
    offsets = tokens.offsets.to_numpy().astype(np.int64) - tokens.offsets[0].as_py()
    values = tokens.flatten().to_numpy()
    counts = np.diff(offsets)
    with_eot = np.insert(values, offsets[1:], enc.eot_token).astype(token_dtype(enc))
    new_offsets = (offsets + np.arange(len(offsets))).astype(np.int32)
    return pa.table(
        {
            "id": ids,
            "input_ids": pa.ListArray.from_arrays(pa.array(new_offsets), pa.array(with_eot)),
            "n_tokens": pa.array(counts, pa.int64()),
        }
    )


def write_token_shards(
    items: Iterable[tuple[str, str]],
    enc: tiktoken.Encoding,
    *,
    root: Path,
    shard_rows: int | None = None,
    shard_bytes: int | None = DEFAULT_SHARD_BYTES,
    num_threads: int | None = None,
    batch_docs: int = BATCH_DOCS,
    pack_seq_len: int | None = None,
) -> TokenResult:
    """Encode (id, text) pairs into `root/tokens/<encoding>/` (and packed rows if asked)."""
    num_threads = num_threads or os.cpu_count() or 1
    out = TokenShardWriter(
        enc, root=root, shard_rows=shard_rows, shard_bytes=shard_bytes, batch_docs=batch_docs,
        pack_seq_len=pack_seq_len,
    )  # fmt: skip
    try:
        with (
            ThreadPoolExecutor(num_threads, thread_name_prefix="encode") as pool,
            ThreadPoolExecutor(1, thread_name_prefix="write") as write_pool,
        ):
            pending: Future[None] | None = None
            for batch in _batches(items, batch_docs):
                ids = [i for i, _ in batch]
                table = encode_batch(enc, ids, [t for _, t in batch], pool)
                if pending is not None:
                    pending.result()  # one batch in flight: memory stays bounded
                pending = write_pool.submit(out.add, table)
            if pending is not None:
                pending.result()
        return out.close()
    except BaseException:
        out.abort()
        raise
