"""The persistent dedup index, on local files and on a real redis-server: commit order,
remove_run, replace on retry, corrupt and foreign indexes."""

from __future__ import annotations

import gc
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest

from booksmith.filters import run_chain
from booksmith.filters.dedup import (
    DedupIndexError,
    DedupSettings,
    ExactDedup,
    FileIndex,
    MinHashDedup,
    RedisIndex,
    commit,
    open_index,
    remove_run,
)
from booksmith.filters.dedup.engine import index_entries
from tests.dedup_corpus import make_corpus
from tests.services import free_port, redis_server
from tests.test_dedup_core import doc

# -- a real redis-server per module, stopped by its pid


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        yield url


_basenames = iter(range(10_000))


@pytest.fixture(params=["file", "redis"])
def make_index(request, tmp_path: Path):
    """A factory opening the same index again (as another process or worker would)."""
    if request.param == "file":
        return lambda: FileIndex(tmp_path / "_state" / "minhash")
    url = request.getfixturevalue("redis_url")
    basename = f"test{next(_basenames)}"
    return lambda: RedisIndex(url, basename)


def _docs(texts: list[str], prefix: str) -> list:
    return [doc(f"{prefix}{i}", t) for i, t in enumerate(texts)]


def _nightly(index, run_id: str, docs: list) -> list:
    """What the flow does: filter (reading the index), write the version, then commit."""
    result = run_chain(docs, [ExactDedup(index), MinHashDedup(DedupSettings(), index)])
    commit(index, run_id, result.kept)
    return result.rejected


CORPUS = make_corpus(60, 0, words_per_doc=200, seed=2)


def test_second_run_drops_what_the_first_kept(make_index) -> None:
    index = make_index()
    assert _nightly(index, "run1", _docs(CORPUS.texts[:40], "a")) == []
    assert index.runs() == {"run1": 40}
    # Run 2: 20 repeats (exact or edited) of run 1 and 20 new documents.
    repeats = [t.upper() for t in CORPUS.texts[:10]] + [
        t.replace(" ", "  ", 3) + " one more sentence here." for t in CORPUS.texts[10:20]
    ]
    docs2 = _docs(repeats + CORPUS.texts[40:60], "b")
    rejected = _nightly(make_index(), "run2", docs2)
    assert sorted(r.id for r in rejected) == sorted(f"b{i}" for i in range(20))
    assert {r.reason for r in rejected[:10]} == {"dedup_exact"}
    assert {r.duplicate_of for r in rejected} == {f"a{i}" for i in range(20)}
    assert make_index().runs() == {"run1": 40, "run2": 20}


def test_a_run_killed_before_commit_does_not_find_itself(make_index) -> None:
    index = make_index()
    docs = _docs(CORPUS.texts[:30], "a")
    # The run filtered, then died before its manifest: nothing was committed.
    run_chain(docs, [ExactDedup(index), MinHashDedup(DedupSettings(), index)])
    assert _nightly(make_index(), "run1", docs) == []


def test_remove_run_and_retried_commit(make_index) -> None:
    index = make_index()
    commit(index, "run1", _docs(CORPUS.texts[:10], "a"))
    commit(index, "run2", _docs(CORPUS.texts[10:20], "b"))
    commit(index, "run2", _docs(CORPUS.texts[10:15], "b"))  # a retry replaces, never doubles
    assert make_index().runs() == {"run1": 10, "run2": 5}
    assert remove_run(make_index(), "run1") == 10
    assert remove_run(make_index(), "missing") == 0
    again = make_index()
    assert again.runs() == {"run2": 5}
    _, sigs, exact = index_entries(["q0", "q1"], [CORPUS.texts[0], CORPUS.texts[12]])
    assert again.lookup_exact(exact)[0] is None  # run1's document is gone
    near = again.lookup_near(sigs, 0.72)
    assert near[0] is None
    assert near[1] is not None and (near[1].id, near[1].run_id) == ("b2", "run2")
    assert near[1].jaccard == 1.0


