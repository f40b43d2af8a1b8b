"""Whether a finished run is published as a version: a run that kept nothing, or whose
endpoint failed most of what it was asked, is a failed night, not an empty success (issue 15:
an exit 0 on a dead endpoint hid failed nights from their schedulers)."""

from __future__ import annotations

from booksmith.schemas.config import PublishSettings
from booksmith.schemas.manifest import Manifest


class RunNotPublished(RuntimeError):
    """A finished run that did not earn a version; the message says why and where its files
    are."""


def publish_problem(manifest: Manifest, settings: PublishSettings) -> str | None:
    """Why this run must not be published, or None."""
    gen = manifest.counts.generate
    attempted = gen.planned - gen.skipped_budget - gen.skipped_breaker
    share = gen.failed / attempted if attempted else 0.0
    if settings.max_failed_share is not None and share > settings.max_failed_share:
        return (
            f"{gen.failed} of {attempted} requests failed ({share:.0%}, above "
            f"publish.max_failed_share {settings.max_failed_share:.0%})"
        )
    if manifest.documents < settings.min_documents:
        rejected = manifest.counts.rejected
        why = f"; the filters rejected {rejected}" if rejected else ""
        return (
            f"it kept {manifest.documents} documents (publish.min_documents is "
            f"{settings.min_documents}){why}"
        )
    return None
