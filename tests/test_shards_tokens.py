"""Encodings available offline (cl100k_base, SmolLM2 from the GGUF, supplied .tiktoken files)
and the threaded token-shard writer."""

from __future__ import annotations

import hashlib
import pickle
import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import tiktoken

from booksmith.shards.encodings import (
    EncodingUnavailable,
    decoded_bytes,
    get_encoding,
    token_dtype,
)
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


# SmolLM2's GGUF vocabulary has no token for these single bytes: six control characters, and
# 0xF1/0xF2, the lead bytes of U+40000-U+BFFFF (0xC0, 0xC1, 0xF5-0xFF never occur in UTF-8)
ODD = ["\x04", "\x06", "\x13", "\x14", "\x16", "\x1d", "\U00040000", "\U0007ffff",
       "\U00080000", "\U000bffff", "\U00065432", "\U000a1234"]  # fmt: skip
NEIGHBOURS = ["\x03", "\x05", "\x1c", "\x1e", "\x1f", "\U0003ffff", "\U000c0000", "\U0010ffff"]


def odd_texts(n: int, seed: int = 0) -> list[str]:
    """Texts with the bytes SmolLM2 lacks, next to words, digits, spaces, punctuation."""
    rng = random.Random(seed)
    alphabet = ALPHABET + ODD * 4 + NEIGHBOURS
    fixed = [*ODD, "".join(ODD), "a\x04b", "a \x04 b", "\x04!!", "12\x1d34", " \U00040000x",
             "don\x13't", "\x16\n\n", "\t\x06\t", "日本\x14語", "😀\U000bffff😀"]  # fmt: skip
    return fixed + [
        "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(n)
    ]


def varied(n: int, seed: int = 0) -> list[str]:
    """Any code point (outside the surrogates), mixed with words, digits and whitespace."""
    rng = random.Random(seed)

    def piece() -> str:
        kind = rng.randrange(4)
        if kind == 0:  # mostly the Basic Multilingual Plane, sometimes any plane
            c = rng.randint(0, rng.choice([0xFFFF, 0xFFFF, 0xFFFF, 0x10FFFF]))
            return chr(c) if not 0xD800 <= c <= 0xDFFF else "x"
        if kind == 1:
            return chr(rng.randint(0, 0x7F))
        return rng.choice(ALPHABET)

    return ["".join(piece() for _ in range(rng.randint(1, 80))) for _ in range(n)]


def test_smollm2_is_total_and_drops_what_llama_cpp_drops() -> None:
    """Every text encodes; a byte the vocabulary lacks is dropped exactly as llama.cpp drops it
    (its tokenizer gives no id for it and keeps every other token), and decoding gives the text
    back less those bytes."""
    import llama_cpp

    from booksmith.generation.embedded.model import bundled_gguf

    llm = llama_cpp.Llama(model_path=str(bundled_gguf()), vocab_only=True, verbose=False)
    enc = get_encoding("smollm2")
    assert enc.missing_bytes == bytes([0x04, 0x06, 0x13, 0x14, 0x16, 0x1D, 0xC0, 0xC1, 0xF1,
                                       0xF2, *range(0xF5, 0x100)])  # fmt: skip
    texts = odd_texts(1_500) + varied(500, seed=1)
    assert sum(bool(set(enc.missing_bytes) & set(t.encode())) for t in texts) > 1_000
    mismatches = []
    for t in texts:
        ids = enc.encode_ordinary(t)
        if ids != llm.tokenize(t.encode(), add_bos=False, special=False):
            mismatches.append(t)
        assert max(ids, default=0) < enc.n_vocab
        assert enc.decode_bytes(ids) == decoded_bytes(enc, t)
        assert enc.encode(t, disallowed_special=()) == ids
        assert enc.encode_to_numpy(t, disallowed_special=()).tolist() == ids
    assert not mismatches, [ascii(t) for t in mismatches[:5]]
    assert enc.encode_ordinary_batch(texts[:50], num_threads=2) == [
        enc.encode_ordinary(t) for t in texts[:50]
    ]
    # the six control characters vanish; a plane 4-11 character keeps its continuation bytes
    assert enc.encode_ordinary("a\x04b") == enc.encode_ordinary("a") + enc.encode_ordinary("b")
    assert enc.decode(enc.encode_ordinary("a\x04b\x1dc")) == "abc"
    assert enc.decode_bytes(enc.encode_ordinary("\U00040000")) == b"\x80\x80\x80"
    with pytest.raises(KeyError):
        enc.encode_single_token("\x04")
    # pickled (as process pools do) it is the same total encoding
    again = pickle.loads(pickle.dumps(enc))
    assert again.n_vocab == 49_152 and again.encode_ordinary("a\x04b") == [81, 82]