def test_taken_down_entries_are_flagged_and_still_block(make_index) -> None:
    """A takedown flags a document's entries (id -> run) and keeps them: the same text in a
    later run is still found as a duplicate of it; the flags go with their run's entries."""
    index = make_index()
    commit(index, "run1", _docs(CORPUS.texts[:10], "a"))
    commit(index, "run2", _docs(CORPUS.texts[10:20], "b"))
    assert index.taken_down() == {}
    assert index.flag_taken_down(["a3", "b4", "not-indexed"]) == 2
    assert make_index().taken_down() == {"a3": "run1", "b4": "run2"}
    again = [CORPUS.texts[3].upper(), CORPUS.texts[14] + " one more sentence here."]
    rejected = _nightly(make_index(), "run3", _docs(again + CORPUS.texts[40:42], "c"))
    assert sorted((r.id, r.duplicate_of) for r in rejected) == [("c0", "a3"), ("c1", "b4")]
    assert make_index().taken_down() == {"a3": "run1", "b4": "run2"}  # a later commit keeps them
    # its version retired: the run's entries go, but for the taken-down one, which still blocks
    assert remove_run(make_index(), "run1") == 9
    assert remove_run(make_index(), "run1") == 0  # (as every later prune finds it)
    assert make_index().runs() == {"run1": 1, "run2": 10, "run3": 2}
    assert make_index().taken_down() == {"a3": "run1", "b4": "run2"}
    rejected = _nightly(make_index(), "run4", _docs([CORPUS.texts[3], CORPUS.texts[5]], "d"))
    assert [(r.id, r.duplicate_of) for r in rejected] == [("d0", "a3")]
    # a retried commit of a run replaces it, and keeps the flags of the ids it still holds
    commit(make_index(), "run2", _docs(CORPUS.texts[10:14], "b"))
    assert make_index().taken_down() == {"a3": "run1"}
    assert make_index().runs()["run2"] == 4


def test_taken_down_flags_in_an_index_written_before_them(tmp_path: Path) -> None:
    """An index written before the flags (index.json of version 1 without `taken_down`) opens
    and takes them; the file stays version 1; the index holds no text; a damaged flag list is
    an error naming the file."""
    path = tmp_path / "idx"
    commit(FileIndex(path), "run1", _docs(CORPUS.texts[:10], "a"))
    manifest = json.loads((path / "index.json").read_text())
    assert set(manifest) == {"format", "version", "params", "generation", "entries", "segments"}
    assert FileIndex(path).flag_taken_down(["a2"]) == 1
    manifest = json.loads((path / "index.json").read_text())
    assert manifest["version"] == 1 and manifest["taken_down"] == {"a2": "run1"}
    words = CORPUS.texts[2].split()
    needle = " ".join(words[10:16]).encode()
    for file in path.rglob("*"):
        assert not file.is_file() or needle not in file.read_bytes(), file
    manifest["taken_down"] = ["a2"]
    (path / "index.json").write_text(json.dumps(manifest))
    with pytest.raises(
        DedupIndexError, match=r"index\.json: corrupt index manifest \('taken_down'"
    ):
        FileIndex(path)


def test_documents_without_words_are_not_indexed(make_index) -> None:
    index = make_index()
    assert commit(index, "r", _docs(["", "  ?! ", CORPUS.texts[0]], "a")) == 1


def test_redis_index_is_shared_by_two_workers(redis_url: str) -> None:
    worker_a = RedisIndex(redis_url, "shared")
    worker_b = RedisIndex(redis_url, "shared")
    commit(worker_a, "nightA", _docs(CORPUS.texts[:5], "a"))
    _, sigs, _ = index_entries(["x"], [CORPUS.texts[3]])
    match = worker_b.lookup_near(sigs, 0.72)[0]
    assert match is not None and match.id == "a3"
    other_corpus = RedisIndex(redis_url, "other")  # another basename: another corpus
    assert other_corpus.lookup_near(sigs, 0.72)[0] is None


def test_redis_index_refuses_foreign_or_mismatched_state(redis_url: str) -> None:
    from datasketch import MinHashLSH

    from booksmith.filters.dedup import to_lean

    foreign = MinHashLSH(
        num_perm=112,
        params=(14, 8),
        storage_config={
            "type": "redis",
            "basename": b"foreign",
            "redis": {"host": "127.0.0.1", "port": int(redis_url.rsplit(":", 1)[1].split("/")[0])},
        },
    )
    _, sigs, _ = index_entries(["x"], [CORPUS.texts[0]])
    foreign.insert("k", to_lean(sigs[0]))
    with pytest.raises(DedupIndexError, match="did not write"):
        RedisIndex(redis_url, "foreign")
    commit(RedisIndex(redis_url, "params"), "r", _docs(CORPUS.texts[:2], "a"))
    with pytest.raises(DedupIndexError, match="parameters"):
        RedisIndex(redis_url, "params", DedupSettings(num_perm=128).params)
    with pytest.raises(DedupIndexError, match="cannot reach"):
        RedisIndex(f"redis://127.0.0.1:{free_port()}/0", "x")


