"""Prefect settings booksmith needs before Prefect is imported.

With no PREFECT_API_URL, flows run on Prefect's ephemeral local server (SQLite). Its start-up
took 12-19 s on these machines against a default timeout of 20 s, so we raise the timeout, and
we turn telemetry off (offline it only fills the log with errors). Users' own settings win.
"""

from __future__ import annotations

import os

DEFAULTS = {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY": "false",
}


def configure_prefect(quiet: bool = False) -> None:
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)
    if quiet:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
