"""Does grounding help? Two corpora of equal tokens from the same subjects and the same model,
one written from topic titles and one grounded in source documents, each training the bundled
tiny model, compared on real held-out text (issue 18, point 7).

The real text ships with Python itself: `pydoc_data.topics`, the language reference's 79
topics (assert, assignment, for, ...). They are split in two by position: the even ones are the
grounded run's sources, and their titles are the topic-only run's seeds ("Python's assert
statement"), so both corpora cover the same subjects; the odd ones are the evaluation set,
never seen by either run. Each corpus is cut to the smaller one's token count (whole documents,
kept order), tokenized with `booksmith datasets tokenize`, and trained with the tiny config and
`data.eval_data` pointing at the held-out set's token shards; `booksmith train compare` reads
the losses.

With the embedded default model (SmolLM2-135M, a few dozen requests) this is a plumbing
check, not evidence either way: the model is small, the corpora tiny, and the tiny trainer
passes over them many times. Point `--config` at a run config with a real endpoint and raise
`--requests` for a measurement.

    python -m benchmarks.grounding_helps [--requests 24] [--seed 1] [--work build/grounding_helps]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import yaml

ROOT = Path(__file__).resolve().parent.parent


def booksmith(*args: object) -> str:
    cmd = [sys.executable, "-m", "booksmith", *[str(a) for a in args]]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout


def split_topics(work: Path) -> tuple[Path, Path, Path]:
    """sources.jsonl (even topics), topics.yaml (their titles), heldout.jsonl (odd topics)."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    sources, heldout = names[0::2], names[1::2]
    rows = [{"id": n, "text": topics[n], "license": "PSF-2.0"} for n in sources]
    (work / "sources.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    seeds = [{"topic": f"Python's {n.replace('-', ' ')}", "subject": "Computer science"}
             for n in sources]  # fmt: skip
    (work / "topics.yaml").write_text(yaml.safe_dump(seeds))
    held = [{"id": n, "text": topics[n]} for n in heldout]
    (work / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held))
    return work / "sources.jsonl", work / "topics.yaml", work / "heldout.jsonl"


def kept(out: Path) -> list[dict[str, object]]:
    (version,) = [p for p in out.iterdir() if (p / "manifest.json").is_file()]
    table = pq.read_table(version / "text", columns=["id", "text", "n_tokens"])
    return table.to_pylist()


def cut(rows: list[dict[str, object]], tokens: int, path: Path) -> int:
    """Whole documents in order up to `tokens`; returns the tokens written."""
    total, lines = 0, []
    for r in rows:
        n = int(r["n_tokens"])  # type: ignore[call-overload]
        if total + n > tokens:
            break
        total += n
        lines.append(json.dumps({"id": r["id"], "text": r["text"]}) + "\n")
    path.write_text("".join(lines))
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--config", help="run config (default: the embedded model)")
    ap.add_argument("--work", default="build/grounding_helps")
    args = ap.parse_args()
    work = (ROOT / args.work).resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    sources, seeds, heldout = split_topics(work)
    common = ["--limit", args.requests, "--seed", args.seed]
    common += ["--config", args.config] if args.config else []
    t0 = time.perf_counter()
    booksmith("run", "--topics", seeds, "--out", work / "topic", *common)
    booksmith("run", "--sources", sources, "--out", work / "grounded", *common)
    generated_s = time.perf_counter() - t0
    corpora = {name: kept(work / name) for name in ("topic", "grounded")}
    sizes = {name: sum(int(r["n_tokens"]) for r in rows) for name, rows in corpora.items()}  # type: ignore[call-overload]
    tokens = min(sizes.values())
    booksmith("datasets", "tokenize", heldout, "--out", work / "heldout-tok")
    config = yaml.safe_load((ROOT / "trainer" / "configs" / "tiny.yaml").read_text())
    config["data"]["eval_data"] = str(work / "heldout-tok")
    (work / "tiny-heldout.yaml").write_text(yaml.safe_dump(config))
    used = {}
    for name, rows in corpora.items():
        used[name] = cut(rows, tokens, work / f"{name}.jsonl")
        booksmith("datasets", "tokenize", work / f"{name}.jsonl", "--out", work / f"{name}-tok")
        booksmith("train", "--data", work / f"{name}-tok", "--config", work / "tiny-heldout.yaml",
                  "--out", work / "runs" / name)  # fmt: skip
    print(booksmith("train", "compare", work / "runs" / "topic", work / "runs" / "grounded"))
    final = {}
    for name in corpora:
        evals = [json.loads(line) for line in (work / "runs" / name / "metrics.jsonl").open()]
        final[name] = [e for e in evals if e.get("kind") == "eval"][-1]["eval_loss"]
    print(f"documents kept: {', '.join(f'{k} {len(v)}' for k, v in corpora.items())}; tokens "
          f"kept {sizes}, trained on {used}; generation {generated_s:.0f} s")  # fmt: skip
    print(
        f"RESULT grounding_helps:heldout_loss topic={final['topic']:.4f} "
        f"grounded={final['grounded']:.4f} tokens={tokens} requests={args.requests}"
    )


if __name__ == "__main__":
    main()
