"""Generation artifacts: truncated outputs, too few tokens, refusals, assistant boilerplate,
leftover chat-template tokens.

Sources: Cosmopedia (Ben Allal et al. 2024) dropped completions under 150 tokens and those cut
off by the token limit; refusal and boilerplate phrases are the ones instruction-tuned models
wrap their answers in ("As an AI language model", "I'm sorry, but", "Sure! Here's").

Rules (reason, default):
- `truncated:finish_length`             finish_reason == "length" (drop_truncated: true)
- `too_short:tokens`                    n_tokens < 150 (a grounded document: under its recipe's
                                        `min_tokens` in prompts/recipes.yaml, where it sets one)
- `quality_rule:chat_template_token`    any of <|im_start|>, <|im_end|>, <|endoftext|>, [INST], ...
- `refusal:<name>`                      a refusal pattern (as_an_ai, apology, cannot_help)
                                        within the first 300 characters
- `quality_rule:assistant_<name>`       an assistant preamble in the first 300 characters
                                        ("Sure! Here's ...": `preamble`; a text opening "Here's a
                                        textbook section on ...": `here_is`), or a sign-off ("I
                                        hope this helps": `sign_off`) anywhere
Patterns are case-insensitive regular expressions in the settings, named by their key.
"""

from __future__ import annotations

import re

from booksmith.filters.scored import RuleFilter, Verdict
from booksmith.prompts.recipes import load_recipes
from booksmith.schemas import Document
from booksmith.schemas.filter_settings import ArtifactSettings, FilterError


def _compile(key: str, patterns: dict[str, str]) -> list[tuple[str, re.Pattern[str]]]:
    compiled = []
    for name, pattern in patterns.items():
        try:
            compiled.append((name, re.compile(pattern, re.IGNORECASE | re.MULTILINE)))
        except re.error as e:
            raise FilterError(
                f"filters.artifacts.{key}.{name}: invalid regular expression: {e}"
            ) from None
    return compiled


class GenerationArtifactFilter(RuleFilter):
    name = "generation_artifacts"

    def __init__(
        self,
        settings: ArtifactSettings | None = None,
        recipe_min_tokens: dict[str, int] | None = None,
    ) -> None:
        self.settings = s = settings or ArtifactSettings()
        # recipe -> its own minimum (the bundled recipes' unless given)
        if recipe_min_tokens is None:
            recipes = load_recipes().items()
            recipe_min_tokens = {k: r.min_tokens for k, r in recipes if r.min_tokens is not None}
        self.recipe_min_tokens = recipe_min_tokens
        self._refusals = _compile("refusal_patterns", s.refusal_patterns)
        self._boilerplate = _compile("boilerplate_patterns", s.boilerplate_patterns)
        self._sign_offs = _compile("sign_off_patterns", s.sign_off_patterns)
        chat = "|".join(re.escape(t) for t in s.chat_tokens)
        self._chat = re.compile(chat) if s.chat_tokens else None

    def check(self, doc: Document) -> Verdict:
        s = self.settings
        if s.drop_truncated and doc.finish_reason == "length":
            return "truncated:finish_length", {"finish_reason": doc.finish_reason}
        if doc.recipe is not None and doc.recipe in self.recipe_min_tokens:
            minimum = self.recipe_min_tokens[doc.recipe]
            if doc.n_tokens < minimum:
                return "too_short:tokens", {
                    "tokens": doc.n_tokens,
                    "min": minimum,
                    "recipe": doc.recipe,
                }
        elif doc.n_tokens < s.min_tokens:
            return "too_short:tokens", {"tokens": doc.n_tokens, "min": s.min_tokens}
        text = doc.text
        if self._chat is not None and (m := self._chat.search(text)):
            return "quality_rule:chat_template_token", {"token": m.group(0), "at": m.start()}
        head = text[: s.head_chars]
        for name, pattern in self._refusals:
            if m := pattern.search(head):
                return f"refusal:{name}", {"match": m.group(0), "at": m.start()}
        for name, pattern in self._boilerplate:
            if m := pattern.search(head):
                return f"quality_rule:assistant_{name}", {"match": m.group(0), "at": m.start()}
        for name, pattern in self._sign_offs:
            if m := pattern.search(text):
                return f"quality_rule:assistant_{name}", {"match": m.group(0), "at": m.start()}
        return None
