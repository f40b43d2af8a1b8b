"""Dataset versions: text/token/rejected shards, manifest, card, crash safety, verify, read-back
with pyarrow, DuckDB, polars and Hugging Face `datasets`."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from booksmith.flows.cli_shards import app
from booksmith.schemas import SCHEMA_VERSION, Document, Rejected
from booksmith.schemas.manifest import Counts, Manifest
from booksmith.schemas.records import sha256_hex
from booksmith.shards import dataset as dataset_mod
from booksmith.shards.card import size_category
from booksmith.shards.dataset import InMemoryVersion, ShardLayout, write_version
from booksmith.shards.encodings import get_encoding
from booksmith.shards.files import file_sha256
from booksmith.shards.verify import verify
from booksmith.shards.version_dir import list_versions, read_manifest

VOCABULARY = (
    "the photosynthesis chloroplast energy light water carbon algebra equation variable "
    "function derivative integral history empire trade river mountain 42 1999 3.14 café "
    "naïve 東京 😀 def return print(x) {a: b}"
)
WORDS = VOCABULARY.split()


def make_docs(n: int, *, run_id: str = "r1", seed: int = 0, prefix: str = "doc") -> list[Document]:
    rng = random.Random(seed)
    enc = get_encoding()
    docs = []
    for i in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 120)))
        if i % 7 == 0:
            text += "\n\n<|endoftext|> is text here, not a special token.  \n"
        docs.append(
            Document(
                id=f"{prefix}{i:05d}",
                text_sha256=sha256_hex(text),
                text=text,
                topic=f"topic {i % 5}",
                topic_path=["science", f"topic {i % 5}"],
                audience="students",
                style="textbook",
                format="chapter",
                seed_words=["light"],
                prompt="Write a chapter.",
                model="fake-model",
                backend="openai",
                sampling="{}",
                seed=i,
                sample_index=0,
                finish_reason="stop",
                truncated=False,
                n_tokens=len(enc.encode_ordinary(text)),
                lang="en",
                lang_score=0.99,
                run_id=run_id,
                created_at=datetime(2026, 11, 26, tzinfo=UTC),
            )
        )
    return docs


def make_rejected(docs: list[Document]) -> list[Rejected]:
    return [Rejected(**d.model_dump(), reason="dedup_exact", duplicate_of=docs[0].id) for d in docs]


def make_version(
    root: Path,
    n: int = 60,
    *,
    run_id: str | None = None,
    encodings: Sequence[str] = (),
    shard_rows: int | None = 25,
    **layout: Any,
) -> Manifest:
    run_id = run_id or root.name
    docs = make_docs(n, run_id=run_id, prefix=f"{run_id}-")
    rejected = make_rejected(make_docs(5, run_id=run_id, seed=1, prefix=f"{run_id}-rej-"))
    counts = {"filter": {"dedup": {"dedup_exact": 5}}, "kept": n, "rejected": 5}
    version = InMemoryVersion(
        run_id, docs, rejected, encodings=encodings, config={"seed": 1}, config_hash="abc123",
        counts=Counts.model_validate(counts),
    )  # fmt: skip
    return write_version(root, version, ShardLayout(shard_rows=shard_rows, **layout))


@pytest.fixture
def version(tmp_path: Path) -> Path:
    root = tmp_path / "out" / "20261126T000000Z"
    make_version(root, encodings=["smollm2"], pack_seq_len=32)
    return root


def test_version_layout_manifest_and_counts(version: Path) -> None:
    m = read_manifest(version)
    raw = json.loads((version / "manifest.json").read_text())
    for key in ("run_id", "counts", "shards", "tokens", "diversity", "config_hash", "code_version"):
        assert key in raw
    assert raw["manifest_version"] == 2
    assert m.schema_version == SCHEMA_VERSION and m.documents == 60
    kinds = {s.kind for s in m.shards}
    assert kinds == {"text", "tokens", "packed", "rejected", "plan", "failures"}
    # 60 documents at 25 rows a shard: 3 text shards, 3 token shards per encoding
    assert [s.rows for s in m.shards if s.kind == "text"] == [25, 25, 10]
    for s in m.shards:
        path = version / s.path
        assert not Path(s.path).is_absolute()
        assert path.stat().st_size == s.bytes and file_sha256(path) == s.sha256
        assert pq.ParquetFile(path).metadata.num_rows == s.rows
    text = pq.read_table(version / "text")
    for name in ("cl100k_base", "smollm2"):
        entry = m.tokens[name]
        tokens = pq.read_table(version / "tokens" / name)
        assert tokens.num_rows == entry.documents == 60
        assert sum(tokens.column("n_tokens").to_pylist()) == entry.tokens
        assert entry.stored_tokens == entry.tokens + 60
        shard_tokens = [s.stored_tokens for s in m.shards if s.encoding == name]
        assert sum(shard_tokens[:3]) == entry.stored_tokens
    assert m.tokens["cl100k_base"].tokens == sum(text.column("n_tokens").to_pylist())
    assert m.tokens["smollm2"].dtype == "uint16"
    assert m.tokens["cl100k_base"].dtype == "uint32"
    # no temporary files are left behind
    assert not [p for p in version.rglob(".*")]


def test_token_shards_round_trip_and_end_of_text(version: Path) -> None:
    text = {r["id"]: r["text"] for r in pq.read_table(version / "text").to_pylist()}
    for name, width in (("cl100k_base", "uint32"), ("smollm2", "uint16")):
        enc = get_encoding(name)
        table = pq.read_table(version / "tokens" / name)
        assert str(table.schema.field("input_ids").type.value_type) == width
        for row in table.to_pylist():
            ids = row["input_ids"]
            assert ids[-1] == enc.eot_token and enc.eot_token not in ids[:-1]
            assert enc.decode(ids[:-1]) == text[row["id"]]
            assert row["n_tokens"] == len(ids) - 1


def test_packed_rows_cut_the_stream(version: Path) -> None:
    m = read_manifest(version)
    for name in ("cl100k_base", "smollm2"):
        packed = m.tokens[name].packed
        assert packed is not None
        rows = pq.read_table(version / packed.path).column("input_ids").to_pylist()
        assert len(rows) == packed.rows and all(len(r) == 33 for r in rows)
        docs = pq.read_table(version / "tokens" / name)["input_ids"].to_pylist()
        stream = [t for r in docs for t in r]
        flat = [t for r in rows for t in r]
        assert flat == stream[: len(flat)]
        assert len(stream) - len(flat) == packed.dropped_tokens < 33


def test_text_shards_roll_over_by_bytes(tmp_path: Path) -> None:
    root = tmp_path / "v"
    m = make_version(root, 1500, shard_rows=None, shard_bytes=100_000, run_id="v")
    text = [s for s in m.shards if s.kind == "text"]
    assert len(text) > 2 and sum(s.rows for s in text) == 1500
    # a shard closes once it reaches the limit, overshooting by at most a row group + footer
    assert all(s.bytes < 2 * 100_000 for s in text)
    assert pq.read_table(root / "text").column("id").to_pylist() == [
        f"v-{i:05d}" for i in range(1500)
    ]


def test_card_front_matter(version: Path) -> None:
    card = (version / "README.md").read_text()
    assert card.startswith("---\n")
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["license"] and meta["language"] == ["en"]
    assert meta["size_categories"] == ["n<1K"]
    configs = {c["config_name"]: c["data_files"][0]["path"] for c in meta["configs"]}
    assert configs["default"] == "text/*.parquet"
    assert configs["tokens-smollm2"] == "tokens/smollm2/*.parquet"
    assert configs["packed-cl100k_base-32"] == "tokens/cl100k_base-packed-32/*.parquet"
    for pattern in configs.values():
        assert list(version.glob(pattern)), pattern
    assert size_category(999) == "n<1K" and size_category(1000) == "1K<n<10K"


def test_read_back_duckdb_polars_datasets(version: Path, tmp_path: Path, monkeypatch) -> None:
    import duckdb
    import polars as pl

    con = duckdb.connect()
    n, topics = con.execute(
        f"SELECT count(*), count(DISTINCT topic) FROM read_parquet('{version}/text/*.parquet')"
    ).fetchone()  # type: ignore[misc]
    assert (n, topics) == (60, 5)
    (tokens,) = con.execute(
        f"SELECT sum(len(input_ids)) FROM read_parquet('{version}/tokens/smollm2/*.parquet')"
    ).fetchone()  # type: ignore[misc]
    assert tokens == read_manifest(version).tokens["smollm2"].stored_tokens

    frame = pl.read_parquet(version / "tokens" / "smollm2" / "*.parquet")
    assert frame.height == 60 and frame.schema["input_ids"] == pl.List(pl.UInt16)
    packed = pl.read_parquet(version / "tokens" / "smollm2-packed-32" / "*.parquet")
    assert packed["input_ids"].dtype == pl.Array(pl.UInt16, 33)

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    from datasets import load_dataset

    ds = load_dataset(
        "parquet",
        data_files=str(version / "text" / "*.parquet"),
        split="train",
        cache_dir=str(tmp_path / "hf"),
    )
    assert ds.num_rows == 60 and "text_sha256" in ds.column_names
    tok = load_dataset(
        "parquet",
        data_files=str(version / "tokens" / "cl100k_base" / "*.parquet"),
        split="train",
        cache_dir=str(tmp_path / "hf"),
    )
    enc = get_encoding()
    assert enc.decode(tok[0]["input_ids"][:-1]) == ds[0]["text"]
    # the card's configs, as the Hub would read them from README.md
    packed_rows = read_manifest(version).tokens["smollm2"].packed.rows
    for config, rows in (
        ("tokens-smollm2", 60),
        ("packed-smollm2-32", packed_rows),
        ("rejected", 5),
    ):
        loaded = load_dataset(str(version), config, split="train", cache_dir=str(tmp_path / "hf"))
        assert loaded.num_rows == rows, config


def test_crash_before_manifest_leaves_no_version(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "out"

    def crash(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt("killed while writing token shards")

    monkeypatch.setattr(dataset_mod, "write_token_shards", crash)
    with pytest.raises(KeyboardInterrupt):
        make_version(out / "run1")
    assert list_versions(out) == []
    assert verify(out / "run1").problems[0].startswith("manifest.json: missing")
    monkeypatch.undo()
    make_version(out / "run1")  # the rerun writes over the leftovers
    assert list_versions(out) == [out / "run1"] and verify(out / "run1").ok


def test_verify_ok_and_cli(version: Path) -> None:
    report = verify(version, sample=100)
    assert report.ok, report.problems
    assert report.round_trips == 120  # every document, both encodings
    result = CliRunner().invoke(app, ["verify", str(version)])
    assert result.exit_code == 0 and "ok:" in result.stdout


def test_verify_names_a_corrupted_shard(version: Path) -> None:
    shard = version / "tokens" / "smollm2" / "part-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    report = verify(version)
    assert not report.ok
    assert any(p.startswith("tokens/smollm2/part-00001.parquet: sha256") for p in report.problems)
    result = CliRunner().invoke(app, ["verify", str(version)])
    assert result.exit_code == 1
    assert "tokens/smollm2/part-00001.parquet" in result.stderr


def test_verify_truncated_shard_and_missing_manifest(version: Path) -> None:
    shard = version / "text" / "part-00002.parquet"
    shard.write_bytes(shard.read_bytes()[:-100])
    problems = verify(version).problems
    assert any(p.startswith("text/part-00002.parquet:") and "truncated" in p for p in problems)
    assert any("not a readable Parquet file" in p for p in problems)
    (version / "manifest.json").unlink()
    result = CliRunner().invoke(app, ["verify", str(version)])
    assert result.exit_code == 1 and "manifest.json: missing" in result.stderr


def test_verify_catches_tokens_that_do_not_match_the_text(tmp_path: Path) -> None:
    root = tmp_path / "v"
    make_version(root, 10, run_id="v")
    m = read_manifest(root)
    # swap two documents' token rows, then fix up the checksums so only the round trip can tell
    path = root / "tokens" / "cl100k_base" / "part-00000.parquet"
    table = pq.read_table(path)
    rows = table.to_pylist()
    rows[0]["input_ids"], rows[1]["input_ids"] = rows[1]["input_ids"], rows[0]["input_ids"]
    pq.write_table(table.from_pylist(rows, schema=table.schema), path)
    m.shards = [
        s.model_copy(update={"sha256": file_sha256(path), "bytes": path.stat().st_size})
        if s.path == "tokens/cl100k_base/part-00000.parquet"
        else s
        for s in m.shards
    ]
    (root / "manifest.json").write_text(m.to_json())
    problems = verify(root, sample=10).problems
    assert any("decode(input_ids) != text" in p for p in problems), problems


def test_add_encoding_to_an_existing_version(tmp_path: Path) -> None:
    root = tmp_path / "v"
    make_version(root, 30, run_id="v")
    assert "smollm2" not in read_manifest(root).tokens
    result = CliRunner().invoke(
        app, ["datasets", "tokenize", str(root), "--encoding", "smollm2", "--pack", "16"]
    )
    assert result.exit_code == 0, result.output
    m = read_manifest(root)
    assert m.tokens["smollm2"].documents == 30
    assert m.tokens["smollm2"].packed.seq_len == 16
    assert "tokens-smollm2" in (root / "README.md").read_text()
    assert verify(root).ok
    again = CliRunner().invoke(app, ["datasets", "tokenize", str(root), "--encoding", "smollm2"])
    assert again.exit_code == 2 and "already in this version" in again.stderr
    missing = CliRunner().invoke(
        app, ["datasets", "tokenize", str(root), "--encoding", "o200k_base"]
    )
    assert missing.exit_code == 2 and "not available offline" in missing.stderr


def test_stray_shard_fails_verify_and_rewrite_is_refused(version: Path) -> None:
    stray = version / "text" / "part-00099.parquet"
    stray.write_bytes((version / "text" / "part-00000.parquet").read_bytes())
    problems = verify(version).problems
    assert problems == [
        "text/part-00099.parquet: not in the manifest, yet readers that glob the shards "
        "would read it"
    ]
    with pytest.raises(FileExistsError, match="already a dataset version"):
        make_version(version)


def test_rerun_after_a_crash_clears_leftover_shards(tmp_path: Path) -> None:
    root = tmp_path / "v"
    (root / "text").mkdir(parents=True)
    (root / "text" / "part-00007.parquet").write_bytes(b"left by a dead attempt")
    (root / ".README.md.tmp-1").write_bytes(b"")
    make_version(root, 10, run_id="v")
    assert verify(root).ok
    assert not (root / "text" / "part-00007.parquet").exists()


def test_verify_checks_packed_rows_against_the_token_stream(version: Path) -> None:
    m = read_manifest(version)
    rel = "tokens/smollm2-packed-32/part-00000.parquet"
    table = pq.read_table(version / rel)
    rows = table.to_pylist()
    rows[0]["input_ids"] = list(reversed(rows[0]["input_ids"]))
    pq.write_table(table.from_pylist(rows, schema=table.schema), version / rel)
    fixed = {"sha256": file_sha256(version / rel), "bytes": (version / rel).stat().st_size}
    m.shards = [s.model_copy(update=fixed) if s.path == rel else s for s in m.shards]
    (version / "manifest.json").write_text(m.to_json())
    assert verify(version).problems == [f"{rel}: row 0 is not the start of the token stream"]


def test_a_version_with_bytes_smollm2_lacks_writes_and_verifies(tmp_path: Path) -> None:
    """Documents with bytes SmolLM2's vocabulary has no token for (control characters, U+40000-
    U+BFFFF) are written like any other, and verify's round trip accepts their tokens: the text
    less those bytes, as the encoding drops them."""
    root = tmp_path / "odd"
    odd = ["end of\x04transmission", "a\x1dgroup\x16sep", "plane four \U00040000 and \U000bffff"]
    enc = get_encoding()
    docs = []
    for i, d in enumerate(make_docs(12, run_id="odd", prefix="odd-")):
        text = d.text + odd[i % 3]
        update = {"text": text, "text_sha256": sha256_hex(text)}
        docs.append(d.model_copy(update={**update, "n_tokens": len(enc.encode_ordinary(text))}))
    version = InMemoryVersion(
        "odd", docs, [], encodings=["smollm2"], config={"seed": 1}, config_hash="abc",
        counts=Counts.model_validate({"kept": 12}),
    )  # fmt: skip
    write_version(root, version, ShardLayout(shard_rows=5))
    assert read_manifest(root).tokens["smollm2"].documents == 12
    report = verify(root, sample=100)
    assert report.ok, report.problems
    assert report.round_trips == 24
