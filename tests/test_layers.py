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


# From the bottom: each folder may import only those below it (docs/design.md, "Layers").
# prompts/ sits beside generation/ (generation imports it); the trainer reads only records and
# shards, so it trains on any booksmith dataset without the pipeline installed around it.
LAYERS = ["schemas", "shards", "prompts", "generation", "filters", "pipeline", "flows"]
MAY_IMPORT = {name: set(LAYERS[:i]) for i, name in enumerate(LAYERS)}
MAY_IMPORT["trainer"] = {"schemas", "shards"}
# The viewer reads versions (records, manifests, shards) and nothing of the pipeline.
MAY_IMPORT["viewer"] = {"schemas", "shards"}
MAY_IMPORT["flows"] |= {"trainer", "viewer"}


def test_layers_point_down_only() -> None:
    upward = []
    for folder, allowed in MAY_IMPORT.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            for line, name in _imported_modules(path):
                parts = [*name.split("."), ""]
                layer = parts[1] if parts[0] == "booksmith" else ""
                if layer in MAY_IMPORT and layer != folder and layer not in allowed:
                    upward.append(f"{path.relative_to(ROOT)}:{line}: {folder} -> {name}")
    assert upward == []


def test_no_flow_imports_a_cli_module() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{line}: {name}"
        for path in sorted((ROOT / "flows").glob("*.py"))
        if not path.name.startswith("cli")
        for line, name in _imported_modules(path)
        if name.startswith("booksmith.flows.cli")
    ]
    assert found == []


# Directory swaps (a version rebuilt by a takedown, a checkpoint step) rename whole trees, and
# llama.cpp's quantizer writes its own temporary file: those rename in place. Every file
# write goes through shards/files.py.
RENAMES_DIRECTORIES = {
    "shards/catalog.py",
    "trainer/checkpoint.py",
    "generation/embedded/model.py",
}


def test_files_are_written_and_hashed_in_one_place() -> None:
    found = []
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            text = path.read_text()
            if "os.replace(" in text and rel not in {"shards/files.py", *RENAMES_DIRECTORIES}:
                found.append(f"{rel}: os.replace (use booksmith.shards.files)")
            if "h.update(block)" in text and rel != "shards/files.py":
                found.append(f"{rel}: a file's sha256 (use booksmith.shards.files.file_sha256)")
    assert found == []
