"""The exported model generates where users run it: `booksmith train export` writes a tokenizer
that transformers loads and that encodes exactly as the token shards (shards/hf_tokenizer.py),
and a generation config; `pipeline("text-generation")` on the export writes new tokens."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from booksmith.shards.encodings import get_encoding
from booksmith.shards.hf_tokenizer import TokenizerExportError, onig_pattern, write_hf_tokenizer
from booksmith.shards.tokens import encode_batch
from booksmith.trainer import checkpoint
from booksmith.trainer.export import export_hf
from booksmith.trainer.model import ModelConfig, Phi, padded_vocab

ENCODINGS = ("cl100k_base", "smollm2")
N_TEXTS = 1_200

# --- varied texts, from a seeded generator -------------------------------------------------

_WHITESPACE = [" ", "  ", "\t", "\n", "\r\n", "\r", "\n\n", " \n ", "\x0b", "\x0c", "\xa0",
               "\u3000", "\u2028", "\u0085", "\u2009", "\u200b", "\t\t", "    "]  # fmt: skip
_CONTRACTIONS = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'LL", "'Re", "'ſ", "'K",
                 "n't", "'x", "''", "’s"]  # fmt: skip
_CASE_FOLDING = ["ſ", "K", "İ", "ı", "ß", "ẞ", "ﬆ", "ǅ", "Σσς", "ΐ"]
_SPECIAL = ["<|endoftext|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
            "<|endofprompt|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<file_sep>",
            "<|endoftext", "|>", "<|", "<|endoftext|><|endoftext|>"]  # fmt: skip
_CODE = [
    "def f(x):\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}\n",
    '{"key": [1, 2.5e-3, null], "k2": {"a": "b\\n"}}',
    "SELECT id, COUNT(*) FROM t WHERE x >= 10 GROUP BY id;",
    '#include <stdio.h>\nint main(void) { printf("%d\\n", 42); }',
    "x = [i**2 for i in range(10) if i % 2 == 0]\r\n",
    "$ ls -la | grep '.py$' && echo \"done\" >> log.txt",
    '<div class="a">&nbsp;&lt;tag&gt;</div>',
    "    \n    \n\tpass\n\n\n",
    "fn main() -> Result<(), Box<dyn Error>> { Ok(()) }",
]
_UNICODE_DIGITS = ["٣٤٥", "１２３", "²³", "Ⅻ", "৫", "߂", "〇", "½", "𝟘𝟙", "๑๒"]
_SCRIPTS = [
    (0x4E00, 0x9FFF),  # CJK
    (0x3040, 0x30FF),  # kana
    (0xAC00, 0xD7A3),  # Hangul
    (0x0400, 0x04FF),  # Cyrillic
    (0x0590, 0x05FF),  # Hebrew
    (0x0600, 0x06FF),  # Arabic
    (0x0900, 0x097F),  # Devanagari
    (0x0E00, 0x0E7F),  # Thai
    (0x1F300, 0x1FAFF),  # emoji
    (0x0300, 0x036F),  # combining marks alone
    (0x2000, 0x2BFF),  # punctuation, symbols, arrows
    (0x20000, 0x2A6DF),  # CJK extension B (4-byte UTF-8)
    (0xE000, 0xF8FF),  # private use
    (0x10000, 0x1000F),  # Linear B
]
_EMOJI = ["😀", "👍🏽", "👨‍👩‍👧‍👦", "🇫🇷", "❤️", "🏳️‍🌈", "1️⃣", "🤷‍♀️"]


def _word(rng: random.Random) -> str:
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    word = "".join(rng.choice(letters) for _ in range(rng.randint(1, 12)))
    if rng.random() < 0.2:  # accented letters, precomposed or with combining marks
        word += rng.choice(["é", "ñ", "ü", "e\u0301", "a\u0308\u0323", "o\u0338", "ø", "ł"])
    return word


def _piece(rng: random.Random) -> str:
    kind = rng.randrange(14)
    if kind <= 3:
        return _word(rng)
    if kind == 4:
        return rng.choice(_WHITESPACE) * rng.randint(1, 5)
    if kind == 5:
        return "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 40)))
    if kind == 6:
        return rng.choice(_CONTRACTIONS)
    if kind == 7:
        return rng.choice(_SPECIAL)
    if kind == 8:
        return rng.choice(_CODE)
    if kind == 9:
        lo, hi = rng.choice(_SCRIPTS)
        return "".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 8)))
    if kind == 10:
        return rng.choice(_EMOJI + _UNICODE_DIGITS + _CASE_FOLDING)
    if kind == 11:
        return "".join(rng.choice("!@#$%^&*()[]{}<>?/\\|`~-_=+;:'\",.…—–«»¿¡") for _ in
                       range(rng.randint(1, 6)))  # fmt: skip
    if kind == 12:  # any code point outside the surrogates
        c = rng.randint(0, 0x10FFFF)
        return chr(c) if not 0xD800 <= c <= 0xDFFF else "\ufffd"
    return rng.choice(["\x00", "\x01", "\x07", "\x1b", "\x7f", "\u200d", "\ufeff", "\ufffd"])


_FIXED = ["", " ", "\n", "a", "  \n", "a  \nb", "x   ", "   x", "\n\n\n", "1234567890" * 5,
          " 12 345 6789 ", "don't I'LL we'VE", "<|endoftext|>", " <|endoftext|> ",
          "hello\t\tworld\r\n", "🙂" * 10, "日本語の文章です。", "a" * 3000, "ab" * 1500,
          "the " * 500]  # fmt: skip


def texts(n: int = N_TEXTS, seed: int = 20) -> list[str]:
    """`n` texts: fixed edge cases, then random mixes of the pieces above, some long."""
    rng = random.Random(seed)
    out = list(_FIXED)
    while len(out) < n:
        k = rng.choice([1, 2, 5, 10, 30, 200])
        sep = rng.choice(["", " ", ""])
        out.append(sep.join(_piece(rng) for _ in range(rng.randint(1, k))))
    return out


def lacking(name: str, items: list[str]) -> list[str]:
    """The texts with a byte the encoding has no token for: SmolLM2's vocabulary lacks 21
    single bytes (six control characters, the 0xF1/0xF2 lead bytes of U+40000-U+BFFFF); its
    encoding drops them as llama.cpp does (shards/encodings.py), and so must the tokenizer."""
    missing = set(getattr(get_encoding(name), "missing_bytes", b""))
    return [t for t in items if missing.intersection(t.encode("utf-8", "surrogatepass"))]


def shard_ids(name: str, items: list[str]) -> list[list[int]]:
    """Each text's token-shard row (booksmith's encoder), its final end-of-text dropped."""
    enc = get_encoding(name)
    with ThreadPoolExecutor(2) as pool:
        table = encode_batch(enc, [str(i) for i in range(len(items))], items, pool)
    rows = table.column("input_ids").to_pylist()
    assert all(r[-1] == enc.eot_token for r in rows)
    return [r[:-1] for r in rows]


def repaired(text: str) -> str:
    """booksmith's encoder (and tiktoken's) repairs lone surrogates to U+FFFD (a surrogate pair
    written as two code points becomes its character); a Hugging Face tokenizer refuses them."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