# -- file index: format, atomicity, corruption


def test_file_index_layout_and_size(tmp_path: Path) -> None:
    index = open_index(DedupSettings(), tmp_path)
    assert isinstance(index, FileIndex) and index.path == tmp_path / "_state" / "minhash"
    commit(index, "20260101T000000Z", _docs(CORPUS.texts, "doc-0123456789abcdef0123456789ab"))
    manifest = json.loads((index.path / "index.json").read_text())
    assert manifest["format"] == "booksmith-minhash-index" and manifest["version"] == 1
    assert manifest["entries"] == 60 and manifest["params"]["num_perm"] == 112
    (segment,) = manifest["segments"]
    assert segment["run_id"] == "20260101T000000Z"
    assert (index.path / segment["file"]).stat().st_size / 60 < 1024
    index.verify()


def test_corrupt_or_foreign_index_is_an_error_and_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "idx"
    commit(FileIndex(path), "run1", _docs(CORPUS.texts[:10], "a"))
    manifest = path / "index.json"
    good = manifest.read_bytes()
    manifest.write_bytes(good[: len(good) // 2])  # torn / corrupted
    with pytest.raises(DedupIndexError, match="corrupt index manifest"):
        FileIndex(path)
    assert manifest.read_bytes() == good[: len(good) // 2]
    manifest.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(DedupIndexError, match="not a booksmith MinHash index"):
        FileIndex(path)
    manifest.write_bytes(good)
    with pytest.raises(DedupIndexError, match="parameters"):
        FileIndex(path, DedupSettings(bands=8, rows=14).params)
    # A manifest whose segment is damaged: reads fail clearly, writes refuse.
    seg = path / json.loads(good)["segments"][0]["file"]
    seg.write_bytes(b"not parquet")
    with pytest.raises(DedupIndexError, match="unreadable index segment"):
        FileIndex(path).lookup_near(np.zeros((1, 112), dtype=np.uint32), 0.7)
    with pytest.raises(DedupIndexError, match="sha256"):
        FileIndex(path).verify()
    seg.unlink()
    with pytest.raises(DedupIndexError, match="missing"):
        commit(FileIndex(path), "run2", _docs(CORPUS.texts[10:12], "b"))
    assert manifest.read_bytes() == good  # untouched
    # A directory of other files, or a plain file, is not taken over.
    other = tmp_path / "other"
    other.mkdir()
    (other / "data.txt").write_text("mine")
    with pytest.raises(DedupIndexError, match="refusing"):
        FileIndex(other)
    (tmp_path / "plain").write_text("x")
    with pytest.raises(DedupIndexError, match="is a file"):
        FileIndex(tmp_path / "plain")


def test_file_index_replaced_atomically_on_crash(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "idx"
    commit(FileIndex(path), "run1", _docs(CORPUS.texts[:10], "a"))
    before = (path / "index.json").read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("booksmith.shards.files.os.replace", crash)
    with pytest.raises(OSError, match="disk full"):
        commit(FileIndex(path), "run2", _docs(CORPUS.texts[10:20], "b"))
    monkeypatch.undo()
    assert (path / "index.json").read_bytes() == before
    assert FileIndex(path).runs() == {"run1": 10}
    commit(FileIndex(path), "run3", _docs(CORPUS.texts[20:22], "c"))
    files = sorted(p.name for p in (path / "segments").iterdir())
    assert len(files) == 2 and not any(".tmp-" in f for f in files)  # crash debris swept


@pytest.mark.slow
def test_file_index_with_a_million_entries_loads(tmp_path: Path) -> None:
    """Size per entry at 1M synthetic signatures (load time is in the benchmark), and a
    lookup that does not load the index into memory."""
    rng = np.random.default_rng(0)
    n = 1_000_000
    index = FileIndex(tmp_path / "big")
    sigs = rng.integers(0, 2**32, size=(n, 112), dtype=np.uint32)
    index.add(
        "big", [f"{i:032x}" for i in range(n)], sigs, rng.integers(0, 2**63, n).astype(np.uint64)
    )
    size = sum(p.stat().st_size for p in (tmp_path / "big").rglob("*") if p.is_file())
    # The Parquet segment (about 500 bytes an entry) and its memory-mapped lookup tables
    # (about 620: sorted band keys and rows, signatures, exact keys, ids).
    assert size / n < 1200
    probe = sigs[[5, 999_999]].copy()
    probe[0, :20] += 1
    del sigs
    gc.collect()
    before = psutil.Process().memory_info().rss
    again = FileIndex(tmp_path / "big")
    matches = again.lookup_near(probe, 0.72)
    exact = again.lookup_exact(np.array([123], dtype=np.uint64))
    grew = psutil.Process().memory_info().rss - before
    assert [m.id if m else None for m in matches] == [f"{5:032x}", f"{999_999:032x}"]
    assert exact == [None]
    assert grew < 64 << 20, f"a lookup grew the process by {grew >> 20} MB (index: {size >> 20} MB)"


def _write_version(out: Path, run_id: str, docs: list) -> Path:
    from booksmith.shards.dataset import InMemoryVersion, ShardLayout, write_version

    write_version(out / run_id, InMemoryVersion(run_id, docs), ShardLayout(shard_rows=1000))
    return out / run_id


def test_reconcile_indexes_uncommitted_versions_and_prunes_deleted_ones(tmp_path: Path) -> None:
    from booksmith.filters.dedup import reconcile

    out = tmp_path / "out"
    v1 = _write_version(out, "20260101T000000Z", _docs(CORPUS.texts[:10], "a"))
    _write_version(out, "20260102T000000Z", _docs(CORPUS.texts[10:20], "b"))
    (out / "20260103T000000Z").mkdir()  # a run that died before its manifest
    index = open_index(DedupSettings(), out)
    assert index is not None
    commit(index, "20260101T000000Z", _docs(CORPUS.texts[:10], "a"))
    # Run 2 wrote its manifest, then died before its commit.
    done = reconcile(index, out, prune=True)
    assert done.added == {"20260102T000000Z": 10} and done.removed == {}
    shutil.rmtree(v1)  # a deleted dataset version
    done = reconcile(index, out, prune=True)
    assert done.added == {} and done.removed == {"20260101T000000Z": 10}
    assert FileIndex(out / "_state" / "minhash").runs() == {"20260102T000000Z": 10}


def test_redis_url_defaults_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BOOKSMITH_REDIS_URL", "redis://redis:6379/0")
    assert DedupSettings(index="redis").redis_url == "redis://redis:6379/0"
    monkeypatch.delenv("BOOKSMITH_REDIS_URL")
    with pytest.raises(ValueError, match="needs redis_url"):
        DedupSettings(index="redis")


def _blocks(n: int, block: int = 8192):
    """A run's entries as `Entries.blocks` gives them: the same on every pass."""

    def blocks() -> Iterator[tuple[list[str], np.ndarray, np.ndarray]]:
        rng = np.random.default_rng(7)
        for start in range(0, n, block):
            m = min(block, n - start)
            sigs = rng.integers(0, 2**32, size=(m, 112), dtype=np.uint32)
            ids = [f"{i:032x}" for i in range(start, start + m)]
            yield ids, sigs, np.arange(start, start + m, dtype=np.uint64) * 7919

    return blocks


def test_a_run_is_committed_a_block_at_a_time(make_index) -> None:
    """`add_entries` reads a run's entries block by block, and every entry is found after."""
    from booksmith.filters.dedup.index import Entries

    n = 20_000
    assert make_index().add_entries("streamed", Entries(n, _blocks(n))) == n
    *_, (ids, sigs, exact) = _blocks(n)()
    again = make_index()
    assert again.runs() == {"streamed": n}
    found = again.lookup_near(sigs[[0, -1]], 0.9)
    assert [m.id if m else None for m in found] == [ids[0], ids[-1]]
    assert [m.id if m else None for m in again.lookup_exact(exact[[3]])] == [ids[3]]


def test_the_commit_holds_keys_not_signatures(tmp_path: Path) -> None:
    """The file index's commit holds each entry's band and exact keys (120 bytes), never the
    run's signatures and ids together (448 + ~100 bytes): its peak grows by less than 250
    bytes an entry between a run of 20,000 and one of 80,000."""
    import tracemalloc

    from booksmith.filters.dedup.index import Entries

    FileIndex(tmp_path / "warm").add_entries("w", Entries(10, _blocks(10)))  # imports
    peaks = []
    for n in (20_000, 80_000):
        tracemalloc.start()
        try:
            FileIndex(tmp_path / f"i{n}").add_entries("r", Entries(n, _blocks(n)))
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
    per_entry = (peaks[1] - peaks[0]) / 60_000
    assert per_entry < 250, f"{per_entry:.0f} bytes an entry at the commit's peak"
