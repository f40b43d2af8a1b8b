"""The figures the pages show, from a version's manifest and a few grouped queries: a version's
summary line, its funnel, its topic tree, what changed between versions, two side by side."""

from __future__ import annotations

from typing import Any

from booksmith.schemas.manifest import Manifest
from booksmith.viewer.evidence import config_changes
from booksmith.viewer.store import Version

DIVERSITY = (
    "distinct_1", "distinct_2", "distinct_3", "top_opener_share", "compression_ratio",
    "mean_pairwise_minhash",
)  # fmt: skip


def summary(v: Version) -> dict[str, Any]:
    """The figures a version is known by (the versions page's columns)."""
    m = v.manifest
    primary = m.tokens.get(m.primary_encoding or "") or next(iter(m.tokens.values()), None)
    fill = m.counts.fill
    return {
        "created": m.created_at[:19].replace("T", " "),
        "kept": m.documents,
        "rejected": m.counts.rejected,
        "tokens": primary.tokens if primary else 0,
        "encoding": m.primary_encoding or "",
        "cost_usd": m.counts.generate.cost_usd,
        "planned": m.counts.generate.planned or m.counts.plan.requests,
        "failed": m.counts.generate.failed,
        "stopped": (fill.stopped if fill else None) or "",
        "rounds": len(fill.rounds) if fill else 1,
        "takedowns": sum(t.ids for t in m.takedowns),
    }


def funnel(m: Manifest) -> list[dict[str, Any]]:
    """Each step from the plan to the kept set: documents in, documents out, and the drops by
    reason (what `booksmith report`'s funnel shows), widths relative to the plan."""
    g = m.counts.generate
    planned = max(g.planned or m.counts.plan.requests, 1)
    failed = {**g.failures} or ({"failed": g.failed} if g.failed else {})
    skipped = {"skipped_budget": g.skipped_budget, "skipped_breaker": g.skipped_breaker}
    steps: list[dict[str, Any]] = [
        {
            "name": "generate", "input": g.planned, "kept": g.completed + g.cached,
            "reasons": {**failed, **{k: n for k, n in skipped.items() if n}},
        }
    ]  # fmt: skip
    for name, c in m.counts.filter.items():
        reasons = {k: n for k, n in c.items() if k not in ("input", "kept") and n}
        steps.append({"name": name, "input": c.get("input", 0), "kept": c.get("kept", 0),
                      "reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1]))})  # fmt: skip
    for step in steps:
        step["width"] = round(100 * step["kept"] / planned, 1)
    return steps


def topic_tree(v: Version) -> list[dict[str, Any]]:
    """Nodes from the topic paths of the plan, the kept and the rejected documents: each with
    its subtree's planned, kept and rejected documents and its own (the node's topic itself)."""
    root: dict[str, Any] = {"children": {}}
    for kind, key in (("plan", "planned"), ("text", "kept"), ("rejected", "rejected")):
        for path, n in v.group_counts(kind, ("topic_path",)):
            node = root
            for name in path:
                node = node["children"].setdefault(
                    name, {"name": name, "children": {}, "planned": 0, "kept": 0, "rejected": 0,
                           "own": {"planned": 0, "kept": 0, "rejected": 0}},
                )  # fmt: skip
                node[key] += n
            node["own"][key] += n

    def listed(node: dict[str, Any]) -> list[dict[str, Any]]:
        kids = sorted(node["children"].values(), key=lambda c: (-c["planned"], c["name"]))
        for kid in kids:
            kid["children"] = listed(kid)
            done = kid["kept"] + kid["rejected"]
            kid["keep_rate"] = kid["kept"] / done if done else None
        return kids

    return listed(root)


def version_changes(versions: list[Version]) -> list[dict[str, Any]]:
    """Each version's summary and what changed since the one before it (oldest first)."""
    rows: list[dict[str, Any]] = []
    before: Version | None = None
    for v in versions:
        s = summary(v)
        change: list[str] = []
        if before is not None:
            b = before.manifest
            delta = v.manifest.documents - b.documents
            change.append(f"kept {delta:+,}")
            keys = [k for k, _, _ in config_changes(b.config, v.manifest.config)]
            if keys:
                shown = ", ".join(keys[:4]) + (
                    f" and {len(keys) - 4} more" if len(keys) > 4 else ""
                )
                change.append(f"config: {shown}")
            if b.code_version != v.manifest.code_version:
                change.append(f"code {v.manifest.code_version}")
        rows.append({"run": v.run_id, "s": s, "change": change, "before": before})
        before = v
    return rows


def compare_rows(a: Version, b: Version) -> list[tuple[str, Any, Any]]:
    """(figure, in a, in b) for the summary, generation, every filter's drops and diversity."""
    rows: list[tuple[str, Any, Any]] = []
    sa, sb = summary(a), summary(b)
    rows += [(k, sa[k], sb[k]) for k in sa if k not in ("created",)]
    ga, gb = a.manifest.counts.generate.model_dump(), b.manifest.counts.generate.model_dump()
    for key in ("completed", "cached", "retries", "rate_limited", "truncated", "empty"):
        rows.append((f"generate.{key}", ga[key], gb[key]))
    fa, fb = a.manifest.counts.filter, b.manifest.counts.filter
    for name in dict.fromkeys([*fa, *fb]):
        ca, cb = fa.get(name, {}), fb.get(name, {})
        for key in dict.fromkeys([*ca, *cb]):
            rows.append((f"{name}.{key}", ca.get(key, 0), cb.get(key, 0)))
    da, db = a.manifest.diversity, b.manifest.diversity
    rows += [
        (f"diversity.{k}", round(getattr(da, k), 4), round(getattr(db, k), 4)) for k in DIVERSITY
    ]
    return rows
