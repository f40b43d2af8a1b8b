"""Credentials out of everything booksmith writes or shows: URLs lose their password and their
key-like query parameters before a config reaches a manifest, a card, a report, a Prefect
artifact, a log line or a terminal.

The config refuses keys themselves (settings name environment variables, never hold values),
but a URL can carry one: `redis://:password@host:6379/0` (dedup.redis_url defaults to
$BOOKSMITH_REDIS_URL), `https://user:token@proxy/v1`, or a presigned
`s3://...?X-Amz-Credential=...&X-Amz-Signature=...`. Redaction keeps what a reader needs to tell
where the data went (scheme, user name, host, port, path, the other parameters) and replaces
each secret with `***`, so two runs against the same server still read the same.
"""

from __future__ import annotations

import logging
import re
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"

# Query parameters whose value is a credential (compared case-insensitively, after dropping
# "-" and "_"): API keys, tokens, passwords, AWS/GCS/Azure signatures and session tokens.
_SECRET_PARAMS = frozenset(
    {
        "key", "apikey", "accesskey", "accesskeyid", "secret", "secretkey", "secretaccesskey",
        "token", "accesstoken", "sessiontoken", "authtoken", "auth", "password", "pass", "pwd",
        "sig", "signature", "xamzsignature", "xamzcredential", "xamzsecuritytoken",
        "xgoogsignature", "xgoogcredential", "credential", "credentials", "code",
    }
)  # fmt: skip

# scheme://user:password@ inside free text (log lines, error messages)
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^\s/@:]*):[^\s/@]*@")
# a URL inside free text, for its query parameters
_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]+")


def _secret_param(name: str) -> bool:
    return name.lower().replace("-", "").replace("_", "") in _SECRET_PARAMS


def redact_url(url: str) -> str:
    """`url` with its password and key-like query values replaced by `***`; a string that
    is not a URL comes back unchanged."""
    if "://" not in url:
        return url
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, host = netloc.rsplit("@", 1)
            user, has_password, _ = userinfo.partition(":")
            netloc = f"{user}:{MASK}@{host}" if has_password else netloc
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            if any(_secret_param(k) for k, _ in pairs):
                query = urlencode(
                    [(k, MASK if _secret_param(k) else v) for k, v in pairs], safe="*"
                )
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:  # not parseable as a URL (a bad port, say): mask any userinfo anyway
        return _USERINFO.sub(rf"\g<scheme>\g<user>:{MASK}@", url)


def redact_text(text: str) -> str:
    """Every URL inside free text (a log line, an error message) redacted as `redact_url`."""
    if "://" not in text:
        return text
    text = _USERINFO.sub(rf"\g<scheme>\g<user>:{MASK}@", text)
    return _URL.sub(lambda m: redact_url(m.group(0)), text)


def redact_config(value: Any) -> Any:
    """A config as plain data (`model_dump(mode="json")`) with every URL in it redacted; a new
    object, the input is not changed."""
    if isinstance(value, dict):
        return {k: redact_config(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_config(v) for v in value]
    if isinstance(value, str):
        return redact_text(value)
    return value


def install_log_redaction() -> None:
    """Redact credentials in URLs from every log record made from now on, whatever the logger
    (booksmith's, Prefect's, which sends records to its API, httpx's); idempotent. Called
    where booksmith's application starts (flows/), not on import of the library layers.
    A record's arguments are formatted into its message when it is made (only records a
    logger is enabled for are made); tracebacks are not rewritten."""
    base = logging.getLogRecordFactory()
    if getattr(base, "booksmith_redacts", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = base(*args, **kwargs)
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # bad arguments: logging reports them at emit
            return record
        if "://" in message:
            record.msg, record.args = redact_text(message), ()
        return record

    factory.booksmith_redacts = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)
