"""Copies of a version made outside it, recorded so that a takedown can reach them.

`booksmith datasets bin` folders and `booksmith export` targets are written from a version but
live elsewhere; each is recorded in the version's output directory, `<out>/_state/copies.json`,
one entry per (kind, version, place): a later bin into the same folder or export to the same
URL replaces its entry. A takedown reads them back (flows/takedown.py) and rewrites each copy
of a version it changed. URLs are recorded without credentials (schemas/redact.py): a copy
whose URL needed them is listed by the takedown as one it could not reach.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from booksmith.schemas.redact import redact_url
from booksmith.shards.files import file_sha256, write_json_atomically
from booksmith.shards.version_dir import MANIFEST, STATE_DIR

COPIES_FILE = "copies.json"
Kind = Literal["bin", "export"]


@dataclass(frozen=True)
class Copy:
    kind: Kind
    version: str  # the run id, a folder of the output directory
    place: str  # the bin folder (absolute) or the export URL
    at: str = ""
    # the version's manifest when the copy was made: a copy of another manifest is stale
    manifest_sha256: str = ""
    # bin outputs: how to write them again, and the files they were
    encoding: str | None = None
    format: str | None = None
    prefix: str | None = None
    shard_tokens: int | None = None
    files: list[str] = field(default_factory=list)

    def key(self) -> tuple[str, str, str]:
        return (self.kind, self.version, self.place)


def copies_path(out: Path) -> Path:
    return out / STATE_DIR / COPIES_FILE


def spans_path(out: Path, folder: Path) -> Path:
    """Where the documents a bin output holds are kept (shards/binexport.py), by its folder."""
    key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]
    return out / STATE_DIR / "copies" / f"bin-{key}.parquet"


def read_copies(out: Path) -> list[Copy]:
    """Every copy recorded under `out`; a damaged record is an error naming the file."""
    path = copies_path(out)
    if not path.is_file():
        return []
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))["copies"]
        return [Copy(**row) for row in rows]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"{path}: unreadable record of bin outputs and exports ({e}); fix the JSON or "
            "remove the file (takedowns then no longer reach those copies)"
        ) from None


def record(version: Path, copy: Copy) -> None:
    """Add (or replace) one copy of `version` in its output directory's record."""
    out = version.resolve().parent
    now = datetime.now(UTC).isoformat(timespec="seconds")
    sha = file_sha256(version / MANIFEST)
    stamped = Copy(**{**asdict(copy), "at": now, "manifest_sha256": sha})
    kept = [c for c in read_copies(out) if c.key() != stamped.key()]
    rows: list[dict[str, Any]] = [asdict(c) for c in [*kept, stamped]]
    write_json_atomically(copies_path(out), {"copies": rows})


def update_copy(out: Path, copy: Copy, **changes: Any) -> None:
    """Change one recorded copy in place (e.g. the files left after a cut)."""
    rows = [asdict(replace(c, **changes) if c.key() == copy.key() else c) for c in read_copies(out)]
    write_json_atomically(copies_path(out), {"copies": rows})


def record_export(version: Path, url: str) -> None:
    record(version, Copy("export", version.resolve().name, redact_url(url)))


def record_bin(version: Path, folder: Path, files: list[Path], **how: Any) -> None:
    """A `datasets bin` output: its folder, files, and the arguments that wrote them."""
    names = sorted(p.name for p in files)
    where = str(folder.resolve())
    record(version, Copy("bin", version.resolve().name, where, files=names, **how))


def stale(out: Path, copy: Copy) -> bool:
    """Whether a copy was made from another state of its version (one a takedown changed
    since, or one whose rewrite failed): a version that is gone has no stale copies."""
    manifest = out / copy.version / MANIFEST
    return manifest.is_file() and file_sha256(manifest) != copy.manifest_sha256


def copies_to_rewrite(out: Path, versions: set[str]) -> list[Copy]:
    """The recorded copies of these versions, and the stale copies of any version, bin
    outputs first, in the order recorded."""
    found = [c for c in read_copies(out) if c.version in versions or stale(out, c)]
    return sorted(found, key=lambda c: c.kind)


def orphaned_exports(out: Path) -> list[Copy]:
    """Recorded exports whose version is gone from `out` (retired after the export): they
    cannot be written again from here, only checked."""
    found = [c for c in read_copies(out) if c.kind == "export"]
    return [c for c in found if not (out / c.version / MANIFEST).is_file()]


def retired_bins(out: Path) -> list[Copy]:
    """Recorded bin outputs whose version is gone from `out`: they cannot be written again,
    only cut (shards/binexport.py)."""
    found = [c for c in read_copies(out) if c.kind == "bin"]
    return [c for c in found if not (out / c.version / MANIFEST).is_file()]


def rows_in_export(url: str, ids: set[str]) -> int:
    """Rows of these ids in an exported version's text and rejected shards, read there (0
    when the copy is gone)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from booksmith.schemas.manifest import Manifest
    from booksmith.shards.fs import filesystem, open_parquet

    fs, root = filesystem(url)
    if not fs.exists(f"{root}/{MANIFEST}"):
        return 0
    manifest = Manifest.parse(fs.cat_file(f"{root}/{MANIFEST}"), f"{url}/{MANIFEST}")
    wanted = pa.array(sorted(ids), pa.string())
    rows = 0
    for rel in manifest.shard_paths("text") + manifest.shard_paths("rejected"):
        with open_parquet(fs, f"{root}/{rel}") as parquet:
            column = parquet.read(columns=["id"]).column("id")
        rows += int(pc.sum(pc.is_in(column, value_set=wanted)).as_py() or 0)
    return rows


__all__ = [
    "COPIES_FILE",
    "Copy",
    "copies_to_rewrite",
    "orphaned_exports",
    "read_copies",
    "record_bin",
    "record_export",
    "retired_bins",
    "rows_in_export",
    "spans_path",
    "stale",
    "update_copy",
]
