"""Credentials in URLs never leave booksmith: the redaction rules, and each place a config is
written or shown (the end-to-end leak test is in test_security.py)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import yaml
from typer.testing import CliRunner

from booksmith.flows.cli import app
from booksmith.schemas.manifest import Manifest
from booksmith.schemas.redact import (
    install_log_redaction,
    redact_config,
    redact_text,
    redact_url,
)

PRESIGNED = (
    "https://bucket.s3.amazonaws.com/v/1.parquet?X-Amz-Algorithm=AWS4-HMAC-SHA256"
    "&X-Amz-Credential=AKIAPLANTED%2F20261205%2Fus-east-1&X-Amz-Signature=deadbeefplanted"
    "&X-Amz-Expires=3600"
)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://:pl4nted@redis:6379/0", "redis://:***@redis:6379/0"),
        ("redis://default:pl4nted@10.0.0.5:6380/2", "redis://default:***@10.0.0.5:6380/2"),
        ("https://user:sk-planted@proxy.example/v1", "https://user:***@proxy.example/v1"),
        ("http://127.0.0.1:8000/v1?api_key=sk-planted&x=1", "http://127.0.0.1:8000/v1?api_key=***&x=1"),
        ("s3://bucket/prefix?access-key=AKIAPLANTED", "s3://bucket/prefix?access-key=***"),
        # nothing secret: unchanged, byte for byte
        ("redis://redis:6379/0", "redis://redis:6379/0"),
        ("redis://user@redis:6379/0", "redis://user@redis:6379/0"),
        ("s3://bucket/booksmith", "s3://bucket/booksmith"),
        ("http://127.0.0.1:8000/v1?model=a%20b", "http://127.0.0.1:8000/v1?model=a%20b"),
        ("out/20261205T020000Z", "out/20261205T020000Z"),
    ],
)  # fmt: skip
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def test_presigned_urls_lose_credential_and_signature_keep_the_rest() -> None:
    redacted = redact_url(PRESIGNED)
    assert "AKIAPLANTED" not in redacted and "deadbeefplanted" not in redacted
    assert redacted.startswith("https://bucket.s3.amazonaws.com/v/1.parquet?")
    assert "X-Amz-Expires=3600" in redacted and "X-Amz-Algorithm=AWS4-HMAC-SHA256" in redacted


def test_text_and_nested_configs() -> None:
    line = "Error 111 connecting to redis://:pl4nted@redis:6379/0. Connection refused."
    assert (
        redact_text(line)
        == "Error 111 connecting to redis://:***@redis:6379/0. Connection refused."
    )
    config = {
        "dedup": {"redis_url": "redis://:pl4nted@redis:6379/0", "threshold": 0.8},
        "generation": {"endpoints": [{"base_url": "https://u:sk-planted@h/v1"}], "seed": None},
    }
    redacted = redact_config(config)
    assert "pl4nted" not in str(redacted) and "sk-planted" not in str(redacted)
    assert redacted["dedup"]["threshold"] == 0.8 and redacted["generation"]["seed"] is None
    assert config["dedup"]["redis_url"].endswith("pl4nted@redis:6379/0")  # input untouched


def test_a_manifest_never_holds_a_credential() -> None:
    """Whoever builds or reads a manifest (the shard writer, a version written before this
    change), its config is redacted."""
    manifest = Manifest(
        run_id="r", shards=[], config={"dedup": {"redis_url": "redis://:pl4nted@r/0"}}
    )
    assert manifest.config["dedup"]["redis_url"] == "redis://:***@r/0"
    again = Manifest.parse(
        manifest.model_dump_json().replace("***", "pl4nted").encode(), "manifest.json"
    )
    assert "pl4nted" not in again.model_dump_json()


def test_config_show_redacts(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BOOKSMITH_REDIS_URL", "redis://:pl4nted@redis:6379/0")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"export": {"to": "s3://b/p?X-Amz-Signature=s1gplanted"}}))
    shown = CliRunner().invoke(app, ["config", "show", str(config)])
    assert shown.exit_code == 0, shown.output
    assert "pl4nted" not in shown.output and "s1gplanted" not in shown.output
    data = yaml.safe_load(shown.output)
    assert data["dedup"]["redis_url"] == "redis://:***@redis:6379/0"


@pytest.fixture
def redacting_logs() -> Iterator[None]:
    before = logging.getLogRecordFactory()
    logging.setLogRecordFactory(logging.LogRecord)
    install_log_redaction()
    install_log_redaction()  # idempotent: one wrapper
    try:
        yield
    finally:
        logging.setLogRecordFactory(before)


def test_log_records_are_redacted(redacting_logs: None, caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("booksmith.test")
    with caplog.at_level(logging.INFO):
        log.info("index at %s", "redis://:pl4nted@redis:6379/0")
        log.info("plain %d", 3)
        logging.getLogger("httpx").warning(f"GET {PRESIGNED}")
    assert [r.getMessage() for r in caplog.records][:2] == [
        "index at redis://:***@redis:6379/0",
        "plain 3",
    ]
    assert "deadbeefplanted" not in caplog.text and "pl4nted" not in caplog.text
