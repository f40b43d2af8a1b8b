"""The token-shard loader: finding shards, covering the data without overlap, exact resume,
and the bad inputs the issue names."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from itertools import islice
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

from booksmith.shards.version_dir import read_manifest
from booksmith.trainer.data import (
    DataError,
    TokenWindows,
    collate,
    filesystem,
    held_out,
    open_source,
    read_units,
    split_units,
)
from booksmith.trainer.synthetic import EOT, write_token_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_token_dataset(tmp_path_factory.mktemp("ds") / "v1", 300, shards=3)


def test_finds_shards_from_version_directory_glob_and_file(dataset: Path) -> None:
    src = open_source(str(dataset))
    assert src.encoding == "bytes" and src.n_vocab == 256 and src.eot_token == EOT
    assert len(src.files) == 3 and src.n_rows == 300 and src.root == str(dataset)
    assert open_source(str(dataset), encoding="bytes").files == src.files
    assert open_source(str(dataset / "tokens" / "bytes" / "*.parquet")).files == src.files
    assert open_source(str(dataset / "tokens" / "bytes")).n_rows == 300
    one = open_source(str(dataset / "tokens" / "bytes" / "part-00001.parquet"))
    assert one.n_rows == 100 and one.n_vocab <= 256  # bare shards: vocabulary from the data


def test_every_document_read_exactly_once_per_epoch(dataset: Path) -> None:
    src = open_source(str(dataset))
    for n_streams in (1, 2, 4, 7):  # 2 ranks x 2 workers, and more streams than row groups
        ds = TokenWindows(src, 16, seed=3)
        seen: Counter[tuple[int, int, int]] = Counter()
        for s in range(n_streams):
            units = ds.stream_units(s, n_streams, epoch=0)
            assert units, f"stream {s} of {n_streams} got nothing"
            for f, rg, lo, hi in units:
                seen.update((f, rg, r) for r in range(lo, hi))
        assert sum(seen.values()) == 300 and max(seen.values()) == 1


def test_windows_pack_documents_with_their_end_of_text(dataset: Path) -> None:
    src = open_source(str(dataset))
    T = 16
    ds = TokenWindows(src, T, seed=0, shuffle_block=100)  # one block: every window of the epoch
    tokens = read_units(src, ds.stream_units(0, 1, 0))
    n = (tokens.size - 1) // T
    windows = [w for w, _, _ in islice(iter(ds), n)]
    assert all(w.shape == (T + 1,) for w in windows)
    expected = {tuple(tokens[i * T : i * T + T + 1]) for i in range(n)}
    assert {tuple(w.tolist()) for w in windows} == expected  # shuffled, none lost or repeated
    assert (tokens == EOT).sum() == 300  # one end-of-text per document


def test_split_units_refuses_too_few_documents() -> None:
    with pytest.raises(DataError, match="too few"):
        split_units([(0, 0, 0, 1)], 2)


def _batches(ds: TokenWindows, workers: int, n: int) -> list[tuple[torch.Tensor, int, dict]]:
    loader = DataLoader(ds, batch_size=4, num_workers=workers, collate_fn=collate)
    return list(islice(iter(loader), n))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_with_the_same_batches(dataset: Path, workers: int) -> None:
    src = open_source(str(dataset))
    kw = {"seed": 5, "rank": 1, "world_size": 2, "shuffle_block": 2}
    full = _batches(TokenWindows(src, 12, **kw), workers, 60)  # crosses blocks and epochs
    cut = 23
    states: dict[int, dict] = {}
    for _, stream, state in full[:cut]:
        states[stream] = json.loads(json.dumps(state))  # survives a checkpoint's round trip
    resumed = _batches(
        TokenWindows(src, 12, states=states, worker_offset=cut % max(1, workers), **kw),
        workers,
        len(full) - cut,
    )
    for (a, sa, _), (b, sb, _) in zip(full[cut:], resumed, strict=True):
        assert sa == sb
        assert torch.equal(a, b)


def test_held_out_is_stable_and_excluded_from_training(dataset: Path) -> None:
    src = open_source(str(dataset))
    ids, tokens = held_out(src, 0.1, 1000)
    assert 10 < len(ids) < 60 and tokens.size > 0
    assert held_out(src, 0.1, 1000)[0] == ids
    everything = read_units(src, src.units).size
    kept = read_units(src, src.units, exclude=frozenset(ids)).size
    assert kept == everything - tokens.size


def _write(path: Path, rows: list[list[int]], ty: pa.DataType | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.table(
            {
                "id": [f"d{i}" for i in range(len(rows))],
                "input_ids": pa.array(rows, pa.list_(ty or pa.uint16())),
                "n_tokens": [len(r) for r in rows],
            }
        ),
        path,
    )


def test_bad_inputs_each_have_a_clear_error(tmp_path: Path, dataset: Path) -> None:
    with pytest.raises(DataError, match="no such dataset"):
        open_source(str(tmp_path / "missing"))
    with pytest.raises(DataError, match=r"not 'cl100k_base'.*data\.encoding"):
        open_source(str(dataset), encoding="cl100k_base")
    _write(tmp_path / "empty" / "part-00000.parquet", [])
    with pytest.raises(DataError, match="empty"):
        open_source(str(tmp_path / "empty"))
    # a version whose manifest says 256 tokens but whose shards hold id 300
    bad = write_token_dataset(tmp_path / "bad", 20, shards=1)
    _write(bad / "tokens" / "bytes" / "part-00000.parquet", [[1, 2, 300, 0]])
    with pytest.raises(DataError, match="token id 300 is outside the vocabulary of 256"):
        open_source(str(bad))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "part-00000.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        open_source(str(tmp_path / "junk"))
    pq.write_table(pa.table({"text": ["hello"]}), tmp_path / "text.parquet")
    with pytest.raises(DataError, match="not a token shard"):
        open_source(str(tmp_path / "text.parquet"))
    (tmp_path / "nodata").mkdir()
    with pytest.raises(DataError, match="no token shards"):
        open_source(str(tmp_path / "nodata"))


def test_uint32_shards_are_read(tmp_path: Path) -> None:
    _write(tmp_path / "big" / "part-00000.parquet", [[70000, 5, 0], [9, 0]], pa.uint32())
    src = open_source(str(tmp_path / "big"))
    assert src.n_vocab == 70001
    np.testing.assert_array_equal(read_units(src, src.units), [70000, 5, 0, 9, 0])


def test_reads_a_version_written_by_booksmith_shards(tmp_path: Path) -> None:
    """The shards stage's own output (cl100k_base, with a packed variant beside it)."""
    from tests.test_shards_dataset import make_version

    root = tmp_path / "out" / "20261126T000000Z"
    make_version(root, 60, encodings=["cl100k_base"], pack_seq_len=32)
    src = open_source(str(root))
    assert (src.encoding, src.n_vocab, src.eot_token) == ("cl100k_base", 100277, 100257)
    assert src.n_rows == 60 and all("packed" not in f for f in src.files)
    tokens = read_units(src, src.units)
    assert (tokens == 100257).sum() == 60
    window, _, _ = next(iter(TokenWindows(src, 32)))
    assert window.shape == (33,)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.e2e
