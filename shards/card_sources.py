"""What a dataset card says about the sources a grounded run rewrote: each source's name,
checksum, share of the plan and licences in the front matter, and the card's `license` field
made from them. A share-alike or non-commercial source licence binds what is derived from it,
so it is carried to the field; several licences are listed as they are, never merged into one.
"""

from __future__ import annotations

from typing import Any

from booksmith.schemas.manifest import Manifest

# Markers of licences whose terms follow derived text (share-alike, copyleft, non-commercial).
RESTRICTIVE = ("-sa", "sa-", "-nc", "nc-", "sharealike", "share-alike", "noncommercial",
               "non-commercial", "gpl", "gfdl", "odbl")  # fmt: skip


def restrictive(license: str) -> bool:
    name = license.lower()
    return any(marker in name for marker in RESTRICTIVE)


def card_sources(manifest: Manifest) -> list[dict[str, Any]]:
    """The front matter's `sources`: one entry per source, its share of the planned requests."""
    accounts = manifest.counts.plan.sources
    total = manifest.counts.plan.requests or 1
    return [
        {
            "name": name,
            "path": a.get("path"),
            "checksum": a.get("checksum"),
            "share": round(a.get("requests", 0) / total, 4),
            "passages": a.get("planned", 0),
            "licenses": sorted(a.get("licenses", {})),
        }
        for name, a in accounts.items()
    ]


def card_license(generator: str, sources: list[dict[str, Any]]) -> str | list[str]:
    """`generator` (the configured card licence) unless a source's licence binds the text: then
    those licences (with the generator's when it names one), a list when there are several."""
    bound = sorted({lic for s in sources for lic in s["licenses"] if restrictive(lic)})
    if not bound:
        return generator
    listed = ([generator] if generator != "other" else []) + bound
    return listed[0] if len(listed) == 1 else listed


def sources_section(sources: list[dict[str, Any]]) -> str:
    """The card body's table of sources (empty for a run from topics only)."""
    if not sources:
        return ""
    rows = ["| source | share of requests | passages | licences | checksum (sha256) |",
            "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for s in sources:
        licenses = ", ".join(s["licenses"]) or "not given"
        rows.append(f"| {s['name']} | {s['share']:.1%} | {s['passages']} | {licenses} | "
                    f"`{s['checksum']}` |")  # fmt: skip
    return (
        "## Sources\n\nGrounded documents rewrite passages of these sources; each records its "
        "`source_id`, passage, `license`, `recipe` and `template_version`.\n\n"
        + "\n".join(rows)
        + "\n\n"
    )
