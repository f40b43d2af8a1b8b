"""The typed manifest: what the writer writes is what every reader reads, versions written
before it still open, and a manifest that cannot be read is one line naming file and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from booksmith.flows.cli import app
from booksmith.flows.report import render_report
from booksmith.schemas.manifest import MANIFEST_VERSION, Manifest, ManifestError
from booksmith.shards.catalog import corpus
from booksmith.shards.verify import verify
from booksmith.shards.version_dir import read_manifest
from booksmith.trainer.data import DataError, open_source
from tests.test_shards_dataset import make_version

V1 = Path(__file__).parent / "fixtures" / "manifest-v1.json"


@pytest.fixture
def version(tmp_path: Path) -> Path:
    root = tmp_path / "out" / "20261126T000000Z"
    make_version(root, 30, encodings=["smollm2"], pack_seq_len=16)
    return root


def _edit(version: Path, change) -> Path:  # type: ignore[no-untyped-def]
    path = version / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    return path


def test_a_version_1_manifest_from_the_old_writer_reads_through_the_model() -> None:
    raw = json.loads(V1.read_text())
    assert "manifest_version" not in raw
    m = Manifest.parse(V1.read_bytes(), str(V1))
    assert m.manifest_version == MANIFEST_VERSION
    gen = m.counts.generate
    assert gen.planned == 8 == m.documents + m.counts.rejected + gen.failed
    assert m.counts.chunks is not None and m.counts.chunks.count >= 1
    assert m.counts.fill is not None and m.counts.fill.stopped == "single_round"
    name, entry = m.encoding()
    assert name == "cl100k_base" and (entry.n_vocab, entry.eot_token) == (100277, 100257)
    assert m.shard_paths("tokens", name) == [
        s["path"] for s in raw["shards"] if s["kind"] == "tokens"
    ]
    assert m.run_key == raw["run_key"] and m.diversity.documents == m.documents


def test_a_version_without_manifest_version_still_verifies_reports_and_trains(
    version: Path,
) -> None:
    _edit(version, lambda d: d.pop("manifest_version"))
    assert read_manifest(version).tokens["smollm2"].packed is not None
    assert verify(version).ok
    assert "| documents kept | 30 |" in render_report(version).read_text()
    assert corpus(version.parent, "smollm2").documents == 30
    assert open_source(str(version), encoding="smollm2").eot_token == 0


def test_the_written_manifest_reads_back_equal(version: Path) -> None:
    m = read_manifest(version)
    assert Manifest.parse(m.to_json(), "again") == m
    assert json.loads((version / "manifest.json").read_text())["manifest_version"] == 2


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda d: d["counts"].update(kep=3), "counts.kep: Extra inputs are not permitted"),
        (
            lambda d: d["tokens"]["smollm2"].pop("eot_token"),
            "tokens.smollm2.eot_token: Field required",
        ),
        (
            lambda d: d["shards"][0].update(kind="txt"),
            "shards.0.kind: Input should be 'text', 'rejected'",
        ),
        (lambda d: d.update(manifest_version=9), "manifest_version 9 is newer than"),
    ],
)
def test_an_unreadable_manifest_names_the_file_and_the_field(
    version: Path, change, expected: str
) -> None:  # type: ignore[no-untyped-def]
    path = _edit(version, change)
    with pytest.raises(ManifestError) as err:
        read_manifest(version)
    assert str(err.value).startswith(f"{path}: ") and expected in str(err.value)
    # every reader says the same, the trainer's loader and the CLI included
    with pytest.raises(DataError, match=expected.split(":")[0]):
        open_source(str(version))
    result = CliRunner().invoke(app, ["report", str(version)])
    assert result.exit_code == 2 and expected in result.output
    assert expected in " ".join(verify(version).problems)
