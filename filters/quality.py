"""The educational-value classifier: a fastText supervised model trained on LLM judgements.

Source: Phi-1 (Gunasekar et al. 2023) trained a small classifier on GPT-4's educational-value
labels and ran it over the whole corpus; FineWeb-Edu (Penedo et al. 2024) did the same with
Llama-3-70B scores on a 0-5 additive rubric, calling a document educational at score >= 3.

Here: documents scored >= `label_threshold` (3) are the positive class; fastText learns it from
word unigrams and bigrams (`word_ngrams`=2; `bucket`=50,000 hashed bigram rows, `dim`=32, so a
model is a few MB where fastText's default 2M buckets would make it 800 MB). The filter sets
`quality_score` = P(educational) on every document and drops those under `threshold` (0.5):
reason `quality:below_threshold`.

A trained model is saved with a card (model.card.json and model.card.md beside model.bin):
data, rubric, judge, settings, held-out precision/recall/F1, size and sha256. Loading checks
the sha256 from the card, so a corrupt or truncated model is an error, not a crash.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from booksmith.filters import fasttext_model
from booksmith.filters.scored import ScoredOutput
from booksmith.schemas import Document
from booksmith.schemas.filter_settings import FilterError, QualitySettings
from booksmith.shards.files import file_sha256, replace_atomically

POSITIVE, NEGATIVE = "__label__edu", "__label__not_edu"
MODEL_FILE = "model.bin"
_PUNCT = re.compile(r"([^\w\s])")


def prepare(text: str, max_chars: int) -> str:
    """Lower case, punctuation split from words, one line (what fastText reads)."""
    return fasttext_model.one_line(_PUNCT.sub(r" \1 ", text[:max_chars].lower()), max_chars * 3)


def card_path(model_path: Path) -> Path:
    return model_path.with_name(model_path.stem + ".card.json")


class QualityModel:
    def __init__(self, path: Path, max_chars: int = 100_000) -> None:
        self.path = Path(path)
        self.max_chars = max_chars
        card = card_path(self.path)
        sha: str | None = None
        if card.is_file():
            try:
                sha = json.loads(card.read_text(encoding="utf-8"))["model"]["sha256"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise FilterError(f"{card}: corrupt model card (no model.sha256)") from None
        self.model: Any = fasttext_model.load(self.path, "quality", sha256=sha)
        labels = set(self.model.get_labels())
        if POSITIVE not in labels:
            raise FilterError(
                f"{self.path}: not a booksmith quality model (labels {sorted(labels)}, "
                f"expected {POSITIVE})"
            )

    def score(self, texts: Sequence[str]) -> list[float]:
        """P(educational) of each text."""
        if not texts:
            return []
        lines = [prepare(t, self.max_chars) for t in texts]
        labels, probs = self.model.predict(lines, k=-1)
        scores = []
        for labs, ps in zip(labels, probs, strict=True):
            by_label = dict(zip(labs, ps, strict=True))
            scores.append(float(min(1.0, by_label.get(POSITIVE, 0.0))))
        return scores


class QualityFilter:
    name = "quality"

    def __init__(self, model: QualityModel, threshold: float = 0.5) -> None:
        self.model = model
        self.threshold = threshold

    @classmethod
    def from_settings(cls, settings: QualitySettings, path: Path) -> QualityFilter:
        return cls(QualityModel(path, settings.max_chars), settings.threshold)

    def run(self, docs: Sequence[Document]) -> ScoredOutput:
        out = ScoredOutput()
        for doc, score in zip(docs, self.model.score([d.text for d in docs]), strict=True):
            doc = doc.model_copy(update={"quality_score": score})
            if score >= self.threshold:
                out.kept.append(doc)
            else:
                out.reject(
                    doc,
                    "quality:below_threshold",
                    detail={"score": round(score, 4), "threshold": self.threshold},
                )
        return out


# -- training -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Labelled:
    id: str
    text: str
    score: float  # the judge's 0-5 score (or any number; >= label_threshold is positive)


@dataclass
class Metrics:
    precision: float
    recall: float
    f1: float
    accuracy: float
    n: int
    positives: int


def in_holdout(key: str, fraction: float) -> bool:
    """A stable split: the same id is always on the same side."""
    h = int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:8], 16)
    return h / 0xFFFFFFFF < fraction


def evaluate(model: QualityModel, data: Sequence[Labelled], label_threshold: float) -> Metrics:
    scores = model.score([d.text for d in data])
    tp = fp = fn = tn = 0
    for d, s in zip(data, scores, strict=True):
        truth, pred = d.score >= label_threshold, s >= 0.5
        tp += truth and pred
        fp += pred and not truth
        fn += truth and not pred
        tn += not truth and not pred
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return Metrics(
        precision=round(precision, 4),
        recall=round(recall, 4),
        f1=round(f1, 4),
        accuracy=round((tp + tn) / len(data), 4) if data else 0.0,
        n=len(data),
        positives=tp + fn,
    )


@dataclass
class TrainReport:
    model_path: Path
    card: dict[str, Any]
    holdout: Metrics
    train: Metrics


_TRAIN = """
import json, sys
import fasttext
params = json.loads(sys.argv[1])
fasttext.train_supervised(**params).save_model(sys.argv[2])
"""


def _train_in_child(params: dict[str, Any], model_path: Path, source: str) -> None:
    """fastText training in a fresh process with zero-filled allocations.

    fasttext-numpy2 0.10.4's training reads heap memory it did not initialise (seen here: after
    the parent had allocated and freed large strings, the same data gave NaN or a useless
    model; with MALLOC_PERTURB_=165 always a useless one). A fresh process whose allocations
    glibc fills with zeros (MALLOC_PERTURB_=255: freed bytes 0xff, allocated bytes 0x00) trains
    the same model every time, and a crash there cannot take the caller down.
    """
    env = {**os.environ, "MALLOC_PERTURB_": "255"}
    proc = subprocess.run(
        [sys.executable, "-c", _TRAIN, json.dumps(params), str(model_path)],
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"]
        hint = " (lower filters.quality.lr)" if "NaN" in lines[-1] else ""
        raise FilterError(f"{source}: fastText training failed: {lines[-1]}{hint}")


def train(
    data: Sequence[Labelled],
    out_dir: Path,
    settings: QualitySettings | None = None,
    *,
    source: str = "",
    judge: str = "",
    rubric: str = "",
) -> TrainReport:
    """Train on a stable split of `data`, evaluate on its held-out part, save model and card."""
    s = settings or QualitySettings()
    rows = [d for d in data if d.text.strip()]
    holdout = [d for d in rows if in_holdout(d.id, s.holdout_fraction)]
    training = [d for d in rows if not in_holdout(d.id, s.holdout_fraction)]
    labels = {d.score >= s.label_threshold for d in training}
    if len(labels) < 2:
        raise FilterError(
            f"{source or 'training data'}: the training split has only "
            f"{'positive' if True in labels else 'negative'} examples "
            f"({len(training)} rows; scores >= {s.label_threshold} are positive): "
            "annotate more documents"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        train_file = Path(tmp) / "train.txt"
        with open(train_file, "w", encoding="utf-8") as f:
            for d in training:
                label = POSITIVE if d.score >= s.label_threshold else NEGATIVE
                f.write(f"{label} {prepare(d.text, s.max_chars)}\n")
        tmp_model = Path(tmp) / MODEL_FILE
        params = {
            "input": str(train_file),
            "epoch": s.epoch,
            "lr": s.lr,
            "dim": s.dim,
            "wordNgrams": s.word_ngrams,
            "bucket": s.bucket,
            "minCount": s.min_count,
            "loss": "softmax",
            "thread": 1,  # one thread: the same data gives the same model
            "seed": 0,
            "verbose": 0,
        }
        _train_in_child(params, tmp_model, source or "training data")
        model_path = out_dir / MODEL_FILE
        replace_atomically(tmp_model, model_path)
    sha = file_sha256(model_path)
    card = {
        "model": {
            "file": MODEL_FILE,
            "bytes": model_path.stat().st_size,
            "sha256": sha,
            "labels": [POSITIVE, NEGATIVE],
            "created_at": datetime.now(UTC).isoformat(),
        },
        "data": {
            "source": source,
            "rows": len(rows),
            "train": len(training),
            "holdout": len(holdout),
            "label_threshold": s.label_threshold,
        },
        "judge": judge,
        "rubric": rubric,
        "settings": s.model_dump(mode="json"),
    }
    card_file = card_path(model_path)
    # Write the card before evaluating: QualityModel checks the model against it.
    card_file.write_text(json.dumps(card, indent=2), encoding="utf-8")
    loaded = QualityModel(model_path, s.max_chars)
    train_metrics = evaluate(loaded, training, s.label_threshold)
    holdout_metrics = evaluate(loaded, holdout, s.label_threshold)
    card["metrics"] = {"holdout": asdict(holdout_metrics), "train": asdict(train_metrics)}
    card_file.write_text(json.dumps(card, indent=2), encoding="utf-8")
    model_path.with_name(model_path.stem + ".card.md").write_text(
        render_card(card), encoding="utf-8"
    )
    return TrainReport(model_path, card, holdout_metrics, train_metrics)


def render_card(card: dict[str, Any]) -> str:
    m, d = card["model"], card["data"]
    h = card["metrics"]["holdout"]
    return "\n".join(
        [
            "# booksmith educational-value classifier",
            "",
            "fastText supervised model: P(educational) of a document.",
            "",
            f"- file: `{m['file']}`, {m['bytes']:,} bytes, sha256 `{m['sha256']}`",
            f"- trained: {m['created_at']}",
            f"- data: {d['rows']} judged documents from `{d['source']}`; "
            f"{d['train']} train, {d['holdout']} held out; positive when score >= "
            f"{d['label_threshold']}",
            f"- judge: {card['judge'] or 'n/a'}",
            f"- held-out: precision {h['precision']}, recall {h['recall']}, F1 {h['f1']}, "
            f"accuracy {h['accuracy']} on {h['n']} documents ({h['positives']} positive)",
            "",
            "## Rubric",
            "",
            card["rubric"] or "n/a",
            "",
            "## Settings",
            "",
            "```json",
            json.dumps(card["settings"], indent=2),
            "```",
            "",
        ]
    )
