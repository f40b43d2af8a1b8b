"""Text normalisation shared by exact and MinHash dedup.

Rule: Unicode NFKC, lowercase, then every run of characters that are not letters, marks or
digits (punctuation, symbols, whitespace, control characters, `_`) becomes one word boundary.
Han ideographs and kana each count as one word, since those scripts put no spaces between
words (without this a Chinese paragraph would be one "word" and never share a 5-gram). Other
scripts without spaces (Thai, Khmer, ...) stay one word per space-separated run: they dedup
exactly, and near-dedup only at the granularity of those runs.

Words are returned as UTF-8 bytes: word hashing (minhash.py) and the exact key both work on
bytes, and pure-ASCII text (the common case) takes a fast path through `bytes.translate` that
gives the same words as the Unicode path (a test checks it).
"""

from __future__ import annotations

import hashlib
import unicodedata

import regex

# ASCII fast path: A-Z -> a-z, a-z and 0-9 kept, every other byte -> space.
_ASCII_TABLE = bytes(
    (c + 32 if 65 <= c <= 90 else c) if (48 <= c <= 57 or 65 <= c <= 90 or 97 <= c <= 122) else 32
    for c in range(256)
)
_NON_WORD = regex.compile(r"[^\p{L}\p{M}\p{N}]+")
_SPACELESS = regex.compile(r"([\p{Han}\p{Hiragana}\p{Katakana}])")

# Bumped when the rule changes: a persistent index built with another version is refused.
NORMALIZER_VERSION = 1


def words(text: str) -> list[bytes]:
    """The normalised words of `text`, as UTF-8 bytes (empty for text with no words)."""
    if text.isascii():
        return text.encode("ascii").translate(_ASCII_TABLE).split()
    return unicode_words(text)


def unicode_words(text: str) -> list[bytes]:
    """The general path of `words`, for any text."""
    folded = unicodedata.normalize("NFKC", text).lower()
    # lower() can leave non-NFKC text (rare, e.g. some Greek): normalise once more.
    folded = unicodedata.normalize("NFKC", folded)
    spaced = _NON_WORD.sub(" ", folded)
    spaced = _SPACELESS.sub(r" \1 ", spaced)
    return spaced.encode("utf-8").split()


def normalized_text(text: str) -> str:
    """The normalised text: its words joined by single spaces."""
    return b" ".join(words(text)).decode("utf-8")


def exact_key(ws: list[bytes]) -> int:
    """A stable 64-bit key of normalised text (BLAKE2b; same on every machine and run)."""
    digest = hashlib.blake2b(b" ".join(ws), digest_size=8, person=b"bksm-exact").digest()
    return int.from_bytes(digest, "little")
