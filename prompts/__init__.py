"""The prompt library: Jinja2 templates and the prompt axes (audiences, styles, formats) as data.

Templates render in a sandboxed environment with StrictUndefined: a missing variable is an
error, and topic text is passed as data, never evaluated as template code.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from jinja2 import StrictUndefined, TemplateError, TemplateNotFound
from jinja2.sandbox import SandboxedEnvironment
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from schemas.config import format_validation_error

__all__ = ["Axes", "AxisValue", "PromptError", "PromptLibrary"]


class PromptError(ValueError):
    """A template or axis file that cannot be used; the message names the file and key."""


class AxisValue(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    weight: float = Field(default=1.0, gt=0)
    instructions: str = Field(min_length=1)


class Axes(BaseModel):
    model_config = ConfigDict(extra="forbid")

    audiences: dict[str, AxisValue] = Field(min_length=1)
    styles: dict[str, AxisValue] = Field(min_length=1)
    formats: dict[str, AxisValue] = Field(min_length=1)


def _package_dir() -> Path:
    return Path(str(resources.files("prompts")))


class PromptLibrary:
    """Loads the axes and templates; `render` turns one plan row into a prompt."""

    def __init__(self, axes_path: Path | None = None, templates_dir: Path | None = None) -> None:
        self.axes_path = axes_path or _package_dir() / "axes.yaml"
        self.templates_dir = templates_dir or _package_dir() / "templates"
        self.axes = self._load_axes(self.axes_path)
        self.env = SandboxedEnvironment(
            loader=None, undefined=StrictUndefined, autoescape=False, keep_trailing_newline=False
        )

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

    def template_source(self, name: str) -> str:
        path = self.templates_dir / f"{name}.j2"
        try:
            return path.read_text(encoding="utf-8")
        except FileNotFoundError:
            available = sorted(p.stem for p in self.templates_dir.glob("*.j2"))
            raise PromptError(
                f"no template {name!r} in {self.templates_dir}; available: {available}"
            ) from None

    def render(self, template: str, **variables: Any) -> str:
        try:
            tmpl = self.env.from_string(self.template_source(template))
            return tmpl.render(**variables).strip()
        except TemplateNotFound as e:
            raise PromptError(f"template {template!r}: {e}") from None
        except TemplateError as e:
            raise PromptError(f"template {template!r}: {e}") from None
