"""Encodings available offline (cl100k_base, SmolLM2 from the GGUF, supplied .tiktoken files)
and the threaded token-shard writer."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from booksmith.shards.encodings import EncodingUnavailable, get_encoding, token_dtype
from booksmith.shards.tokens import encode_batch, write_token_shards

SAMPLES = [
    "Photosynthesis converts light energy into chemical energy.",
    "def f(x):\n    return x ** 2  # square\n\n\nprint(f(12345))",
    "In 1999, 3.14159 and 1,000,000 were    spaced   out\t\tand\r\nnewlines.",
    "Emoji 😀🚀 and CJK 東京は日本の首都です。 Ünïcödé naïve café",
    "  leading spaces, trailing spaces   ",
    "<|endoftext|> <|im_start|> as text",
    "I'm sure they'll say we've done it, it's John's and they'd know. 'quoted'",
    "",
]

ALPHABET = list("abcXYZ 0123456789 \t\n'.,!?-_()[]{}<>|/\\\"") + list("éü東京😀ß") + ["  ", "'s"]


def adversarial(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 60))) for _ in range(n)]


def test_cl100k_base_offline() -> None:
    enc = get_encoding("cl100k_base")
    assert enc.name == "cl100k_base" and enc.n_vocab == 100_277
    assert enc.encode_ordinary("hello world") == [15339, 1917]
    assert token_dtype(enc).name == "uint32"


def test_smollm2_encoding_fits_uint16() -> None:
    enc = get_encoding("smollm2")
    assert enc.n_vocab == 49_152 and enc.eot_token == 0
    assert token_dtype(enc).name == "uint16"
    for text in SAMPLES:
        assert enc.decode(enc.encode_ordinary(text)) == text


def test_smollm2_matches_llama_cpp_tokenizer() -> None:
    """The tiktoken build of SmolLM2's BPE gives exactly llama.cpp's tokens."""
    import llama_cpp

    from booksmith.generation.embedded.model import bundled_gguf

    llm = llama_cpp.Llama(model_path=str(bundled_gguf()), vocab_only=True, verbose=False)
    enc = get_encoding("smollm2")
    texts = [t for t in SAMPLES if t] + adversarial(500)
    mismatches = [
        t
        for t in texts
        if enc.encode_ordinary(t) != llm.tokenize(t.encode(), add_bos=False, special=False)
    ]
    assert not mismatches, mismatches[:5]


def test_supplied_bpe_file_is_checked(tmp_path: Path) -> None:
    import tiktoken_ext

    bundled = Path(next(iter(tiktoken_ext.__path__))) / "data" / "cl100k_base.tiktoken"
    good = hashlib.sha256(bundled.read_bytes()).hexdigest()
    enc = get_encoding("cl100k_base", bpe_file=bundled, sha256=good)
    assert enc.encode_ordinary("hello world") == [15339, 1917]
    with pytest.raises(EncodingUnavailable, match="does not match"):
        get_encoding("cl100k_base", bpe_file=bundled, sha256="0" * 64)
    corrupt = tmp_path / "cl100k_base.tiktoken"
    corrupt.write_bytes(bundled.read_bytes()[:-10])
    with pytest.raises(EncodingUnavailable, match="not the file tiktoken expects"):
        get_encoding("cl100k_base", bpe_file=corrupt)
    with pytest.raises(EncodingUnavailable, match="not found"):
        get_encoding("o200k_base", bpe_file=tmp_path / "nope.tiktoken")


def test_unavailable_encodings_never_reach_the_network(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    import tiktoken.load

    def no_network(*args: object) -> bytes:
        raise AssertionError("tried the network")

    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    with pytest.raises(EncodingUnavailable, match="not available offline"):
        get_encoding("o200k_base")
    with pytest.raises(EncodingUnavailable, match="unknown encoding"):
        get_encoding("no_such_encoding")


def test_encode_batch_matches_tiktoken() -> None:
    enc = get_encoding()
    texts = SAMPLES + adversarial(200, seed=1) + ["\ud800 lone surrogate"]
    ids = [str(i) for i in range(len(texts))]
    with ThreadPoolExecutor(2) as pool:
        table = encode_batch(enc, ids, texts, pool)
    expected = enc.encode_ordinary_batch(texts, num_threads=2)
    rows = table.to_pylist()
    assert [r["id"] for r in rows] == ids
    for row, exp in zip(rows, expected, strict=True):
        assert row["input_ids"] == [*exp, enc.eot_token] and row["n_tokens"] == len(exp)


def test_token_shards_by_rows_and_empty_input(tmp_path: Path) -> None:
    enc = get_encoding("smollm2")
    items = [(f"d{i}", text) for i, text in enumerate(adversarial(95, seed=2))]
    result = write_token_shards(items, enc, root=tmp_path, shard_rows=40, batch_docs=30)
    assert [s.rows for s in result.shards] == [40, 40, 15]
    assert result.documents == 95
    table = pq.read_table(tmp_path / "tokens" / "smollm2")
    assert table.column("id").to_pylist() == [i for i, _ in items]
    assert sum(s.stored_tokens or 0 for s in result.shards) == result.text_tokens + 95

    empty = write_token_shards([], enc, root=tmp_path / "empty")
    assert len(empty.shards) == 1 and empty.shards[0].rows == 0
    assert pq.read_table(tmp_path / "empty" / "tokens" / "smollm2").num_rows == 0


def test_failed_write_leaves_no_partial_shard(tmp_path: Path) -> None:
    enc = get_encoding()

    def items() -> Iterator[tuple[str, str]]:
        for i in range(50):
            yield f"d{i}", "some text"
        raise RuntimeError("source died")

    with pytest.raises(RuntimeError):
        write_token_shards(items(), enc, root=tmp_path, shard_rows=20, batch_docs=10)
    names = sorted(p.name for p in (tmp_path / "tokens" / "cl100k_base").iterdir())
    assert names == ["part-00000.parquet", "part-00001.parquet"]  # complete shards only
