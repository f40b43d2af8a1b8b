"""One filesystem layer for local paths and URLs (fsspec: s3://, gs://, memory://, file://...).

S3 endpoints and credentials come from the standard AWS variables (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, AWS_PROFILE).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
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
