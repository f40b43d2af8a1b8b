"""Dedup: normalisation, datasketch-compatible signatures, LSH accuracy against exact Jaccard,
the keep rule, bad input, and the filters in a chain."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from datasketch import MinHash, MinHashLSH

from booksmith.filters import run_chain
from booksmith.filters.dedup import (
    DedupSettings,
    ExactDedup,
    MinHashDedup,
    find_duplicates,
    signatures,
    to_lean,
)
from booksmith.filters.dedup.cluster import resolve
from booksmith.filters.dedup.engine import index_entries
from booksmith.filters.dedup.lsh import band_keys, candidate_pairs, verified_pairs
from booksmith.filters.dedup.minhash import MinHashParams, shingle_hash
from booksmith.filters.dedup.normalize import normalized_text, words
from booksmith.schemas import Document
from tests.dedup_corpus import exact_jaccard, make_corpus
from tests.filters_helpers import document


def doc(id: str, text: str, quality: float | None = None) -> Document:
    return document(id, text, quality_score=quality)


# -- normalisation


def test_normalisation_folds_case_punctuation_width_and_whitespace() -> None:
    assert normalized_text("Hello,   WORLD!\n\tIt's\u00a0fine…") == "hello world it s fine"
    assert normalized_text("Ｆｕｌｌｗｉｄｔｈ ﬁ ①") == "fullwidth fi 1"  # NFKC
    assert normalized_text("snake_case+x=y") == "snake case x y"
    assert normalized_text("  ...  ") == ""


def test_ascii_fast_path_matches_unicode_path() -> None:
    from booksmith.filters.dedup.normalize import unicode_words

    rng = random.Random(3)
    alphabet = [chr(c) for c in range(128)]
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        assert words(text) == unicode_words(text), repr(text)


def test_spaceless_scripts_split_into_characters_and_others_keep_words() -> None:
    assert words("中文文本") == [c.encode() for c in "中文文本"]
    assert words("Привет, МИР") == ["привет".encode(), "мир".encode()]
    assert words("नमस्ते दुनिया") == ["नमस्ते".encode(), "दुनिया".encode()]  # marks stay in words


# -- signatures


def test_signatures_equal_datasketch_minhash_with_the_same_hash() -> None:
    texts = [
        "The quick brown fox jumps over the lazy dog, again and again and again.",
        "two words",
        "",
        "Ein schöner Tag, nicht wahr? 中文文本测试一下",
        "x " * 5000,
    ]
    ws = [words(t) for t in texts]
    sigs, has_sig = signatures(ws)
    assert has_sig.tolist() == [True, True, False, True, True]
    for w, sig, has in zip(ws, sigs, has_sig, strict=True):
        if not has:
            continue
        shingles = [tuple(w[i : i + 5]) for i in range(len(w) - 4)] or [tuple(w)]
        m = MinHash(num_perm=112, seed=1, hashfunc=shingle_hash)
        m.update_batch(shingles)
        assert np.array_equal(m.hashvalues, sig)


def test_lean_minhash_works_in_datasketch_lsh() -> None:
    corpus = make_corpus(20, 10, words_per_doc=150, seed=5, max_rate=0.02)
    sigs, _ = signatures([words(t) for t in corpus.texts])
    lsh = MinHashLSH(num_perm=112, params=(14, 8))
    for i, sig in enumerate(sigs[:20]):
        lsh.insert(i, to_lean(sig))
    for base, variant, _j in corpus.pairs:
        assert base in lsh.query(to_lean(sigs[variant]))


def test_near_duplicates_found_unrelated_documents_not() -> None:
    base = " ".join(f"word{i % 97} item{i}" for i in range(300))
    near = base.replace("item150", "changed").replace("item20 ", "other ")
    other = " ".join(f"thing{i} stuff{i % 13}" for i in range(300))
    verdicts = find_duplicates(["a", "b", "c"], [base, near, other])
    assert verdicts[0] is None and verdicts[2] is None
    assert verdicts[1] is not None
    assert (verdicts[1].reason, verdicts[1].duplicate_of) == ("dedup_minhash", "a")


# -- accuracy against exact Jaccard (the test)


def test_accuracy_against_exact_jaccard() -> None:
    """Recall >= 0.95 on pairs with J >= 0.85; precision >= 0.95 with J < 0.6 counted false."""
    corpus = make_corpus(400, 1200, words_per_doc=300, seed=11)
    params = MinHashParams()
    sigs, _ = signatures([words(t) for t in corpus.texts], params)
    candidates = candidate_pairs(band_keys(sigs, params.bands, params.rows))
    flagged = verified_pairs(sigs, candidates, params.band_threshold)
    flagged_set = {(int(a), int(b)) for a, b in flagged}
    high = [(b, v) for b, v, j in corpus.pairs if j >= 0.85]
    assert len(high) > 150
    recall = sum((min(b, v), max(b, v)) in flagged_set for b, v in high) / len(high)
    truth = [exact_jaccard(corpus.texts[a], corpus.texts[b]) for a, b in flagged_set]
    precision = sum(j >= 0.6 for j in truth) / len(truth)
    assert recall >= 0.95, recall
    assert precision >= 0.95, precision
    # Banding alone flags low-similarity pairs the check removes.
    low_candidates = sum(
        1
        for a, b in candidates.tolist()
        if (a, b) not in flagged_set and exact_jaccard(corpus.texts[a], corpus.texts[b]) < 0.6
    )
    assert low_candidates > 0
    # End to end: every dropped document's kept twin is truly similar.
    verdicts = find_duplicates(corpus.ids, corpus.texts, settings=DedupSettings(exact=False))
    index_of = {d: i for i, d in enumerate(corpus.ids)}
    dropped = [(i, index_of[v.duplicate_of]) for i, v in enumerate(verdicts) if v]
    bad = sum(exact_jaccard(corpus.texts[i], corpus.texts[k]) < 0.6 for i, k in dropped)
    assert bad / len(dropped) <= 0.05


# -- keep rule and exact dedup


def test_keep_rule_highest_quality_then_earliest() -> None:
    assert resolve(4, [(0, 1), (1, 2)], [0.1, 0.9, 0.9, None]) == {0: 1, 2: 1}
    assert resolve(3, [(1, 2), (0, 2)], [None, None, None]) == {1: 0, 2: 0}
    assert resolve(3, [(0, 1)], [None, 0.2, None]) == {0: 1}  # a score beats none
    assert resolve(3, [(0, 1)], [float("nan"), None, None]) == {1: 0}  # NaN counts as none


def test_exact_dedup_on_normalised_text_keeps_best_scored() -> None:
    docs = [
        doc("a", "Hello, World!", 0.2),
        doc("b", "hello world", 0.7),
        doc("c", "HELLO   WORLD.", None),
        doc("d", "something else"),
    ]
    out = ExactDedup().run(docs)
    assert [d.id for d in out.kept] == ["b", "d"]
    assert {(r.id, r.reason, r.duplicate_of) for r in out.rejected} == {
        ("a", "dedup_exact", "b"),
        ("c", "dedup_exact", "b"),
    }


def test_filters_in_a_chain_count_reasons() -> None:
    body = " ".join(f"lesson {i} explains topic {i % 7} in detail" for i in range(60))
    docs = [
        doc("1", body),
        doc("2", body.upper()),  # exact after normalisation
        doc("3", body.replace("lesson 30 ", "chapter 30 ")),  # near
        doc("4", "A different text entirely, " * 3),
        doc("5", ""),
    ]
    result = run_chain(docs, [ExactDedup(), MinHashDedup()])
    assert [d.id for d in result.kept] == ["1", "4", "5"]
    assert result.counts["dedup_exact"] == {"input": 5, "kept": 4, "dedup_exact": 1}
    assert result.counts["dedup_minhash"] == {"input": 4, "kept": 3, "dedup_minhash": 1}
    assert {r.id: r.duplicate_of for r in result.rejected} == {"2": "1", "3": "1"}


# -- bad input


def test_bad_input_has_defined_outcomes() -> None:
    ids = ["empty", "empty2", "punct", "short", "short2", "cjk", "cjk2", "ru", "ru2"]
    cjk = "机器学习是人工智能的一个分支它使计算机能够从数据中学习" * 3
    ru = "Машинное обучение это раздел искусственного интеллекта " * 5
    texts = ["", "   ", "?!...", "Hi there", "hi, there!", cjk, cjk + "。", ru, ru + " новое"]
    verdicts = find_duplicates(ids, texts)
    by_id = dict(zip(ids, verdicts, strict=True))
    # Documents with no words are never dropped (the empty filter owns them).
    assert by_id["empty"] is None and by_id["empty2"] is None and by_id["punct"] is None
    assert by_id["short"] is None
    assert by_id["short2"] is not None and by_id["short2"].reason == "dedup_exact"
    assert by_id["cjk"] is None and by_id["cjk2"] is not None  # punctuation only differs
    assert by_id["ru"] is None
    assert by_id["ru2"] is not None and by_id["ru2"].reason == "dedup_minhash"


@pytest.mark.slow
def test_ten_megabyte_documents() -> None:
    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(50_000)]
    big = " ".join(vocab[i] for i in rng.integers(0, len(vocab), size=1_500_000))
    assert len(big) > 10_000_000
    twin = big[: len(big) // 2] + " inserted words here " + big[len(big) // 2 :]
    verdicts = find_duplicates(["big", "twin", "small"], [big, twin, "a small document"])
    assert verdicts[0] is None and verdicts[2] is None
    assert verdicts[1] is not None and verdicts[1].duplicate_of == "big"


def test_settings_validate_and_pick_the_index(tmp_path: Path) -> None:
    from pydantic import ValidationError

    from booksmith.filters.dedup import FileIndex, open_index

    assert abs(DedupSettings().jaccard_threshold - (1 / 14) ** (1 / 8)) < 1e-12
    assert DedupSettings(threshold=0.8).jaccard_threshold == 0.8
    with pytest.raises(ValidationError, match="redis_url"):
        DedupSettings(index="redis")
    with pytest.raises(ValidationError, match="num_perm"):
        DedupSettings(bands=20, rows=8)
    with pytest.raises(ValidationError, match="extra"):
        DedupSettings.model_validate({"treshold": 0.8})
    assert open_index(DedupSettings(index="none"), tmp_path) is None
    index = open_index(DedupSettings(index_path=tmp_path / "elsewhere"), tmp_path)
    assert isinstance(index, FileIndex) and index.path == tmp_path / "elsewhere"


def test_no_documents_give_no_signatures_and_no_index_entries() -> None:
    # A run whose filters kept nothing still commits (nothing) to the index.
    sigs, has_sig = signatures([], MinHashParams())
    assert sigs.shape == (0, 112) and has_sig.shape == (0,)
    ids, sigs, exact = index_entries([], [])
    assert ids == [] and sigs.shape[0] == 0 and exact.shape[0] == 0
