"""The import root: every module of the project is imported as `booksmith.<folder>...`.

Inside the checkout a bare `import filters` would still work (the folder is on sys.path) and
load a second copy of the module beside `booksmith.filters`; installed from the wheel it fails.
This reads the source with ast, so it catches imports on paths no test runs.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
META = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
FOLDERS = {folder: package for package, folder in META["package-dir"].items()}


def _sources() -> list[Path]:
    roots = [ROOT / "booksmith", *(ROOT / f for f in FOLDERS), ROOT / "tests", ROOT / "benchmarks"]
    return [p for r in roots for p in sorted(r.rglob("*.py")) if "__pycache__" not in p.parts]


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def test_no_module_imports_a_folder_by_its_bare_name() -> None:
    bare = [
        f"{p.relative_to(ROOT)}:{line}: import {name} (write booksmith.{name})"
        for p in _sources()
        for line, name in _imported_modules(p)
        if name.split(".")[0] in FOLDERS
    ]
    assert bare == []


def test_every_sub_package_is_listed_for_the_wheel() -> None:
    listed = set(META["packages"])
    on_disk = {
        ".".join([FOLDERS[folder], *init.parent.relative_to(ROOT / folder).parts])
        for folder in FOLDERS
        for init in (ROOT / folder).rglob("__init__.py")
    }
    assert on_disk - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
