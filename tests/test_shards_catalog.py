"""Versions: list, the corpus view over chosen versions, retire, takedown, crash recovery."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from booksmith.flows.cli_shards import app
from booksmith.shards import catalog
from booksmith.shards.verify import verify
from booksmith.shards.version_dir import list_versions, read_manifest
from tests.test_shards_dataset import make_docs, make_version


@pytest.fixture
def out(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    make_version(out / "20261124T020000Z", 30, encodings=["smollm2"], pack_seq_len=16)
    make_version(out / "20261125T020000Z", 20)
    (out / "_state").mkdir()
    (out / "20261126T020000Z").mkdir()  # a run killed before its manifest: not a version
    return out


def test_list_versions_cli(out: Path) -> None:
    result = CliRunner().invoke(app, ["datasets", "list", str(out), "--json"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["run_id"] for r in rows] == ["20261124T020000Z", "20261125T020000Z"]
    assert rows[0]["documents"] == 30 and set(rows[0]["tokens"]) == {"cl100k_base", "smollm2"}
    assert rows[1]["bytes"] > 0 and rows[1]["rejected"] == 5
    table = CliRunner().invoke(app, ["datasets", "list", str(out)])
    assert table.exit_code == 0 and "20261125T020000Z" in table.stdout
    missing = CliRunner().invoke(app, ["datasets", "list", str(out / "nope")])
    assert missing.exit_code == 2


def test_corpus_unions_chosen_versions(out: Path) -> None:
    view = catalog.corpus(out, "cl100k_base")
    assert view.versions == ["20261124T020000Z", "20261125T020000Z"] and view.documents == 50
    table = view.dataset().to_table()
    assert table.num_rows == 50
    assert sum(len(r) for r in table.column("input_ids").to_pylist()) == view.tokens
    one = catalog.corpus(out, "cl100k_base", ["20261125T020000Z"])
    assert one.documents == 20
    with pytest.raises(ValueError, match="no 'smollm2' token shards"):
        catalog.corpus(out, "smollm2")
    result = CliRunner().invoke(
        app,
        [
            "datasets",
            "corpus",
            str(out),
            "--version",
            "20261124T020000Z",
            "--encoding",
            "smollm2",
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["documents"] == 30


def test_rm_retires_a_version_and_calls_the_index_hooks(out: Path, monkeypatch) -> None:
    calls: list[tuple[Path, str]] = []
    monkeypatch.setattr(catalog, "RETIRE_HOOKS", [lambda o, r: calls.append((o, r))])
    asked = CliRunner().invoke(app, ["datasets", "rm", str(out), "20261124T020000Z"])
    assert asked.exit_code == 2 and "pass --yes" in asked.output  # no terminal to ask
    dry = CliRunner().invoke(app, ["datasets", "rm", str(out), "20261124T020000Z", "--dry-run"])
    assert dry.exit_code == 0 and len(list_versions(out)) == 2 and not calls
    result = CliRunner().invoke(app, ["datasets", "rm", str(out), "20261124T020000Z", "--yes"])
    assert result.exit_code == 0, result.output
    assert [p.name for p in list_versions(out)] == ["20261125T020000Z"]
    assert not (out / "20261124T020000Z").exists()
    assert calls == [(out, "20261124T020000Z")]
    assert "0 MinHash index entries removed" in result.stderr  # no index here
    for bad in ("20261124T020000Z", "_state", "../x", "20261126T020000Z"):
        result = CliRunner().invoke(app, ["datasets", "rm", str(out), bad, "--yes"])
        assert result.exit_code == 2, bad


def test_takedown_removes_ids_from_every_version(out: Path) -> None:
    a, b = out / "20261124T020000Z", out / "20261125T020000Z"
    before = read_manifest(a)
    gone = ["20261124T020000Z-00003", "20261124T020000Z-rej-00001", "20261125T020000Z-00000"]
    ids_file = out.parent / "ids.txt"
    ids_file.write_text("\n".join(gone[1:]) + "\n")
    result = CliRunner().invoke(
        app, ["datasets", "takedown", str(out), gone[0], "--ids-file", str(ids_file), "--yes"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.splitlines()[-1])["removed"] == {
        "20261124T020000Z": 2,
        "20261125T020000Z": 1,
    }
    for version in (a, b):
        report = verify(version, sample=100)
        assert report.ok, report.problems
        for kind in ("text", "rejected", "tokens/cl100k_base"):
            ids = set(pq.read_table(version / kind, columns=["id"]).column("id").to_pylist())
            assert not ids & set(gone)
    after = read_manifest(a)
    assert after.documents == before.documents - 1 == 29
    assert after.counts.rejected == 4
    assert after.tokens["smollm2"].documents == 29
    # packed rows were rebuilt from the remaining documents
    packed = after.tokens["smollm2"].packed
    stream = [t for r in pq.read_table(a / "tokens/smollm2")["input_ids"].to_pylist() for t in r]
    rows = pq.read_table(a / packed.path)["input_ids"].to_pylist()
    assert [t for r in rows for t in r] == stream[: len(rows) * 17]
    assert after.takedowns[0].ids == 3
    # nothing left over from the swap
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["20261124T020000Z", "20261125T020000Z", "20261126T020000Z", "_state"]
    )


def test_takedown_crash_between_renames_is_recovered(out: Path, monkeypatch) -> None:
    real_replace = os.replace
    calls = {"n": 0}

    def crash_on_second_rename(src: os.PathLike[str], dst: os.PathLike[str]) -> None:
        if Path(src).name.startswith(catalog.TAKEDOWN_PREFIX):
            calls["n"] += 1
            raise KeyboardInterrupt("killed between the two renames")
        real_replace(src, dst)

    monkeypatch.setattr(catalog.os, "replace", crash_on_second_rename)
    with pytest.raises(KeyboardInterrupt):
        catalog.takedown(out, ["20261125T020000Z-00001"])
    monkeypatch.undo()
    assert calls["n"] == 1
    assert not (out / "20261125T020000Z").exists()  # mid-swap: not visible, never half
    rows = catalog.summarize(out)  # recovers first
    assert [r.run_id for r in rows] == ["20261124T020000Z", "20261125T020000Z"]
    assert rows[1].documents == 19
    assert verify(out / "20261125T020000Z").ok
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_takedown_crash_while_building_keeps_the_old_version(out: Path, monkeypatch) -> None:
    def crash(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt("killed while rewriting")

    monkeypatch.setattr(catalog, "commit_manifest", crash)
    with pytest.raises(KeyboardInterrupt):
        catalog.takedown(out, ["20261125T020000Z-00001"])
    monkeypatch.undo()
    assert read_manifest(out / "20261125T020000Z").documents == 20
    catalog.recover(out)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    shutil.rmtree(out / "20261126T020000Z")
    assert catalog.takedown(out, ["20261125T020000Z-00001"]) == {"20261125T020000Z": 1}


def test_bin_exports_for_nanogpt_and_llmc(out: Path, tmp_path: Path) -> None:
    import numpy as np

    version = out / "20261124T020000Z"
    stream = [
        t for r in pq.read_table(version / "tokens/smollm2")["input_ids"].to_pylist() for t in r
    ]
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "datasets",
            "bin",
            str(version),
            "--out",
            str(tmp_path / "llmc"),
            "--shard-tokens",
            "500",
        ],
    )
    assert result.exit_code == 0, result.output
    files = sorted((tmp_path / "llmc").glob("train_*.bin"))
    assert len(files) == -(-len(stream) // 500)
    tokens: list[int] = []
    for f in files:
        header = np.fromfile(f, dtype="<i4", count=256)
        assert header[0] == 20240520 and header[1] == 1
        body = np.fromfile(f, dtype="<u2", offset=1024)
        assert len(body) == header[2]
        tokens += body.tolist()
    assert tokens == stream
    result = runner.invoke(
        app,
        ["datasets", "bin", str(version), "--out", str(tmp_path / "ng"), "--format", "nanogpt"],
    )
    assert result.exit_code == 0, result.output
    assert np.memmap(tmp_path / "ng" / "train.bin", dtype=np.uint16, mode="r").tolist() == stream
    wide = runner.invoke(
        app,
        [
            "datasets",
            "bin",
            str(version),
            "--out",
            str(tmp_path / "x"),
            "--encoding",
            "cl100k_base",
        ],
    )
    assert wide.exit_code == 2 and "fits uint16" in wide.stderr
    # each written output is recorded in the output directory, for a takedown to write again
    copies = json.loads((out / "_state" / "copies.json").read_text())["copies"]
    assert [(c["kind"], c["version"], c["encoding"], c["format"], c["place"], c["files"])
            for c in copies] == [
        ("bin", version.name, "smollm2", "llmc", str(tmp_path / "llmc"), [f.name for f in files]),
        ("bin", version.name, "smollm2", "nanogpt", str(tmp_path / "ng"), ["train.bin"]),
    ]  # fmt: skip


def test_rm_drops_the_version_from_the_minhash_index(out: Path) -> None:
    from booksmith.filters.dedup import commit, default_index_path, open_index_spec

    index = open_index_spec(str(default_index_path(out)))
    run_id = "20261125T020000Z"
    docs = make_docs(8, run_id=run_id, prefix="ix-")
    added = commit(index, run_id, docs)
    assert added == 8
    result = CliRunner().invoke(app, ["datasets", "rm", str(out), run_id, "--yes"])
    assert result.exit_code == 0, result.output
    assert f"{added} MinHash index entries" in result.stderr
    assert open_index_spec(str(default_index_path(out))).remove_run(run_id) == 0
