"""One filesystem layer for local paths and URLs (fsspec: s3://, gs://, memory://, file://...).

S3 endpoints and credentials come from the standard AWS variables (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, AWS_PROFILE).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem


def is_url(location: str | Path) -> bool:
    return "://" in str(location)


def s3_client_kwargs() -> dict[str, Any]:
    """botocore reads AWS_ENDPOINT_URL itself; passing it too keeps older clients right."""
    kwargs: dict[str, Any] = {}
    if endpoint := os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"):
        kwargs["endpoint_url"] = endpoint
    if region := os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION"):
        kwargs["region_name"] = region
    return kwargs


def filesystem(location: str | Path) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, root path within it) for a local path or a URL."""
    if not is_url(location):
        return LocalFileSystem(), Path(location).resolve().as_posix()
    url = str(location).rstrip("/")
    options: dict[str, Any] = {}
    if url.startswith(("s3://", "s3a://")):
        options["client_kwargs"] = s3_client_kwargs()
        options["skip_instance_cache"] = True  # credentials and endpoint may change per call
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
    except (ValueError, ImportError):
        return arrow_filesystem(url)  # a scheme fsspec lacks a driver for, pyarrow may have
    return fs, path.rstrip("/")


def arrow_filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """A pyarrow filesystem (S3, GCS, HDFS, Azure, local) behind fsspec's interface."""
    from fsspec.implementations.arrow import ArrowFSWrapper
    from pyarrow import fs as pafs

    try:
        fs, path = pafs.FileSystem.from_uri(url)
    except (pa.ArrowException, ValueError) as e:
        raise ValueError(f"{url}: no filesystem reaches this URL ({e})") from None
    return ArrowFSWrapper(fs), path.rstrip("/")


def join(root: str, relative: str) -> str:
    return f"{root}/{relative}" if root else relative


@contextmanager
def open_parquet(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[pq.ParquetFile]:
    """A Parquet file to read, local or remote, closed on exit. A local file is read by Arrow
    itself; a remote one through fsspec's file object, without pre-buffering. Arrow's threads
    would otherwise read a Python file object in the background, and one still at it when the
    interpreter exits aborts the process ("terminate called without an active exception",
    apache/arrow#34314; seen here at the end of `booksmith verify` once in a few dozen runs)."""
    if isinstance(fs, LocalFileSystem):
        with pq.ParquetFile(path) as parquet:
            yield parquet
        return
    with fs.open(path, "rb") as f, pq.ParquetFile(f, pre_buffer=False) as parquet:
        yield parquet
