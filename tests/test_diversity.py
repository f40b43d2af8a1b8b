"""Each diversity metric on small inputs whose answers are known, and the report."""

from __future__ import annotations

from pathlib import Path

import pytest

from booksmith.generation.diversity import (
    axis_coverage,
    compression_ratio,
    distinct_n,
    diversity_report,
    mean_pairwise_minhash,
    top_opener_share,
)


def test_distinct_n() -> None:
    assert distinct_n(["a b c d"], 1) == 1.0
    assert distinct_n(["a a a a"], 1) == 0.25
    # bigrams: (a b) (b a) (a b) -> 2 distinct of 3
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    # across documents: "x y" twice -> 1 distinct trigram-free, unigrams 2 of 4
    assert distinct_n(["x y", "X, y!"], 1) == 0.5
    assert distinct_n(["x y", "x y"], 3) == 0.0  # no trigrams at all
    assert distinct_n([], 1) == 0.0


def test_top_opener_share() -> None:
    texts = [
        "Once upon a time there was a cell.",
        "Once upon a time, there lived a prime.",
        "Photosynthesis turns light into sugar.",
        "Once upon a time there were atoms.",
    ]
    # first five words: "once upon a time there" x3 (punctuation ignored), one other
    assert top_opener_share(texts) == 0.75
    assert top_opener_share([]) == 0.0


def test_compression_ratio_rises_with_repetition() -> None:
    varied = ["The quick brown fox jumps over the lazy dog near a riverbank at dawn."]
    repeated = ["the same sentence again. " * 200]
    assert compression_ratio(repeated) > 10 * compression_ratio(varied) / 2
    assert compression_ratio(repeated) > 20
    assert compression_ratio([]) == 0.0


def test_mean_pairwise_minhash() -> None:
    base = " ".join(f"w{i}" for i in range(200))
    other = " ".join(f"v{i}" for i in range(200))
    assert mean_pairwise_minhash([base, base]) == 1.0
    assert mean_pairwise_minhash([base, other]) < 0.05
    # three docs: one identical pair (1.0) and two disjoint pairs (~0) -> about 1/3
    assert mean_pairwise_minhash([base, base, other]) == pytest.approx(1 / 3, abs=0.05)
    assert mean_pairwise_minhash([base]) == 0.0


def test_axis_coverage() -> None:
    rows = [{"audience": "kids"}, {"audience": "kids"}, {"audience": "college"}]
    cov = axis_coverage(rows, {"audience": ["kids", "college", "graduate", "professional"]})
    assert cov["audience"]["counts"] == {"kids": 2, "college": 1, "graduate": 0, "professional": 0}
    assert cov["audience"]["covered"] == 0.5


def test_report_renders_from_a_manifest(tmp_path: Path) -> None:
    from booksmith.flows.report import render_report
    from booksmith.shards.files import write_json_atomically

    texts = ["Once upon a time a cell divided.", "Light bends when it enters water."]
    rows = [{"format": "story"}, {"format": "textbook_section"}]
    div = diversity_report(texts, rows, {"format": ["story", "textbook_section", "how_to"]})
    assert div["axis_coverage"]["format"]["covered"] == pytest.approx(2 / 3)
    manifest = {
        "run_id": "r1",
        "shards": [],
        "documents": 2,
        "counts": {"generate": {"planned": 2}},
    }
    write_json_atomically(tmp_path / "manifest.json", {**manifest, "diversity": div})
    report = render_report(tmp_path)
    text = report.read_text()
    assert "distinct-1" in text and "| documents kept | 2 |" in text
    assert (tmp_path / "report" / "axis_coverage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # two documents: the openers are a table (a plot of bars of 1 says nothing)
    assert not (tmp_path / "report" / "openers.png").exists()
    assert "Most common openers:" in text and "| `once upon a time a` | 1 |" in text

    many = diversity_report(texts * 60, rows * 60, {"format": ["story", "textbook_section"]})
    write_json_atomically(
        tmp_path / "manifest.json", {**manifest, "documents": 120, "diversity": many}
    )
    text = render_report(tmp_path).read_text()
    assert "![openers](openers.png)" in text and "Most common openers" not in text
    assert (tmp_path / "report" / "openers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
