"""The final pass's primary token shards: written from the ids the run already counted
`n_tokens` with (since issue 14's "tokenized once") against encoding the text again (before).

Both sides write the same token shards (and packed rows) with `shards.tokens.TokenShardWriter`
from the same documents: `from_ids` turns each chunk's stored ids into token rows
(`with_end_of_text`), `from_text` encodes the text (`write_token_shards`, 2 threads, as the
run's final pass did). The ids themselves cost nothing extra in the run: the documents stage
encodes every text once anyway to count its tokens. Alternating, best of `--repeat`; MB of
UTF-8 text per second. The text: 4 KB documents of the Python standard library's sources.

    python -m benchmarks.tokens_from_ids [--mb 16] [--repeat 3]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow as pa

from benchmarks.tokenize_vs_tiktoken import make_texts
from booksmith.shards.encodings import get_encoding
from booksmith.shards.tokens import (
    BATCH_DOCS,
    TokenShardWriter,
    encode_texts,
    with_end_of_text,
    write_token_shards,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    enc = get_encoding("cl100k_base")
    texts = make_texts(int(args.mb * 1e6))
    ids = [f"d{i}" for i in range(len(texts))]
    mb = sum(len(t.encode()) for t in texts) / 1e6
    tokens = encode_texts(enc, texts)  # as the documents stage has them
    best = {"from_ids": float("inf"), "from_text": float("inf")}
    for _ in range(args.repeat):
        for side in best:
            root = Path(tempfile.mkdtemp(prefix="tokens-"))
            t0 = time.perf_counter()
            if side == "from_ids":
                # the spill's conversion to Arrow counts too: the run pays it for the ids
                out = TokenShardWriter(enc, root=root, pack_seq_len=2048)
                for i in range(0, len(texts), BATCH_DOCS):
                    part = pa.array(tokens[i : i + BATCH_DOCS], pa.list_(pa.uint32()))
                    out.add(with_end_of_text(enc, pa.array(ids[i : i + BATCH_DOCS]), part))
                out.close()
            else:
                write_token_shards(zip(ids, texts, strict=True), enc, root=root,
                                   num_threads=2, pack_seq_len=2048)  # fmt: skip
            best[side] = min(best[side], time.perf_counter() - t0)
            shutil.rmtree(root)
    rate = {k: mb / v for k, v in best.items()}
    print(f"{mb:.1f} MB of text, {sum(len(t) for t in tokens)} tokens, best of {args.repeat}: "
          + ", ".join(f"{k} {v:.2f} s" for k, v in best.items()))  # fmt: skip
    print(
        f"RESULT tokens_from_ids:from_text ratio={rate['from_ids'] / rate['from_text']:.2f} "
        f"from_ids={rate['from_ids']:.1f} from_text={rate['from_text']:.1f} unit=MB/s"
    )


if __name__ == "__main__":
    main()
