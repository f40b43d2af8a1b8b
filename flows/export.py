"""The export flow: copy a dataset version to an object store, then verify it there.

Resumable (a rerun uploads only what is missing, S3 multipart parts included) and safe to
retry: the remote manifest is written last, so a reader never sees a half-exported version.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from booksmith.shards.reachable import export_target
from booksmith.shards.version_dir import is_dataset, list_versions


def resolve_version(path: Path) -> Path:
    """A version directory, or an output directory (its newest version)."""
    if is_dataset(path):
        return path
    versions = list_versions(path)
    if not versions:
        raise FileNotFoundError(f"{path}: neither a dataset version nor a directory of versions")
    return versions[-1]


@task(retries=3, retry_delay_seconds=[10, 60, 300], cache_policy=NO_CACHE)
def export_version(version: Path, to: str, workers: int = 8, verify: bool = True) -> dict[str, Any]:
    from booksmith.shards.export import export
    from booksmith.shards.verify import verify as verify_remote

    report = export(version, to, workers=workers)
    summary = {
        "url": report.url,
        "uploaded": len(report.uploaded),
        "skipped": len(report.skipped),
        "bytes": report.bytes_uploaded,
    }
    if verify:
        result = verify_remote(report.url)
        if not result.ok:
            raise RuntimeError(f"{report.url}: verify failed: {'; '.join(result.problems[:5])}")
        summary["verified"] = True
    return summary


@flow(name="booksmith-export", log_prints=True)
def export_flow(version: str, to: str, workers: int = 8, verify: bool = True) -> dict[str, Any]:
    """Export `version` (or the newest version under an output directory) to `to`/<run_id>."""
    path = resolve_version(Path(version))
    if problems := export_target(to, "to"):  # the flow's state message says what to fix
        raise ValueError("\n".join(problems))
    target = to.rstrip("/") + "/" + path.name
    summary = export_version(path, target, workers, verify)
    get_run_logger().info("exported %s to %s", path, target)
    return summary
