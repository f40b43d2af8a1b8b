"""Judge corpora by the models they train: eval loss by tokens seen, across runs.

Each run directory holds run.json (data, eval set and its sha256) and metrics.jsonl (eval
records). Losses are comparable only on the same eval set and encoding; `compare_runs` says so
when they differ.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Comparison:
    runs: list[str]
    data: list[str]
    tokens: list[int]  # the union of eval points, ascending
    loss: dict[int, list[float | None]]  # tokens -> eval loss per run (None: not evaluated there)
    final: list[float | None]
    warnings: list[str] = field(default_factory=list)


def _read_run(run: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    info_path, metrics_path = run / "run.json", run / "metrics.jsonl"
    if not info_path.is_file() or not metrics_path.is_file():
        raise FileNotFoundError(f"{run}: not a training run (needs run.json and metrics.jsonl)")
    info = json.loads(info_path.read_text(encoding="utf-8"))
    records = []
    for n, line in enumerate(metrics_path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{metrics_path}:{n}: not JSON: {e.msg}") from None
    return info, [r for r in records if r.get("kind") == "eval"]


def compare_runs(runs: list[Path]) -> Comparison:
    infos, evals = zip(*(_read_run(r) for r in runs), strict=True)
    tokens = sorted({int(e["tokens"]) for ev in evals for e in ev})
    loss: dict[int, list[float | None]] = {t: [None] * len(runs) for t in tokens}
    for i, ev in enumerate(evals):
        for e in ev:
            loss[int(e["tokens"])][i] = float(e["eval_loss"])
    final = [ev[-1]["eval_loss"] if ev else None for ev in evals]
    warnings = []
    if len({i["eval"]["sha256"] for i in infos}) > 1:
        warnings.append("runs were evaluated on different eval sets: their losses do not compare")
    if len({i.get("encoding") for i in infos}) > 1:
        warnings.append("runs use different encodings: losses per token do not compare")
    return Comparison(
        [str(r) for r in runs], [i["data"] for i in infos], tokens, loss, final, warnings
    )
