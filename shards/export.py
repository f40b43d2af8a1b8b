"""Copy a finished dataset version to an object store or any fsspec URL; the URL becomes the
version's root (URL/manifest.json, URL/text/..., paths in the manifest are relative).

- Files upload in parallel; the remote manifest.json goes last, only once every other file is
  there and checked, so a reader of the URL sees either a complete version or none.
- Resumable per object everywhere: an object already there with the right size and sha256 is
  skipped. On S3, per part too: a large file is a multipart upload whose upload id is persisted
  under `<out>/_state/exports/`; a rerun lists the parts S3 already holds and sends only the
  others. Each part carries its Content-MD5, which S3 checks on arrival.
- Each finished export is recorded in the output directory (shards/copies.py), so that a
  takedown reaches the copy.
- On S3 each object's sha256 rides in its metadata (`x-amz-meta-sha256`) and is checked after
  the upload (a multipart ETag is not an MD5 of the object, so it proves nothing).
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from booksmith.schemas.manifest import Manifest, ManifestError
from booksmith.shards.copies import record_export
from booksmith.shards.files import file_sha256, write_json_atomically
from booksmith.shards.fs import filesystem, is_url, join, s3_client_kwargs
from booksmith.shards.version_dir import MANIFEST, STATE_DIR, read_manifest

PART_SIZE = 64 << 20  # S3 parts: 5 MiB minimum (except the last), 10,000 at most
MIN_PART_SIZE = 5 << 20


class ExportError(RuntimeError):
    """An export that could not complete; the message names the object."""


@dataclass
class ExportReport:
    url: str
    uploaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already there, same sha256
    parts_uploaded: int = 0
    parts_reused: int = 0
    bytes_uploaded: int = 0
    deleted: list[str] = field(default_factory=list)  # the previous version's leftover shards


@dataclass(frozen=True)
class _File:
    rel: str
    local: Path
    size: int
    sha256: str


def _files(version: Path, manifest: Manifest) -> list[_File]:
    """Every file of the version except the manifest (and temporary files), with sha256s
    (from the manifest where it has them)."""
    known = {s.path: s.sha256 for s in manifest.shards}
    files = []
    for path in sorted(version.rglob("*")):
        rel = path.relative_to(version).as_posix()
        if not path.is_file() or rel == MANIFEST or any(p.startswith(".") for p in rel.split("/")):
            continue
        sha = known.get(rel) or file_sha256(path)
        files.append(_File(rel, path, path.stat().st_size, sha))
    missing = set(known) - {f.rel for f in files}
    if missing:
        raise ExportError(f"{version}: files in the manifest are missing: {sorted(missing)}")
    return files


def _listed(manifest_body: bytes) -> set[str]:
    """Shard paths a (remote) manifest lists, plus its card; empty if it is unreadable."""
    try:
        paths = {s.path for s in Manifest.parse(manifest_body, "remote manifest").shards}
    except ManifestError:
        return set()
    safe = {p for p in paths if not p.startswith("/") and ".." not in p.split("/")}
    return safe | {"README.md"}


class _State:
    """Multipart upload ids, persisted so a killed export resumes its parts."""

    def __init__(self, path: Path) -> None:
        self.path, self.lock = path, threading.Lock()
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}

    def get(self, key: str) -> dict[str, Any] | None:
        with self.lock:
            value = self.data.get(key)
            return dict(value) if value else None

    def set(self, key: str, value: dict[str, Any] | None) -> None:
        with self.lock:
            if value is None:
                self.data.pop(key, None)
            else:
                self.data[key] = value
            write_json_atomically(self.path, self.data)


def _md5_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()


class _S3Target:
    def __init__(self, url: str, state: _State, part_size: int, report: ExportReport,
                 on_part: Callable[[str, int], None] | None, workers: int) -> None:  # fmt: skip
        import boto3
        from botocore.config import Config

        bucket, _, prefix = url.split("://", 1)[1].partition("/")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.client = boto3.client(
            "s3", config=Config(max_pool_connections=max(10, 2 * workers)), **s3_client_kwargs()
        )
        self.state, self.part_size, self.report, self.on_part = state, part_size, report, on_part
        self.parts_pool = ThreadPoolExecutor(workers, thread_name_prefix="s3-part")
        self.lock = threading.Lock()
        self.failed = threading.Event()

    def key(self, rel: str) -> str:
        return join(self.prefix, rel)

    def has(self, f: _File) -> bool:
        from botocore.exceptions import ClientError

        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self.key(f.rel))
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return bool(
            head["ContentLength"] == f.size and head.get("Metadata", {}).get("sha256") == f.sha256
        )

    def check(self, f: _File) -> None:
        if not self.has(f):
            raise ExportError(f"s3://{self.bucket}/{self.key(f.rel)}: size or sha256 differs")

    def put(self, f: _File) -> None:
        if f.size <= self.part_size:
            data = f.local.read_bytes()
            self.client.put_object(
                Bucket=self.bucket,
                Key=self.key(f.rel),
                Body=data,
                ContentMD5=_md5_b64(data),
                Metadata={"sha256": f.sha256},
            )
            self._count(bytes_=len(data))
        else:
            self._multipart(f)
        self.check(f)

    def _count(self, *, bytes_: int = 0, parts: int = 0, reused: int = 0) -> None:
        with self.lock:
            self.report.bytes_uploaded += bytes_
            self.report.parts_uploaded += parts
            self.report.parts_reused += reused

    def _done_parts(self, key: str, upload_id: str) -> dict[int, dict[str, Any]] | None:
        """Parts S3 already holds for an upload, or None when the upload is gone."""
        from botocore.exceptions import ClientError

        done: dict[int, dict[str, Any]] = {}
        marker = 0
        try:
            while True:
                page = self.client.list_parts(
                    Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumberMarker=marker
                )
                for p in page.get("Parts", []):
                    done[p["PartNumber"]] = {"ETag": p["ETag"], "Size": p["Size"]}
                if not page.get("IsTruncated"):
                    return done
                marker = page["NextPartNumberMarker"]
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchUpload", "404"):
                return None
            raise

    def _multipart(self, f: _File) -> None:
        key = self.key(f.rel)
        saved = self.state.get(key)
        done: dict[int, dict[str, Any]] | None = None
        if saved and saved["sha256"] == f.sha256 and saved["part_size"] == self.part_size:
            done = self._done_parts(key, saved["upload_id"])
        if done is None:
            upload_id = self.client.create_multipart_upload(
                Bucket=self.bucket, Key=key, Metadata={"sha256": f.sha256}
            )["UploadId"]
            self.state.set(
                key, {"upload_id": upload_id, "sha256": f.sha256, "part_size": self.part_size}
            )
            done = {}
        else:
            upload_id = saved["upload_id"]  # type: ignore[index]
        n_parts = -(-f.size // self.part_size)

        def send(number: int) -> dict[str, Any]:
            if self.failed.is_set():
                raise ExportError(f"{f.rel}: part {number} not sent: another upload failed")
            try:
                return send_part(number)
            except BaseException:
                self.failed.set()  # stop the queued parts: fail fast, resume later
                raise

        def send_part(number: int) -> dict[str, Any]:
            expected = min(self.part_size, f.size - (number - 1) * self.part_size)
            if number in done and done[number]["Size"] == expected:
                self._count(reused=1)
                return {"PartNumber": number, "ETag": done[number]["ETag"]}
            with open(f.local, "rb") as fh:
                fh.seek((number - 1) * self.part_size)
                data = fh.read(self.part_size)
            etag = self.client.upload_part(
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                PartNumber=number,
                Body=data,
                ContentMD5=_md5_b64(data),
            )["ETag"]
            self._count(bytes_=len(data), parts=1)
            if self.on_part is not None:
                self.on_part(f.rel, number)
            return {"PartNumber": number, "ETag": etag}

        parts = list(self.parts_pool.map(send, range(1, n_parts + 1)))
        self.client.complete_multipart_upload(
            Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
        )
        self.state.set(key, None)

    def put_manifest(self, body: bytes) -> None:
        self.client.put_object(
            Bucket=self.bucket,
            Key=self.key(MANIFEST),
            Body=body,
            ContentMD5=_md5_b64(body),
            ContentType="application/json",
            Metadata={"sha256": hashlib.sha256(body).hexdigest()},
        )

    def remote_manifest(self) -> bytes | None:
        from botocore.exceptions import ClientError

        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self.key(MANIFEST))
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        body: bytes = obj["Body"].read()
        return body

    def remove_manifest(self) -> None:
        self.delete(MANIFEST)

    def delete(self, rel: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.key(rel))

    def close(self) -> None:
        self.parts_pool.shutdown(wait=True)


class _FsTarget:
    """Any fsspec filesystem: write under a temporary name, then move into place."""

    def __init__(self, url: str) -> None:
        self.fs, self.root = filesystem(url)

    def has(self, f: _File) -> bool:
        path = join(self.root, f.rel)
        if not self.fs.exists(path) or self.fs.size(path) != f.size:
            return False
        return file_sha256(path, self.fs) == f.sha256

    def _put(self, local: Path, rel: str) -> None:
        path = join(self.root, rel)
        tmp = join(self.root, f"{rel}.tmp-export")
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        self.fs.put_file(str(local), tmp)
        self.fs.mv(tmp, path)

    def put(self, f: _File) -> None:
        self._put(f.local, f.rel)
        if self.fs.size(join(self.root, f.rel)) != f.size:
            raise ExportError(f"{join(self.root, f.rel)}: size differs after upload")

    def put_manifest(self, body: bytes) -> None:
        tmp = join(self.root, f".{MANIFEST}.tmp-export")
        with self.fs.open(tmp, "wb") as fh:
            fh.write(body)
        self.fs.mv(tmp, join(self.root, MANIFEST))

    def remote_manifest(self) -> bytes | None:
        path = join(self.root, MANIFEST)
        if not self.fs.exists(path):
            return None
        with self.fs.open(path, "rb") as fh:
            body: bytes = fh.read()
        return body

    def remove_manifest(self) -> None:
        self.delete(MANIFEST)

    def delete(self, rel: str) -> None:
        path = join(self.root, rel)
        if self.fs.exists(path):
            self.fs.rm_file(path)

    def close(self) -> None:
        pass


def export(
    version: Path,
    url: str,
    *,
    workers: int = 8,
    part_size: int = PART_SIZE,
    state_dir: Path | None = None,
    on_part: Callable[[str, int], None] | None = None,
) -> ExportReport:
    """Upload a version to `url` (its new root), manifest last. Rerun to resume."""
    if part_size < MIN_PART_SIZE:
        raise ValueError(f"part size {part_size} is below S3's minimum of {MIN_PART_SIZE}")
    manifest = read_manifest(version)
    files = _files(version, manifest)
    if not is_url(url):
        url = Path(url).resolve().as_uri()
    url = url.rstrip("/")
    state_path = (state_dir or version.resolve().parent / STATE_DIR / "exports") / (
        f"{manifest.run_id}-{hashlib.sha256(url.encode()).hexdigest()[:12]}.json"
    )
    report = ExportReport(url=url)
    target: _S3Target | _FsTarget
    if url.startswith("s3://"):
        target = _S3Target(url, _State(state_path), part_size, report, on_part, workers)
    else:
        target = _FsTarget(url)

    failed = threading.Event()

    def one(f: _File) -> None:
        if failed.is_set():
            raise ExportError(f"{f.rel}: not sent: another upload failed")
        try:
            if target.has(f):
                report.skipped.append(f.rel)
                return
            target.put(f)
            report.uploaded.append(f.rel)
        except BaseException:
            failed.set()
            raise

    body = (version / MANIFEST).read_bytes()
    try:
        remote = target.remote_manifest()
        stale: set[str] = set()
        if remote is not None and remote != body:
            # Another version lived here: unpublish it first, so no reader ever pairs its
            # manifest with objects this export is replacing; its shards that this version
            # lacks go too (only those it listed: nothing else under the URL is touched).
            stale = _listed(remote) - {f.rel for f in files}
            target.remove_manifest()
        with ThreadPoolExecutor(workers, thread_name_prefix="export") as pool:
            # list() re-raises the first failure; the manifest is never written after one
            list(pool.map(one, sorted(files, key=lambda f: -f.size)))
        for rel in sorted(stale):
            target.delete(rel)
        report.deleted = sorted(stale)
        target.put_manifest(body)
    finally:
        target.close()
    record_export(version, url)  # so that a takedown rewrites this copy too
    return report
