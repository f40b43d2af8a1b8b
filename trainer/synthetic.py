"""A tiny token dataset for tests, benchmarks and demos, in the token-shard layout.

The "tokenizer" is bytes: token id = byte value, end-of-text = 0, vocabulary 256 (so the ids are
uint16 as a small encoding's would be). The text is templated textbook sentences, learnable
enough that a tiny model's loss falls within a few hundred steps.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from booksmith.schemas.manifest import MANIFEST, EncodingEntry, Manifest, ShardEntry

ENCODING, N_VOCAB, EOT = "bytes", 256, 0

_SUBJECTS = ["A triangle", "The cell", "An atom", "A river", "The market", "A poem", "The engine"]
_VERBS = ["has", "needs", "shows", "contains", "explains", "changes", "measures"]
_OBJECTS = ["three sides", "energy", "a nucleus", "a source", "prices", "rhythm", "heat", "water"]


def document(rng: random.Random) -> str:
    sentences = []
    for _ in range(rng.randint(2, 6)):
        s, v, o = rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS)
        sentences.append(f"{s} {v} {o}.")
    return " ".join(sentences)


def encode(text: str) -> list[int]:
    return [*text.encode("utf-8"), EOT]


def token_table(docs: list[str], prefix: str = "doc") -> pa.Table:
    ids = [f"{prefix}-{hashlib.sha1(d.encode()).hexdigest()[:12]}-{i}" for i, d in enumerate(docs)]
    tokens = [encode(d) for d in docs]
    return pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "input_ids": pa.array(tokens, pa.list_(pa.uint16())),
            "n_tokens": pa.array([len(t) for t in tokens], pa.int64()),
        }
    )


def write_token_dataset(
    root: Path,
    n_docs: int = 400,
    *,
    shards: int = 2,
    row_group_size: int = 50,
    seed: int = 0,
    encoding: str = ENCODING,
    manifest: bool = True,
) -> Path:
    """Write `root/tokens/<encoding>/part-NNNNN.parquet` (and manifest.json); returns root."""
    rng = random.Random(seed)
    docs = [document(rng) for _ in range(n_docs)]
    tdir = root / "tokens" / encoding
    tdir.mkdir(parents=True, exist_ok=True)
    entries: list[ShardEntry] = []
    per = -(-n_docs // shards)
    for s in range(shards):
        table = token_table(docs[s * per : (s + 1) * per], prefix=f"s{seed}")
        path = tdir / f"part-{s:05d}.parquet"
        pq.write_table(table, path, row_group_size=row_group_size)
        data = path.read_bytes()
        entries.append(
            ShardEntry(
                path=f"tokens/{encoding}/{path.name}",
                rows=table.num_rows,
                bytes=len(data),
                sha256=hashlib.sha256(data).hexdigest(),
                kind="tokens",
                encoding=encoding,
                stored_tokens=sum(len(t) for t in table.column("input_ids").to_pylist()),
            )
        )
    if manifest:
        total = sum(len(d.encode()) + 1 for d in docs)
        m = Manifest(
            run_id=root.name,
            primary_encoding=encoding,
            tokens={
                encoding: EncodingEntry(
                    n_vocab=N_VOCAB,
                    eot_token=EOT,
                    stored_tokens=total,
                    documents=len(docs),
                    tokens=total - len(docs),
                    dtype="uint16",
                    path=f"tokens/{encoding}",
                )
            },
            shards=entries,
        )
        (root / MANIFEST).write_text(m.to_json(), encoding="utf-8")
    return root
