"""Grounded-generation recipes as data: `recipes.yaml` names each recipe's template (in
`recipes/`) and the prompt axes it uses. Templates render sandboxed with StrictUndefined and are
checked when the library loads (an unknown variable, or an axis the recipe does not declare, is
an error naming the template); the passage is passed as data, never evaluated as template code.
A recipe's version is a digest of its template's text, so editing a template changes the
version every document written with it records.

A recipe may set its own output minimums (`min_tokens`, `min_words`): the length rules judge a
grounded document by its recipe's (filters/generation_artifacts.py, filters/gopher_quality.py),
and its requests ask for at least that many tokens; a recipe without one uses `filters:`.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import yaml
from jinja2 import StrictUndefined, Template, TemplateError, meta
from jinja2.sandbox import SandboxedEnvironment
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from booksmith.prompts import Axes, PromptError, _package_dir
from booksmith.schemas.config import format_validation_error

AxisName = Literal["audience", "style", "format"]
# What the grounded plan passes to a recipe's template, besides the axes it declares.
RECIPE_VARIABLES = frozenset({"passage", "title"})


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    template: str = Field(min_length=1)
    axes: list[AxisName] = Field(default_factory=list)
    origin: str = ""
    # The shortest output kept, in tokens (filters.artifacts.min_tokens when None) and words
    # (filters.gopher_quality.min_words when None): a distill or a list is shorter than a unit.
    min_tokens: int | None = Field(default=None, ge=0)
    min_words: int | None = Field(default=None, ge=0)


@lru_cache(maxsize=8)
def load_recipes(path: Path | None = None) -> dict[str, Recipe]:
    """The recipes of `path` (the bundled recipes.yaml by default), validated, templates not
    compiled: what the filters need to judge a document by its recipe."""
    return RecipeLibrary._load(path or _package_dir() / "recipes.yaml")


class RecipeLibrary:
    """The recipes, their compiled templates and versions; `render` makes one prompt."""

    def __init__(self, axes: Axes, path: Path | None = None, templates: Path | None = None):
        self.path = path or _package_dir() / "recipes.yaml"
        self.templates_dir = templates or _package_dir() / "recipes"
        self.axes = axes
        self.recipes = self._load(self.path)
        self.env = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False)
        self.compiled: dict[str, Template] = {}
        self.versions: dict[str, str] = {}
        for name, recipe in self.recipes.items():
            self._check(name, recipe)

    @staticmethod
    def _load(path: Path) -> dict[str, Recipe]:
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as e:
            raise PromptError(f"{path}: cannot read recipes: {e}") from None
        if not isinstance(data, dict) or not data:
            raise PromptError(f"{path}: expected a mapping of recipe name -> template, axes")
        try:
            return {str(k): Recipe.model_validate(v) for k, v in data.items()}
        except ValidationError as e:
            raise PromptError(format_validation_error(e, str(path))) from None

    def _check(self, name: str, recipe: Recipe) -> None:
        path = self.templates_dir / f"{recipe.template}.j2"
        try:
            source = path.read_text(encoding="utf-8")
        except OSError:
            raise PromptError(
                f"{self.path}: recipe {name!r}: no template {path} (recipes[].template)"
            ) from None
        allowed = RECIPE_VARIABLES | set(recipe.axes)
        try:
            unknown = meta.find_undeclared_variables(self.env.parse(source)) - allowed
            if unknown:
                raise PromptError(
                    f"{path}: uses {sorted(unknown)}, which recipe {name!r} does not get; "
                    f"declare an axis in {self.path.name} or use {sorted(allowed)}"
                )
            template = self.env.from_string(source)
            template.render(self._sample(recipe))  # catches unknown axis fields
        except TemplateError as e:
            raise PromptError(f"{path}: recipe {name!r}: {e}") from None
        self.compiled[name] = template
        self.versions[name] = hashlib.sha256(source.encode("utf-8")).hexdigest()[:12]

    def _sample(self, recipe: Recipe) -> dict[str, Any]:
        first = {
            "audience": next(iter(self.axes.audiences.values())),
            "style": next(iter(self.axes.styles.values())),
            "format": next(iter(self.axes.formats.values())),
        }
        return {"passage": "Text.", "title": "Title", **{a: first[a] for a in recipe.axes}}

    def check_names(self, names: list[str], where: str) -> None:
        """A routing table naming a recipe that does not exist fails before any planning."""
        for name in names:
            if name not in self.recipes:
                raise PromptError(
                    f"{where}: no recipe {name!r}; recipes: {sorted(self.recipes)} (in {self.path})"
                )

    def render(self, name: str, **variables: Any) -> str:
        try:
            return self.compiled[name].render(**variables).strip()
        except TemplateError as e:
            raise PromptError(f"recipe {name!r}: {e}") from None
