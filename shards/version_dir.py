"""The dataset version directory: naming, layout, and what counts as a dataset.

`<out>/<run_id>/` holds one version; it is a dataset only once `manifest.json` exists.
`<out>/_state/` holds what runs keep between runs (response cache, failures, indexes).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from datetime import UTC, datetime
from pathlib import Path

from booksmith.schemas.manifest import MANIFEST, Manifest

STATE_DIR = "_state"
OWNER = ".owner"  # {host, pid} of the run writing a version, until its manifest exists
RUNS_DIR = "runs"  # <out>/_state/runs/<run_id>/: a streaming run's spills until it publishes


def state_dir(out: Path) -> Path:
    return out / STATE_DIR


def new_run_id(out: Path, now: datetime | None = None) -> str:
    """A sortable UTC timestamp id, made unique within `out`."""
    now = now or datetime.now(UTC)
    base = now.strftime("%Y%m%dT%H%M%SZ")
    run_id, n = base, 1
    while (out / run_id).exists():
        n += 1
        run_id = f"{base}-{n}"
    return run_id


def claim_run_dir(out: Path, now: datetime | None = None) -> str:
    """A new run id whose directory this process now owns (mkdir is atomic, so two runs that
    start in the same second get different ids). The owner file lets a later run tell an
    abandoned directory (its process is gone) from one still being written."""
    out.mkdir(parents=True, exist_ok=True)
    while True:
        run_id = new_run_id(out, now)
        try:
            (out / run_id).mkdir()
        except FileExistsError:
            continue
        owner = {"host": socket.gethostname(), "pid": os.getpid()}
        (out / run_id / OWNER).write_text(json.dumps(owner), encoding="utf-8")
        return run_id


def reclaim_run_dir(root: Path) -> None:
    """Take over the directory of a killed run (to resume it): this process is its owner now."""
    owner = {"host": socket.gethostname(), "pid": os.getpid()}
    (root / OWNER).write_text(json.dumps(owner), encoding="utf-8")


def abandoned_runs(out: Path) -> list[Path]:
    """Unfinished run directories whose process is gone, oldest first."""
    return [
        p
        for p in (sorted(out.iterdir()) if out.is_dir() else [])
        if p.is_dir() and p.name != STATE_DIR and not is_dataset(p) and _owner_gone(p)
    ]


def release_run_dir(root: Path) -> None:
    (root / OWNER).unlink(missing_ok=True)


def _owner_gone(root: Path) -> bool:
    try:
        owner = json.loads((root / OWNER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # no owner file: not ours to judge
    if owner.get("host") != socket.gethostname():
        return False  # another machine's run: we cannot see its process
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, KeyError, ValueError):
        return False
    return False


def sweep_abandoned(out: Path) -> list[str]:
    """Remove the directories of runs killed before their manifest (never datasets, so no
    reader saw them); returns their names. Runs still writing are left alone."""
    removed = []
    for path in sorted(out.iterdir()) if out.is_dir() else []:
        if not path.is_dir() or path.name == STATE_DIR or not (path / OWNER).exists():
            continue
        if is_dataset(path):
            if _owner_gone(path):
                release_run_dir(path)  # killed between its manifest and the release
            continue
        if _owner_gone(path):
            shutil.rmtree(path)
            removed.append(path.name)
    # A run's work files (<out>/_state/runs/<run_id>/) outlive it only if it was killed: drop
    # those whose run directory is gone or already published.
    runs = state_dir(out) / RUNS_DIR
    for work in sorted(runs.iterdir()) if runs.is_dir() else []:
        run_dir = out / work.name
        if not run_dir.is_dir() or is_dataset(run_dir) or not (run_dir / OWNER).exists():
            shutil.rmtree(work, ignore_errors=True)
    return removed


FAILED_DIR = "failed"  # <out>/_state/failed/<run_id>/: finished runs that were not published


def set_aside(out: Path, run_id: str) -> Path:
    """Move a finished run that must not be published out of the versions (a rename within
    the output directory: readers of `list_versions` never see it); returns where it went."""
    target = out / STATE_DIR / FAILED_DIR / run_id
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        shutil.rmtree(target)
    (out / run_id).rename(target)
    release_run_dir(target)
    return target


def is_dataset(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def read_manifest(path: Path) -> Manifest:
    """The version's manifest, read through the typed model (ManifestError names the field)."""
    try:
        return Manifest.read(path)
    except FileNotFoundError:
        raise FileNotFoundError(not_a_version(path)) from None


def not_a_version(path: Path) -> str:
    """Why `path` is not a dataset version, with the way on: a missing path says so, an
    output directory lists its versions and names the newest."""
    if not path.exists():
        return f"{path}: no such file or directory"
    versions = list_versions(path) if path.is_dir() else []
    if versions:
        names = ", ".join(v.name for v in versions[-3:])
        more = f"{len(versions)} versions, the last: {names}" if len(versions) > 3 else names
        return (
            f"{path} is an output directory, not a dataset version ({more}); give a version, "
            f"e.g. {versions[-1]}"
        )
    return f"{path / MANIFEST}: no manifest, not a dataset version"


def list_versions(out: Path) -> list[Path]:
    """Dataset versions under `out`, oldest first (directories without a manifest skipped)."""
    if not out.is_dir():
        return []
    return sorted(p for p in out.iterdir() if p.is_dir() and p.name != STATE_DIR and is_dataset(p))
