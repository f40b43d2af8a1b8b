"""The dataset version directory: naming, layout, and what counts as a dataset.

`<out>/<run_id>/` holds one version; it is a dataset only once `manifest.json` exists.
`<out>/_state/` holds what runs keep between runs (response cache, failures, indexes).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
STATE_DIR = "_state"


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


def is_dataset(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def read_manifest(path: Path) -> dict[str, Any]:
    manifest_path = path / MANIFEST
    try:
        data: dict[str, Any] = json.loads(manifest_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{manifest_path}: no manifest, so not a dataset version") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{manifest_path}:{e.lineno}: corrupt manifest: {e.msg}") from None
    return data


def list_versions(out: Path) -> list[Path]:
    """Dataset versions under `out`, oldest first (directories without a manifest skipped)."""
    if not out.is_dir():
        return []
    return sorted(p for p in out.iterdir() if p.is_dir() and p.name != STATE_DIR and is_dataset(p))
