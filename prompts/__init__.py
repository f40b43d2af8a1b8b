"""The prompt library: Jinja2 templates and the prompt axes (audiences, styles, formats) as data.

Templates render in a sandboxed environment with StrictUndefined, and are checked when the
library loads: a template that uses a variable the plan does not provide, or an axis field that
does not exist, fails then, naming the template and the variable. Topic text is passed as data,
never evaluated as template code.
"""

from __future__ import annotations

import logging
from functools import cache, cached_property, partial
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from jinja2 import StrictUndefined, Template, TemplateError, meta
from jinja2.sandbox import SandboxedEnvironment
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from booksmith.prompts.splice import Splice, make_splice, splice_blocker
from booksmith.schemas.config import format_validation_error

log = logging.getLogger(__name__)

__all__ = [
    "TEMPLATE_VARIABLES",
    "Audience",
    "Axes",
    "Format",
    "PromptError",
    "PromptLibrary",
    "Splice",
    "Style",
    "load_seed_words",
    "prompt_text",
    "render_prompt",
]

# What the plan passes to every template.
TEMPLATE_VARIABLES = frozenset(
    {"topic", "path", "subject", "audience", "style", "format", "seed_words", "covered"}
)


class PromptError(ValueError):
    """A template or axis file that cannot be used; the message names the file and key."""


class _Axis(BaseModel):
    """What every axis value has: its relative weight in a plan."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    weight: float = Field(default=1.0, gt=0)


class Audience(_Axis):
    reader: str = Field(min_length=1)
    depth: str = Field(min_length=1)
    vocabulary: str = Field(min_length=1)
    examples: str = Field(min_length=1)
    form: str = Field(min_length=1)


class Style(_Axis):
    instructions: str = Field(min_length=1)


class Format(_Axis):
    instructions: str = Field(min_length=1)
    rules: str = ""
    template: str = "textbook"
    subjects: list[str] | None = None  # only for topics of these subjects; None: every topic

    def applies_to(self, subject: str | None) -> bool:
        return self.subjects is None or subject in self.subjects


class Axes(BaseModel):
    model_config = ConfigDict(extra="forbid")

    audiences: dict[str, Audience] = Field(min_length=1)
    styles: dict[str, Style] = Field(min_length=1)
    formats: dict[str, Format] = Field(min_length=1)


def _package_dir() -> Path:
    return Path(str(resources.files("booksmith.prompts")))


def prompt_text(name: str) -> str:
    """A prompt kept as data beside the templates (e.g. `judge/edu-additive-v1.txt`), exactly
    as written: its text is part of every request id made with it."""
    return (_package_dir() / name).read_text(encoding="utf-8")


@cache
def _prompt_template(name: str) -> Template:
    env = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False)
    path = _package_dir() / name
    try:
        return env.from_string(path.read_text(encoding="utf-8"))
    except (OSError, TemplateError) as e:
        raise PromptError(f"{path}: cannot load prompt: {e}") from None


def render_prompt(name: str, **variables: Any) -> str:
    """A Jinja prompt kept as data (e.g. `expansion/subtopics.j2`), rendered sandboxed and
    strict: a variable the caller did not pass is an error naming it, not an empty string."""
    try:
        return _prompt_template(name).render(**variables).strip()
    except TemplateError as e:
        raise PromptError(f"prompt {name!r}: {e}") from None


def load_seed_words(path: Path | None = None) -> list[str]:
    """The bundled vocabulary of common English words (see the file's header for its source)."""
    path = path or _package_dir() / "seed_words.txt"
    words = [
        w.strip()
        for w in path.read_text(encoding="utf-8").splitlines()
        if w.strip() and not w.startswith("#")
    ]
    if not words:
        raise PromptError(f"{path}: no seed words")
    return words


class PromptLibrary:
    """Loads and checks the axes and templates; `render` turns one plan row into a prompt."""

    def __init__(self, axes_path: Path | None = None, templates_dir: Path | None = None) -> None:
        self.axes_path = axes_path or _package_dir() / "axes.yaml"
        self.templates_dir = templates_dir or _package_dir() / "templates"
        self.axes = self._load_axes(self.axes_path)
        self.env = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False)
        self._templates: dict[str, Template] = {}
        # Why a template must be rendered per request (None: it is spliced, prompts.splice).
        self.splice_blockers: dict[str, str | None] = {}
        for fmt in self.axes.formats.values():
            self._check(fmt.template)

    @staticmethod
    def _load_axes(path: Path) -> Axes:
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as e:
            raise PromptError(f"{path}: cannot read prompt axes: {e}") from None
        try:
            return Axes.model_validate(data)
        except ValidationError as e:
            raise PromptError(format_validation_error(e, str(path))) from None

    def _source(self, name: str) -> tuple[Path, str]:
        path = self.templates_dir / f"{name}.j2"
        try:
            return path, path.read_text(encoding="utf-8")
        except FileNotFoundError:
            available = sorted(p.stem for p in self.templates_dir.glob("*.j2"))
            raise PromptError(
                f"no template {name!r} in {self.templates_dir}; available: {available}"
            ) from None

    def _check(self, name: str) -> Template:
        """Compile a template once, and prove it renders with every axis value."""
        if name in self._templates:
            return self._templates[name]
        path, source = self._source(name)
        try:
            tree = self.env.parse(source)
            unknown = meta.find_undeclared_variables(tree) - TEMPLATE_VARIABLES
            if unknown:
                raise PromptError(
                    f"{path}: template {name!r} uses undefined variable(s) {sorted(unknown)}; "
                    f"templates get {sorted(TEMPLATE_VARIABLES)}"
                )
            template = self.env.from_string(source)
            blocker = self.splice_blockers[name] = splice_blocker(tree)
            if blocker:
                log.info("%s: rendered for each request, not spliced (%s)", path, blocker)
            for audience in self.axes.audiences.values():  # catches unknown axis fields
                for fmt in self.axes.formats.values():
                    template.render(self._sample_vars(audience=audience, format=fmt))
        except TemplateError as e:
            raise PromptError(f"{path}: template {name!r}: {e}") from None
        self._templates[name] = template
        return template

    def _sample_vars(self, **overrides: Any) -> dict[str, Any]:
        axes = self.axes
        values: dict[str, Any] = {
            "topic": "Topic",
            "path": ["Subject", "Area"],
            "subject": "Subject",
            "audience": next(iter(axes.audiences.values())),
            "style": next(iter(axes.styles.values())),
            "format": next(iter(axes.formats.values())),
            "seed_words": ["word"],
            "covered": ["Another topic"],
        }
        values.update(overrides)
        return values

    @cached_property
    def template_names(self) -> list[str]:
        return sorted({f.template for f in self.axes.formats.values()})

    def render(self, template: str, **variables: Any) -> str:
        """Render a template; every variable is plain data."""
        compiled = self._check(template)
        try:
            return compiled.render(**variables).strip()
        except TemplateError as e:
            raise PromptError(f"template {template!r}: {e}") from None

    def splice(self, template: str, **variables: Any) -> Splice | None:
        """`template` rendered once for these axis values and the shape of the per-request
        values (prompts.splice); None when it must be rendered for each request instead."""
        self._check(template)
        if self.splice_blockers[template]:
            return None
        return make_splice(partial(self.render, template), variables)
