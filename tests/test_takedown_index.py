"""Takedown and `datasets rm` find the MinHash index each version's run committed to in the
config its manifest records (issue 20, point 2), not only the default file index or an
`--index` given by hand: a Redis index (a real server) with its own basename and parameters,
and one whose URL the manifest keeps without its password (redacted), which is taken from
$BOOKSMITH_REDIS_URL or named as out of reach."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from booksmith.filters.dedup import RedisIndex, commit
from booksmith.filters.dedup.minhash import MinHashParams
from booksmith.schemas.config import DedupSettings
from booksmith.shards.dataset import InMemoryVersion, ShardLayout, write_version
from tests.services import redis_server
from tests.test_shards_dataset import make_docs
from tests.test_takedown_copies import invoke, last_json

# not the defaults: opening the index with them would be refused
SETTINGS = {"num_perm": 64, "bands": 8, "rows": 8}


def make_run(out: Path, run_id: str, url: str, basename: str) -> list[str]:
    """A version whose config names a Redis index, and its documents committed there."""
    dedup: dict[str, Any] = {"index": "redis", "redis_url": url, "redis_basename": basename}
    docs = make_docs(6, run_id=run_id, prefix=f"{run_id}-")
    config = {"dedup": {**dedup, **SETTINGS}}
    write_version(out / run_id, InMemoryVersion(run_id, docs, config=config), ShardLayout())
    settings = DedupSettings(**SETTINGS)
    commit(RedisIndex(url, basename, settings.params), run_id, docs, settings)
    return [d.id for d in docs]


def as_built(url: str, basename: str) -> RedisIndex:
    return RedisIndex(url, basename, MinHashParams(num_perm=64, bands=8, rows=8))


def test_the_index_a_version_names_is_flagged_and_cleared(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with redis_server() as url:
        ids = make_run(out, "20261124T020000Z", url, "corpus-a")
        kept = make_run(out, "20261125T020000Z", url, "corpus-b")
        dry = invoke("datasets", "takedown", out, ids[1], "--dry-run")
        wanted = {f"{url}?basename=corpus-a", f"{url}?basename=corpus-b"}
        assert set(last_json(dry)["indexes"]) == wanted
        assert as_built(url, "corpus-a").taken_down() == {}
        result = last_json(invoke("datasets", "takedown", out, ids[1], "--yes"))
        assert result["index_flagged"] == 1 and result["unreached"] == []
        assert as_built(url, "corpus-a").taken_down() == {ids[1]: "20261124T020000Z"}
        assert as_built(url, "corpus-b").taken_down() == {}
        # rm removes the version's entries from the index its config names
        rm = invoke("datasets", "rm", out, "20261125T020000Z", "--yes")
        assert "6 MinHash index entries removed" in rm.output
        index = as_built(url, "corpus-b")
        assert index.lookup_exact(index_keys(kept)) == [None] * 6


def index_keys(ids: list[str]) -> Any:
    """The exact keys of the documents `make_run` committed (the same texts again)."""
    from booksmith.filters.dedup.engine import index_entries

    docs = {
        d.id: d.text for d in make_docs(6, run_id="20261125T020000Z", prefix="20261125T020000Z-")
    }
    return index_entries(ids, [docs[i] for i in ids], DedupSettings(**SETTINGS))[2]


def test_a_url_kept_without_its_password(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    monkeypatch.delenv("BOOKSMITH_REDIS_URL", raising=False)
    with redis_server(password="s3cret") as url:
        ids = make_run(out, "20261124T020000Z", url, "corpus")
        failed = invoke("datasets", "takedown", out, ids[0], "--yes", code=1)
        masked = url.replace("s3cret", "***")
        assert (f"error: not reached: the MinHash index of 20261124T020000Z: {masked} is "
                "recorded without its password; set BOOKSMITH_REDIS_URL to it or pass --index "
                "with it") in failed.stderr.splitlines()  # fmt: skip
        assert "s3cret" not in failed.output
        assert as_built(url, "corpus").taken_down() == {}
        monkeypatch.setenv("BOOKSMITH_REDIS_URL", url)
        invoke("datasets", "takedown", out, ids[0], "--yes")
        assert as_built(url, "corpus").taken_down() == {ids[0]: "20261124T020000Z"}
