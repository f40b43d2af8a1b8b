"""MinHash signatures of word n-gram shingles, computed in bulk with numpy.

Rule (Broder 1997; the parameters are datatrove's MinHash defaults, used by Cosmopedia): the
shingles of a document are its word 5-grams after `normalize.words`; its signature is, for each of
112 permutations, the minimum permuted shingle hash. Default: 112 permutations, 14 bands x 8 rows.

Compatibility: the values are exactly datasketch's (>= 2.0, scheme "affine32") for
`MinHash(num_perm, seed, hashfunc=shingle_hash)` updated with the document's shingles, so
`to_lean` yields a datasketch `LeanMinHash` that its `MinHashLSH` and `jaccard` accept. What
differs is speed: words are hashed once each (BLAKE2b, cached), shingle hashes are combined from
word hashes with array arithmetic, and the permutations run over blocks of shingles at once.
There is no per-shingle Python loop.

Edge cases: a document with no words has no signature (`has_sig` False; dedup never drops it);
a document shorter than one shingle has one shingle, made of all its words.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from functools import cache
from itertools import chain
from typing import TYPE_CHECKING

import numpy as np

from booksmith.schemas.dedup_settings import MinHashParams

if TYPE_CHECKING:  # datasketch pulls in scipy: imported where used, so config loading stays quick
    from datasketch import LeanMinHash

SCHEME = "affine32"
_U64 = np.uint64
_MASK64 = (1 << 64) - 1
_MUL = 0x9E3779B97F4A7C15  # odd: combining word hashes stays a bijection in the last word
_BLOCK = 8192  # shingles per permutation block: 112 x 8192 uint32 (3.7 MB) stays in cache


class _WordHashes(dict[bytes, int]):
    """word -> stable 64-bit hash, computed once per distinct word."""

    def __missing__(self, word: bytes) -> int:
        value = int.from_bytes(hashlib.blake2b(word, digest_size=8).digest(), "little")
        if len(self) >= 4_000_000:  # bound memory on adversarial input (e.g. random tokens)
            self.clear()
        self[word] = value
        return value


_word_hashes = _WordHashes()


def _fmix64_int(h: int) -> int:
    h ^= h >> 33
    h = (h * 0xFF51AFD7ED558CCD) & _MASK64
    h ^= h >> 33
    h = (h * 0xC4CEB9FE1A85EC53) & _MASK64
    return h ^ (h >> 33)


def _fmix64(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> _U64(33))
    h *= _U64(0xFF51AFD7ED558CCD)
    h ^= h >> _U64(33)
    h *= _U64(0xC4CEB9FE1A85EC53)
    h ^= h >> _U64(33)
    return h


def _fmix32(h: np.ndarray) -> np.ndarray:
    # datasketch's affine32 scheme pre-mixes every input hash with MurmurHash3's finalizer.
    h = h ^ (h >> np.uint32(16))
    h *= np.uint32(0x85EBCA6B)
    h ^= h >> np.uint32(13)
    h *= np.uint32(0xC2B2AE35)
    h ^= h >> np.uint32(16)
    return h


def shingle_hash(shingle: Sequence[bytes]) -> int:
    """The 32-bit hash of one shingle (a sequence of normalised words): the scalar reference
    of what `signatures` computes in bulk, usable as datasketch's `hashfunc`."""
    h = 0
    for i, word in enumerate(shingle):
        w = _word_hashes[word]
        h = w if i == 0 else (h * _MUL + w) & _MASK64
    return _fmix64_int(h) >> 32


@cache
def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """datasketch's own affine permutation parameters (a, b) for this size and seed."""
    from datasketch import MinHash

    a, b = MinHash(num_perm=num_perm, seed=seed, scheme=SCHEME).permutations
    return a.astype(np.uint32), b.astype(np.uint32)


def shingle_hashes(docs: Sequence[list[bytes]], ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """All documents' shingle hashes (uint32, concatenated) and each document's count."""
    lengths = np.fromiter(map(len, docs), dtype=np.int64, count=len(docs))
    if not len(docs):  # (a run whose filters kept nothing)
        return np.empty(0, dtype=np.uint32), lengths
    total = int(lengths.sum())
    word_h = np.fromiter(
        map(_word_hashes.__getitem__, chain.from_iterable(docs)), dtype=_U64, count=total
    )
    # h_p = w_p * M^(n-1) + ... + w_{p+n-1}, for every start p (padding past the end).
    padded = np.concatenate([word_h, np.zeros(ngram - 1, dtype=_U64)])
    h = padded[:total].copy()
    for k in range(1, ngram):
        h *= _U64(_MUL)
        h += padded[k : k + total]
    # Keep the starts whose n-gram lies inside one document.
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    pos = np.arange(total, dtype=np.int64) - np.repeat(starts, lengths)
    last_start = np.repeat(lengths - ngram, lengths)
    shingles = _fmix64(h[pos <= last_start]) >> _U64(32)
    counts = np.maximum(lengths - ngram + 1, 0)
    short = np.flatnonzero((lengths > 0) & (lengths < ngram))
    if short.size:  # one shingle of all the words, spliced in at the document's place
        counts[short] = 1
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
        insert_at = offsets[short] - np.arange(short.size)
        values = [shingle_hash(docs[i]) for i in short.tolist()]
        shingles = np.insert(shingles, insert_at, np.array(values, dtype=_U64))
    return shingles.astype(np.uint32), counts


def signatures(
    docs: Sequence[list[bytes]], params: MinHashParams | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Signatures of word lists: (n, num_perm) uint32 and a bool mask of who has one."""
    params = params or MinHashParams()
    a, b = permutations(params.num_perm, params.seed)
    shingles, counts = shingle_hashes(docs, params.ngram)
    n = len(docs)
    sigs = np.full((n, params.num_perm), np.iinfo(np.uint32).max, dtype=np.uint32)
    has_sig = counts > 0
    owners = np.flatnonzero(has_sig)  # documents with >= 1 shingle, in order
    if owners.size == 0:
        return sigs, has_sig
    mixed = _fmix32(shingles)
    bounds = np.concatenate([[0], np.cumsum(counts[owners])])  # shingle range per owner
    # Permutations x shingles: each row is one permutation over a block of contiguous shingles,
    # so the multiply, add and per-document min all run along contiguous memory.
    out = np.empty((params.num_perm, _BLOCK), dtype=np.uint32)
    result = sigs[owners]
    total = int(bounds[-1])
    for c0 in range(0, total, _BLOCK):
        c1 = min(c0 + _BLOCK, total)
        block = out[:, : c1 - c0]
        np.multiply(a[:, None], mixed[None, c0:c1], out=block)
        block += b[:, None]
        d0 = int(np.searchsorted(bounds, c0, side="right")) - 1
        d1 = int(np.searchsorted(bounds[:-1], c1, side="left"))
        seg = np.maximum(bounds[d0:d1], c0) - c0
        partial = np.minimum.reduceat(block, seg, axis=1)
        np.minimum(result[d0:d1], partial.T, out=result[d0:d1])
    sigs[owners] = result
    return sigs, has_sig


def to_lean(sig: np.ndarray, params: MinHashParams | None = None) -> LeanMinHash:
    """One signature as a datasketch LeanMinHash."""
    from datasketch import LeanMinHash

    params = params or MinHashParams()
    return LeanMinHash(seed=params.seed, hashvalues=sig, scheme=SCHEME)