# --- the exported tokenizers ---------------------------------------------------------------


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf-tokenizers")
    return {n: _written(root / n, n) for n in ENCODINGS}


def _written(path: Path, name: str) -> Path:
    write_hf_tokenizer(name, path, model_max_length=2048)
    return path


def _auto_tokenizer(path: Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("name", ENCODINGS)
def test_exported_tokenizer_encodes_as_the_token_shards(
    name: str, hf_dirs: dict[str, Path]
) -> None:
    items = texts(N_TEXTS)
    if name == "smollm2":  # about a quarter of the texts need a byte SmolLM2 lacks
        assert len(lacking(name, items)) > N_TEXTS // 5
    expected = shard_ids(name, items)
    tok = _auto_tokenizer(hf_dirs[name])
    got = tok(items)["input_ids"]  # plain call: adds nothing, special strings are text
    bad = [(t, g, e) for t, g, e in zip(items, got, expected, strict=True) if g != e]
    assert not bad, f"{len(bad)} of {len(items)} texts differ; first: {bad[0]}"
    # single-text encode() agrees with the batch call, and decoding gives the text back (less
    # the bytes the vocabulary lacks, as booksmith's encoding decodes them)
    enc, odd = get_encoding(name), set(lacking(name, items))
    for text, ids in list(zip(items, expected, strict=True))[:300]:
        assert tok.encode(text) == ids
        assert tok.decode(ids) == (enc.decode(ids) if text in odd else text)
    assert odd.intersection(items[:300]) or name != "smollm2"


@pytest.mark.parametrize("name", ENCODINGS)
def test_special_token_strings_are_text_and_eot_is_eos(name: str, hf_dirs: dict[str, Path]) -> None:
    enc, tok = get_encoding(name), _auto_tokenizer(hf_dirs[name])
    text = "one<|endoftext|>two <|endoftext|>"
    assert tok(text)["input_ids"] == enc.encode(text, disallowed_special=())
    assert enc.eot_token not in tok(text)["input_ids"]
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == enc.eot_token
    assert tok.pad_token_id == enc.eot_token
    assert tok.decode([enc.eot_token]) == "<|endoftext|>"
    assert tok.decode([*enc.encode("hi"), enc.eot_token], skip_special_tokens=True) == "hi"


@pytest.mark.parametrize("name", ENCODINGS)
def test_lone_surrogates_are_repaired_as_booksmith_does(
    name: str, hf_dirs: dict[str, Path]
) -> None:
    """Lone surrogates: booksmith's shards hold U+FFFD in their place (and a pair written as two
    code points as its character); the Hugging Face tokenizer refuses such a text, so the
    caller repairs it the same way and gets the shard's ids."""
    rng = random.Random(7)
    base = texts(60, seed=3)
    items = [
        t[: (i := rng.randrange(len(t) + 1))] + rng.choice(["\ud800", "\udfff", "\udc00x",
                 "\ud83d\ude00", "\ude00\ud83d"]) + t[i:]
        for t in base
    ]  # fmt: skip
    expected = shard_ids(name, items)
    tok = _auto_tokenizer(hf_dirs[name])
    assert tok([repaired(t) for t in items])["input_ids"] == expected
    assert "\ufffd" in repaired("a\ud800b") and repaired("\ud83d\ude00") == "😀"
    with pytest.raises((TypeError, UnicodeEncodeError)):
        tok("a\ud800b")


def test_possessive_quantifiers_and_end_anchor_are_rewritten() -> None:
    assert onig_pattern(r"\p{N}{1,3}+|\p{L}++|a?+b*+|\s++$") == r"\p{N}{1,3}|\p{L}+|a?b*|\s+\z"
    assert onig_pattern(r"[+$]+|a+?|\$|\++") == r"[+$]+|a+?|\$|\++"  # literals stay
    pat = get_encoding("smollm2")._pat_str
    assert onig_pattern(pat) == pat  # nothing to rewrite


# --- the exported model --------------------------------------------------------------------


def _checkpoint(tmp_path: Path, encoding: str | None, n_vocab: int, eot: int | None) -> Path:
    cfg = ModelConfig(
        vocab_size=padded_vocab(n_vocab), n_layer=2, n_head=2, n_embd=32, max_seq_len=64
    )
    torch.manual_seed(0)
    model = Phi(cfg)
    meta = {"model": cfg.to_dict(), "encoding": encoding, "n_vocab": n_vocab, "eot_token": eot}
    return checkpoint.save(tmp_path / "run", 1, model.state_dict(), {"step": 1}, meta)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    tmp = tmp_path_factory.mktemp("export")
    ckpt = _checkpoint(tmp, "smollm2", 49152, 0)
    yield export_hf(ckpt, tmp / "hf")


def test_exported_model_generates_with_pipeline(exported: Path) -> None:
    names = sorted(p.name for p in exported.iterdir())
    for f in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
              "tokenizer_config.json", "special_tokens_map.json"):  # fmt: skip
        assert f in names
    model = transformers.AutoModelForCausalLM.from_pretrained(exported)
    tok = transformers.AutoTokenizer.from_pretrained(exported)
    gen = transformers.pipeline("text-generation", model=model, tokenizer=tok, device="cpu")
    prompt = "A triangle has three sides."
    out = gen(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert out.startswith(prompt) and len(out) > len(prompt)
    # the new text is the decoding of new token ids after the prompt's
    prompt_ids = tok(prompt, return_tensors="pt")["input_ids"]
    ids = model.generate(prompt_ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)[0]
    assert ids.shape[0] == prompt_ids.shape[1] + 8
    assert ids[: prompt_ids.shape[1]].tolist() == prompt_ids[0].tolist()
    assert out == prompt + tok.decode(ids[prompt_ids.shape[1] :])


def test_eos_agrees_in_tokenizer_config_and_generation_config(exported: Path) -> None:
    config = json.loads((exported / "config.json").read_text())
    generation = json.loads((exported / "generation_config.json").read_text())
    tok = transformers.AutoTokenizer.from_pretrained(exported)
    eot = get_encoding("smollm2").eot_token
    assert tok.eos_token_id == config["eos_token_id"] == generation["eos_token_id"] == eot
    assert tok.pad_token_id == config["pad_token_id"] == generation["pad_token_id"] == eot
    loaded = transformers.GenerationConfig.from_pretrained(exported)
    assert loaded.eos_token_id == eot and loaded.pad_token_id == eot


def test_an_encoding_without_a_tokenizer_is_one_line(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from booksmith.flows.cli import app

    ckpt = _checkpoint(tmp_path, "bytes", 256, 0)
    with pytest.raises(TokenizerExportError, match=r"encoding 'bytes' cannot be exported"):
        export_hf(ckpt, tmp_path / "x")
    res = CliRunner().invoke(app, ["train", "export", str(ckpt), str(tmp_path / "hf")])
    assert res.exit_code == 2, res.output
    assert "encoding 'bytes'" in res.output and "--no-tokenizer" in res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1
    res = CliRunner().invoke(
        app, ["train", "export", str(ckpt), str(tmp_path / "hf"), "--no-tokenizer"]
    )
    assert res.exit_code == 0, res.output
    assert not (tmp_path / "hf" / "tokenizer.json").exists()
    assert (tmp_path / "hf" / "generation_config.json").is_file()
    # a checkpoint that names no encoding can be given one
    ckpt = _checkpoint(tmp_path / "old", None, 100277, 100257)
    res = CliRunner().invoke(
        app, ["train", "export", str(ckpt), str(tmp_path / "hf2"), "--encoding", "cl100k_base"]
    )
    assert res.exit_code == 0, res.output
    assert (tmp_path / "hf2" / "tokenizer.json").is_file()
