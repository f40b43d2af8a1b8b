"""Text is tokenized once (issue 14, point 5): the tokens a run counts `n_tokens` with are the
ones its primary token shards store: they ride with each kept candidate through the chunk's
spill, and the final pass writes them instead of encoding the text again. A row that comes
without them (a chunk spilled by an older booksmith) sends the whole encoding back to the
text, leaving no shard of the abandoned attempt behind."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from booksmith.schemas import Document
from booksmith.schemas.arrow import to_table
from booksmith.shards import tokens as token_module
from booksmith.shards.dataset import VersionWriter
from booksmith.shards.encodings import get_encoding
from booksmith.shards.tokens import encode_texts
from booksmith.shards.verify import verify
from booksmith.shards.version_dir import read_manifest
from tests.conftest import fake_backend_config
from tests.fakeserver import FakeServer
from tests.test_shards_dataset import make_docs


def encoded_by(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The encodings `encode_batch` (the text -> token-shard path) is called with."""
    calls: list[str] = []
    real = token_module.encode_batch

    def spy(enc: Any, *args: Any) -> pa.Table:
        calls.append(enc.name)
        return real(enc, *args)

    monkeypatch.setattr(token_module, "encode_batch", spy)
    return calls


def stored(version: Path, encoding: str) -> list[list[int]]:
    return pq.read_table(version / "tokens" / encoding).column("input_ids").to_pylist()


@pytest.mark.slow
def test_a_run_stores_the_tokens_it_counted(
    prefect_api: str, tmp_path: Path, write_config, monkeypatch: pytest.MonkeyPatch
) -> None:
    from booksmith.flows.nightly import nightly

    calls = encoded_by(monkeypatch)
    with FakeServer() as server:
        cfg = fake_backend_config(server.base_url, tmp_path / "out")
        cfg["output"]["encodings"] = ["smollm2"]
        cfg["output"]["pack_seq_len"] = 64
        version = Path(nightly(config=str(write_config(cfg))))
    assert calls and set(calls) == {"smollm2"}  # the primary encoding: never again
    texts = pq.read_table(version / "text").to_pylist()
    enc = get_encoding("cl100k_base")
    want = [[*a.tolist(), enc.eot_token] for a in encode_texts(enc, [r["text"] for r in texts])]
    assert stored(version, "cl100k_base") == want
    assert [len(ids) - 1 for ids in want] == [r["n_tokens"] for r in texts]
    m = read_manifest(version)
    assert m.tokens["cl100k_base"].packed is not None and m.tokens["cl100k_base"].packed.rows
    assert verify(version).ok


def test_rows_without_their_tokens_are_encoded_and_nothing_is_left_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = make_docs(30, prefix="d-")
    enc = get_encoding("cl100k_base")
    table = to_table(docs, Document)
    ids = pa.array(encode_texts(enc, [d.text for d in docs]), pa.list_(pa.uint32()))
    with_ids = table.append_column("input_ids", ids)

    def write(root: Path, tables: list[pa.Table], asked: str = "cl100k_base") -> list[list[int]]:
        writer = VersionWriter(root, shard_rows=4, encoded="cl100k_base", pack_seq_len=16)
        for t in tables:
            writer.add_kept(t)
        writer.write_tokens(asked, (), 16)
        on_disk = {str(p.relative_to(root)) for p in (root / "tokens").rglob("*.parquet")}
        assert on_disk == {s.path for s in writer.shards if s.kind in ("tokens", "packed")}
        return stored(root, asked)

    calls = encoded_by(monkeypatch)
    given = write(tmp_path / "given", [with_ids.slice(0, 20), with_ids.slice(20)])
    assert calls == []
    # the second table came without: everything is encoded from the text, the 5 shards
    # written from the first table's ids are gone
    mixed = write(tmp_path / "mixed", [with_ids.slice(0, 20), table.slice(20)])
    assert calls == ["cl100k_base"]
    assert given == mixed == [[*a.as_py(), enc.eot_token] for a in ids]
    holes = table.slice(20).append_column("input_ids", pa.nulls(10, pa.list_(pa.uint32())))
    assert write(tmp_path / "holes", [with_ids.slice(0, 20), holes]) == given
    assert calls == ["cl100k_base"] * 2
    # ids of another encoding than the one asked for: their shards are gone too
    write(tmp_path / "other", [with_ids], asked="smollm2")
    assert not list((tmp_path / "other" / "tokens" / "cl100k_base").glob("*"))
