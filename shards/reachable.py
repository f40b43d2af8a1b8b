"""Can a command write where it will write? Checked in seconds, before any work: each problem is
one line naming the setting (or option) and the fix, never a traceback from deep inside an
upload or a shard write. Used by the preflights of run, topics expand, export and train
(generation/preflight.py) and by their flows.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from glob import glob
from pathlib import Path

from booksmith.schemas.redact import redact_url
from booksmith.shards.fs import is_url, s3_client_kwargs

MIN_FREE_BYTES = 200 << 20  # below this a run would die writing its first shards
CONNECT_TIMEOUT_S = 5.0


def writable_dir(path: Path, setting: str) -> list[str]:
    """`path` (or its nearest existing parent, which it will be made in) is a writable
    directory with room left."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return [f"{setting}: {existing} is a file, not a directory; choose another {setting}"]
    if not os.access(existing, os.W_OK | os.X_OK):
        return [f"{setting}: {existing} is not writable; fix its permissions or the setting"]
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        return [f"{setting}: cannot write in {existing} ({e.strerror}); choose another"]
    free = shutil.disk_usage(existing).free
    if free < MIN_FREE_BYTES:
        return [f"{setting}: only {free >> 20} MB free on {existing}; free some space"]
    return []


def export_target(url: str, setting: str) -> list[str]:
    """An export target: an S3 bucket that exists and that the credentials may use, or a
    local directory that is writable. Other fsspec URLs are left to the export itself."""
    if url.startswith(("s3://", "s3a://")):
        return _s3_bucket(url, setting)
    if not is_url(url) or url.startswith("file://"):
        return writable_dir(Path(url.removeprefix("file://")), setting)
    return []


def _s3_bucket(url: str, setting: str) -> list[str]:
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    bucket = url.split("://", 1)[1].split("/", 1)[0]
    shown = redact_url(url)
    timeout = CONNECT_TIMEOUT_S
    config = Config(connect_timeout=timeout, read_timeout=timeout, retries={"max_attempts": 1})
    try:
        # a new session: the default one keeps the credentials it found first
        client = boto3.session.Session().client("s3", config=config, **s3_client_kwargs())
        client.head_bucket(Bucket=bucket)
    except NoCredentialsError:
        return [
            f"{setting}: no S3 credentials for {shown}; set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
        ]
    except ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket"):
            return [f"{setting}: bucket {bucket!r} does not exist; create it first "
                    f"(e.g. `aws s3 mb s3://{bucket}`) or fix the URL"]  # fmt: skip
        if code in ("401", "403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return [f"{setting}: the S3 credentials may not use bucket {bucket!r} ({code}); "
                    "check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and its policy"]  # fmt: skip
        return [f"{setting}: S3 refused {shown} ({code or e}); check the URL and credentials"]
    except BotoCoreError as e:
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        where = f" at {redact_url(endpoint)}" if endpoint else ""
        reason = " ".join(str(e).split())
        return [f"{setting}: S3{where} does not answer for {shown} ({reason}); start it or "
                "fix AWS_ENDPOINT_URL"]  # fmt: skip
    return []


def readable(location: str, setting: str) -> list[str]:
    """Something is there to read: a local path or glob that matches, or a URL that exists
    (asked through fsspec with the same environment as every read)."""
    from booksmith.shards.fs import filesystem

    def has_magic(pattern: str) -> bool:
        return any(c in pattern for c in "*?[")

    shown = redact_url(location)
    try:
        if is_url(location):
            fs, root = filesystem(location)
            found = bool(fs.glob(root)) if has_magic(root) else fs.exists(root)
        else:
            found = bool(glob(location)) if has_magic(location) else Path(location).exists()
    except Exception as e:  # any store's own error: credentials, endpoint, bucket
        return [f"{setting}: cannot read {shown} ({' '.join(str(e).split())}); check the URL"]
    if not found:
        return [
            f"{setting}: nothing at {shown}; give a dataset version, a shard directory or "
            "glob, or a URL"
        ]
    return []
