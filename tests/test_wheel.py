"""The built wheel: one import root, and it runs from outside the checkout.

Inside the checkout the repository's folders (schemas/, filters/, ...) sit on sys.path and
would hide an import that only works there, so the run here happens in a fresh virtual
environment that holds the wheel alone, with the development environment's site-packages
reached through a .pth line for the third-party dependencies (its .pth files, the editable
install's finder among them, are not processed that way).
"""

from __future__ import annotations

import os
import site
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from booksmith.shards.version_dir import list_versions
from tests.conftest import fake_backend_config
from tests.fakeserver import FakeServer

ROOT = Path(__file__).resolve().parent.parent


def _package_dirs() -> dict[str, str]:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return meta["tool"]["setuptools"]["package-dir"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(dist),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (whl,) = dist.glob("booksmith-*.whl")
    return whl


@pytest.mark.slow
def test_wheel_has_one_top_level_package_holding_every_module(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"booksmith"}
    # Every module and data file of the mapped folders is in the wheel, under booksmith/.
    for package, folder in _package_dirs().items():
        prefix = package.replace(".", "/")
        for path in (ROOT / folder).rglob("*"):
            if path.is_dir() or "__pycache__" in path.parts:
                continue
            if path.suffix in {".py", ".j2", ".yaml", ".txt"} or path.name == "README.md":
                member = f"{prefix}/{path.relative_to(ROOT / folder).as_posix()}"
                assert member in names, f"{member} (from {path.relative_to(ROOT)}) not in wheel"
    entry = (
        zipfile.ZipFile(wheel)
        .read(next(n for n in names if n.endswith("entry_points.txt")))
        .decode()
    )
    assert "booksmith = booksmith.flows.cli:main" in entry


@pytest.mark.slow
def test_wheel_runs_booksmith_run_outside_the_checkout(
    wheel: Path, prefect_api: str, tmp_path: Path, write_config
) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    deps = {sysconfig.get_paths()["purelib"], *site.getsitepackages()}
    Path(purelib, "_booksmith_deps.pth").write_text("\n".join(sorted(deps)) + "\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(py),
            "install",
            "-q",
            "--no-deps",
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PREFECT_API_URL"] = prefect_api
    work = tmp_path / "elsewhere"
    work.mkdir()

    where = subprocess.run(
        [str(py), "-c", "import booksmith.flows.cli as m; print(m.__file__)"],
        cwd=work,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert Path(where).is_relative_to(purelib), where

    out = tmp_path / "out"
    with FakeServer() as server:
        config = write_config(fake_backend_config(server.base_url, out))
        run = subprocess.run(
            [str(venv / "bin" / "booksmith"), "run", "--config", str(config)],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
        )
    assert run.returncode == 0, run.stderr[-3000:]
    (version,) = list_versions(out)
    assert run.stdout.strip().endswith(str(version))
    assert pq.read_table(version / "plan.parquet").num_rows == 12
