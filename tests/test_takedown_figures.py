"""After a takedown the manifest's figures of what a version holds lose exactly the rows taken
down (issue 20, point 2): here the quality histogram, which the fake-server run of
test_takedown_copies leaves empty (no quality classifier there); that test checks the kept
count, languages, axis coverage and text metrics on a real run."""

from __future__ import annotations

from pathlib import Path

from booksmith.schemas.manifest import Counts, QualityHistogram
from booksmith.shards.dataset import InMemoryVersion, ShardLayout, commit_manifest, write_version
from booksmith.shards.version_dir import read_manifest
from tests.test_shards_dataset import make_docs, make_rejected
from tests.test_takedown_copies import invoke


def test_the_quality_histogram_loses_the_rows_taken_down(tmp_path: Path) -> None:
    out = tmp_path / "out"
    version = out / "20261124T020000Z"
    kept = [d.model_copy(update={"quality_score": (i % 10) / 10 + 0.05})
            for i, d in enumerate(make_docs(30, prefix="k-"))]  # fmt: skip
    rejected = [r.model_copy(update={"quality_score": 0.95})
                for r in make_rejected(make_docs(4, seed=1, prefix="r-"))]  # fmt: skip
    counts = Counts.model_validate({"kept": 30, "rejected": 4})
    write_version(version, InMemoryVersion(version.name, kept, rejected, counts=counts),
                  ShardLayout(shard_rows=8))  # fmt: skip
    m = read_manifest(version)  # as a run counts them: 3 kept per bin, the rejected in the last
    m.quality = QualityHistogram(edges=[i / 10 for i in range(11)], kept=[3] * 10,
                                 rejected=[0] * 9 + [4])  # fmt: skip
    commit_manifest(version, m)

    # k-00000 scores 0.05 (bin 0), k-00013 0.35 (bin 3), k-00023 0.35, r-00002 0.95 (bin 9)
    invoke("datasets", "takedown", out, "k-00000", "k-00013", "k-00023", "r-00002", "--yes")
    after = read_manifest(version)
    assert after.quality == QualityHistogram(
        edges=m.quality.edges, kept=[2, 3, 3, 1, 3, 3, 3, 3, 3, 3], rejected=[0] * 9 + [3]
    )
    assert after.documents == after.counts.kept == 27 and after.languages == {"en": 27}
