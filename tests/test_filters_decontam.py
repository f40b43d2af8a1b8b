"""Decontamination: benchmark files in three formats, planted items found with their span,
near-misses kept, and clear errors for bad benchmark files."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from booksmith.filters.benchmarks import load_benchmark
from booksmith.filters.decontam import BenchmarkIndex, DecontamFilter, build_index
from booksmith.schemas.filter_settings import DecontamSettings, FilterError
from tests.filters_helpers import GSM8K, MMLU, TEXTBOOK, make_doc

MMLU_Q0 = json.loads(MMLU.read_text().splitlines()[0])["question"]
GSM_Q0 = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
    "in May. How many clips did Natalia sell altogether in April and May?"
)


def _plant(item: str) -> str:
    """A generated chapter with a benchmark item inside it, re-cased and re-punctuated."""
    cut = TEXTBOOK.index("## Why it matters")
    variant = item.upper().replace(",", " ;").replace("?", "!!")
    return TEXTBOOK[:cut] + f"Exercise: {variant}\n\n" + TEXTBOOK[cut:]


@pytest.fixture(scope="module")
def decontam() -> DecontamFilter:
    return DecontamFilter.from_settings(DecontamSettings(benchmarks=[f"mmlu={MMLU}", str(GSM8K)]))


def test_clean_text_is_kept(decontam: DecontamFilter) -> None:
    out = decontam.run([make_doc(TEXTBOOK)])
    assert len(out.kept) == 1 and not out.rejected


def test_planted_item_is_removed_with_benchmark_and_span(decontam: DecontamFilter) -> None:
    text = _plant(MMLU_Q0)
    out = decontam.run([make_doc(text, "planted")])
    assert [r.reason for r in out.rejected] == ["contaminated:mmlu"]
    detail = out.details[0]
    assert detail is not None
    assert detail["benchmark"] == "mmlu" and detail["row"] == 0 and detail["field"] == "question"
    assert detail["ratio"] == 1.0
    assert text[detail["start"] : detail["end"]] == detail["span"]
    assert detail["span"].lower().startswith("which of the following best explains")


def test_csv_benchmark_and_default_name(decontam: DecontamFilter) -> None:
    out = decontam.run([make_doc(_plant(GSM_Q0))])
    assert out.rejected[0].reason == "contaminated:gsm8k_mini"


def test_partial_overlap_below_the_ratio_is_kept(decontam: DecontamFilter) -> None:
    # One 13-gram in common with a 29-word item: flagged as a candidate, not confirmed.
    words = GSM_Q0.split()
    text = TEXTBOOK + "\n\n" + " ".join(words[:13]) + " and that is all we know about it."
    out = decontam.run([make_doc(text)])
    assert len(out.kept) == 1


def test_short_items_are_matched_whole_and_tiny_items_skipped(tmp_path: Path) -> None:
    bench = tmp_path / "tiny.jsonl"
    rows = [
        {"question": "Name the gas that plants release during photosynthesis."},  # 8 words
        {"question": "What is 2 + 2?"},  # too short to be distinctive
    ]
    bench.write_text("\n".join(json.dumps(r) for r in rows))
    index = build_index(DecontamSettings(benchmarks=[str(bench)]))
    assert len(index) == 1 and index.skipped == 1
    hit = index.find(TEXTBOOK + " Name the gas that plants release during photosynthesis!")
    assert hit is not None and hit.ngram == 8
    assert index.find(TEXTBOOK + " What is 2 + 2?") is None


def test_parquet_with_nested_choices_and_named_fields(tmp_path: Path) -> None:
    table = pa.table(
        {
            "id": ["arc-1"],
            "stem": ["Which property of a mineral can be determined just by looking at it?"],
            "choices": [
                {
                    "text": ["luster of the mineral surface in bright daylight", "mass", "weight"],
                    "label": ["A", "B", "C"],
                }
            ],
        }
    )
    path = tmp_path / "arc.parquet"
    pq.write_table(table, path)
    items = load_benchmark(str(path), ["stem", "choices"])
    assert [i.field for i in items] == ["stem", "choices"]
    assert "luster of the mineral surface" in items[1].text
    index = BenchmarkIndex(items, n=13, min_item_words=8)
    assert index.find("Quiz. " + items[0].text) is not None


def test_wrong_column_names_the_file_and_column(tmp_path: Path) -> None:
    with pytest.raises(FilterError, match=r"mmlu_mini\.jsonl: no column stem \(columns: question"):
        load_benchmark(str(MMLU), ["stem"])
    odd = tmp_path / "odd.csv"
    odd.write_text("id,body\n1,some text here\n")
    with pytest.raises(FilterError, match=r"odd\.csv: no text column found .*columns: id, body"):
        load_benchmark(str(odd))


def test_bad_benchmark_files(tmp_path: Path) -> None:
    with pytest.raises(FilterError, match="not found"):
        load_benchmark(str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "fine"}\n{not json\n')
    with pytest.raises(FilterError, match=r"bad\.jsonl:2: invalid JSON"):
        load_benchmark(str(bad))
    other = tmp_path / "bench.txt"
    other.write_text("question")
    with pytest.raises(FilterError, match="unknown benchmark format"):
        load_benchmark(str(other))
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really")
    with pytest.raises(FilterError, match=r"broken\.parquet: cannot read as parquet"):
        load_benchmark(str(broken))
    with pytest.raises(FilterError, match="expected hf:NAME:SPLIT"):
        load_benchmark("hf:only-a-name")


def test_huge_and_junk_documents(decontam: DecontamFilter) -> None:
    big = (TEXTBOOK + "\n") * 3000  # about 5 MB
    junk = bytes(range(256)).decode("latin-1") * 100
    planted_far = big + _plant(MMLU_Q0)
    out = decontam.run([make_doc(big, "big"), make_doc(junk, "junk"), make_doc(planted_far, "far")])
    assert [d.id for d in out.kept] == ["big", "junk"]
    assert out.rejected[0].id == "far"
    detail = out.details[0]
    assert detail is not None and planted_far[detail["start"] : detail["end"]] == detail["span"]