def test_smollm2_fix_changes_no_ids_of_texts_that_encoded_before() -> None:
    """Texts without those bytes get the ids of the plain tiktoken build of the same ranks (the
    encoding before the fix), on a corpus of varied texts; with them, the plain build panics."""
    enc, plain = get_encoding("smollm2"), _plain("smollm2")
    missing = set(enc.missing_bytes)
    corpus = SAMPLES + adversarial(1_000, seed=3) + varied(2_000, seed=4) + odd_texts(300, seed=5)
    before = [t for t in corpus if not missing.intersection(t.encode())]
    assert len(before) > 1_500
    for t in before:
        assert enc.encode_ordinary(t) == plain.encode_ordinary(t)
        assert enc.encode(t, disallowed_special=()) == plain.encode(t, disallowed_special=())
        assert enc.decode(enc.encode_ordinary(t)) == t
    assert enc.token_byte_values() == [b for b in plain.token_byte_values()]
    with pytest.raises(BaseException, match="no entry found for key"):
        plain.encode_ordinary("a\x04b")  # the bug: tiktoken's core panics


def _plain(name: str) -> tiktoken.Encoding:
    """The encoding as tiktoken alone builds it from the same ranks (before the fix)."""
    enc = get_encoding(name)
    return tiktoken.Encoding(
        name=f"plain-{name}",
        pat_str=enc._pat_str,
        mergeable_ranks=enc._mergeable_ranks,
        special_tokens=enc._special_tokens,
    )


@pytest.mark.parametrize("name", ["cl100k_base", "smollm2"])
def test_a_million_whitespace_characters_encode(name: str) -> None:
    """tiktoken's split regex gives up on a whitespace run of about a million characters (a
    ValueError or a panic, depending on the call); such a text is encoded in pieces cut inside
    the run, and decodes back. A long run tiktoken manages keeps tiktoken's own ids."""
    enc, plain = get_encoding(name), _plain(name)
    texts = [
        "Title.\n" + " " * 1_050_000 + "word",
        "a" + " \t" * 520_000 + "1 b",
        "\u3000" * 1_000_100 + "x",
    ]
    for text in texts:
        for call in (plain.encode_ordinary, plain.encode_to_numpy):
            with pytest.raises(BaseException, match=r"Regex error|StackOverflow"):
                call(text)
        ids = enc.encode_ordinary(text)
        assert enc.decode_bytes(ids) == decoded_bytes(enc, text)
        assert enc.encode_to_numpy(text).tolist() == ids
        assert enc.encode(text, disallowed_special=()) == ids
    text = "Title.\n" + " " * 200_000 + "word \n\n" + "\t" * 70_000 + "x"  # tiktoken copes
    assert enc.encode_ordinary(text) == plain.encode_ordinary(text)


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


def test_token_shard_writer_takes_odd_documents(tmp_path: Path) -> None:
    """One odd document never stops a run (a byte SmolLM2 lacks, a lone surrogate, a million
    blanks): every document gets its row, and its tokens decode to its text less those bytes."""
    items = [(f"d{i}", t) for i, t in enumerate(adversarial(40, seed=6) + odd_texts(40, seed=7))]
    items.append(("surrogate", "lone \ud800 surrogate and \x04"))
    items.append(("blank", "a page\n" + " " * 1_050_000 + "\x04 then text"))  # regex gives up
    for name in ("smollm2", "cl100k_base"):
        enc = get_encoding(name)
        result = write_token_shards(items, enc, root=tmp_path, shard_rows=30, pack_seq_len=16)
        assert result.documents == len(items)
        rows = pq.read_table(tmp_path / "tokens" / name).to_pylist()
        assert [r["id"] for r in rows] == [i for i, _ in items]
        for row, (_, text) in zip(rows, items, strict=True):
            assert row["input_ids"][-1] == enc.eot_token
            assert enc.decode_bytes(row["input_ids"][:-1]) == decoded_bytes(enc, text)
        if name == "cl100k_base":  # a complete byte vocabulary drops nothing
            assert decoded_bytes(enc, "a\x04b") == b"a\x04b"
