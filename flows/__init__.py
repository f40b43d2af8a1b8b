"""The application layer: Prefect flows and the CLI. Importing it makes every log record
redact credentials in URLs (schemas/redact.py), in the CLI, a served deployment and a worker."""

from booksmith.schemas.redact import install_log_redaction

install_log_redaction()