@pytest.mark.parametrize("endpoint_variable", ["AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"])
def test_streams_from_s3_through_moto(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, endpoint_variable: str
) -> None:
    """The trainer reads S3 through the same layer as export: either endpoint variable works."""
    import boto3

    exe = Path(sys.executable).with_name("moto_server")
    port = _free_port()
    proc = subprocess.Popen(
        [str(exe), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(url, timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "moto did not start"
                time.sleep(0.2)
        monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
        monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
        for key, value in {
            endpoint_variable: url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }.items():
            monkeypatch.setenv(key, value)
        boto3.client("s3", endpoint_url=url).create_bucket(Bucket="corpus")
        s3, _ = filesystem("s3://corpus/v1")
        pafs.copy_files(str(dataset), "corpus/v1", source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=s3)  # fmt: skip
        remote = open_source("s3://corpus/v1")
        local = open_source(str(dataset))
        assert remote.n_rows == local.n_rows and remote.root is None
        assert remote.units == local.units
        a = [w for w, _, _ in islice(iter(TokenWindows(remote, 16, seed=1)), 50)]
        b = [w for w, _, _ in islice(iter(TokenWindows(local, 16, seed=1)), 50)]
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_reads_any_store_the_shared_filesystem_layer_reaches(dataset: Path) -> None:
    """memory:// exists only in fsspec: the trainer reads through booksmith's one layer
    (shards/fs.py), not a filesystem of its own."""
    import fsspec

    mem = fsspec.filesystem("memory")
    for path in dataset.rglob("*"):
        if path.is_file():
            mem.pipe(f"/corpus/v1/{path.relative_to(dataset).as_posix()}", path.read_bytes())
    remote, local = open_source("memory://corpus/v1"), open_source(str(dataset))
    assert remote.units == local.units and remote.encoding == local.encoding
    a = [w for w, _, _ in islice(iter(TokenWindows(remote, 16, seed=1)), 20)]
    b = [w for w, _, _ in islice(iter(TokenWindows(local, 16, seed=1)), 20)]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_a_tiny_corpus_still_gets_an_eval_document(tmp_path: Path) -> None:
    small = write_token_dataset(tmp_path / "v1", 5, shards=1)
    ids, tokens = held_out(open_source(str(small)), 0.01, 10)
    assert len(ids) == 1 and tokens[-1] == EOT


def test_several_encodings_default_to_the_smallest_vocabulary(tmp_path: Path) -> None:
    root = write_token_dataset(tmp_path / "v1", 40, shards=1)
    write_token_dataset(tmp_path / "other", 40, shards=1, encoding="cl100k_base")
    (tmp_path / "other" / "tokens" / "cl100k_base").rename(root / "tokens" / "cl100k_base")
    manifest, other = read_manifest(root), read_manifest(tmp_path / "other")
    # the synthetic shards hold byte ids; the manifest says they are cl100k_base's
    cl100k = {"n_vocab": 100277, "eot_token": 100257}
    manifest.tokens["cl100k_base"] = other.tokens["cl100k_base"].model_copy(update=cl100k)
    manifest.shards += other.shards
    (root / "manifest.json").write_text(manifest.to_json())
    assert open_source(str(root)).encoding == "bytes"
    assert open_source(str(root), encoding="cl100k_base").n_vocab == 100277


def test_a_new_source_never_reads_a_freed_ones_files(tmp_path: Path) -> None:
    """Sources opened and dropped one after another (CPython reuses a freed object's address,
    and so its id) each read their own version's tokens."""
    import gc

    from tests.test_shards_dataset import make_version

    roots = [tmp_path / n / "20261126T000000Z" for n in ("a", "b")]
    for root, n in zip(roots, (60, 7), strict=True):
        make_version(root, n, encodings=["cl100k_base"])
    want = []
    for root in roots:
        src = open_source(str(root))
        want.append(read_units(src, src.units).tolist())
        del src
    assert want[0] != want[1]
    for i in range(40):
        src = open_source(str(roots[i % 2]))
        assert read_units(src, src.units).tolist() == want[i % 2], i
        del src
        gc.collect()
