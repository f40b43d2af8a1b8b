"""`booksmith view` over grounded documents: the documents page filters by recipe, source,
licence and source id exactly as a pyarrow read of the shards says (listed and searched, alone
and with another filter); versions without provenance (topic-only, and written before grounded
generation) open without those filters; a grounded document shows where it came from; a
version page's coverage counts grounded documents apart from the audience x format table, and
each count it links is what its link lists.

One output of four versions, fake-server runs: a version as written before grounding (a copy
of the topic-only one, its shards without the provenance columns), a topic-only run (the
columns all null), a run mixing topics with two sources of different licences, and a run from
one source only.
"""

from __future__ import annotations

import html
import re
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import pyarrow.parquet as pq
import pytest
import yaml
from starlette.testclient import TestClient

from booksmith.prompts import _package_dir
from booksmith.schemas.records import GROUNDING_COLUMNS
from booksmith.viewer.app import _matrix, create_app
from booksmith.viewer.store import MAX_PAGE, Output
from tests.conftest import fake_backend_config
from tests.fakeserver import FakeServer
from tests.test_grounded_plan import write_source

pytestmark = pytest.mark.slow

OLD = "20200101T000000Z"  # sorts first, as a version from before grounding would


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from booksmith.flows.nightly import nightly
    from booksmith.flows.task_runners import with_runner
    from booksmith.schemas.config import load_config

    root = tmp_path_factory.mktemp("viewer-grounded")
    out = root / "out"
    topics = str(_package_dir() / "topics" / "default.yaml")
    pydoc = write_source(root / "pydoc.jsonl")  # PSF-2.0
    manual = write_source(root / "manual.jsonl", license="CC-BY-SA-4.0")
    runs = [
        {"seed": 1, "topics": topics},
        {"seed": 2, "topics": topics, "plan": {"limit": 24}, "grounding": {"topics_share": 1},
         "sources": [{"path": str(pydoc)}, {"path": str(manual)}]},
        {"seed": 3, "plan": {"limit": 6}, "sources": [{"path": str(pydoc)}]},
    ]  # fmt: skip
    with FakeServer({"truncated": 0.25}) as server:  # some rejects, grounded ones among them
        for run in runs:
            cfg = fake_backend_config(server.base_url, out) | run
            path = root / f"config-{run['seed']}.yaml"
            path.write_text(yaml.safe_dump(cfg))
            with_runner(nightly, load_config(path))(config=str(path))
    topic_only = _versions(out)[0]
    shutil.copytree(topic_only, out / OLD)
    for shard in (out / OLD).rglob("*.parquet"):
        table = pq.read_table(shard)
        kept = [c for c in table.column_names if c not in GROUNDING_COLUMNS]
        pq.write_table(table.select(kept), shard)
    return out


@pytest.fixture(scope="module")
def client(out: Path) -> Iterator[TestClient]:
    with TestClient(create_app(Output(str(out)))) as c:
        yield c


def _versions(out: Path) -> list[Path]:
    """The versions the runs wrote: topic-only, mixed, sources-only."""
    return sorted(p for p in out.glob("2*") if p.is_dir() and p.name != OLD)


def _grounded(out: Path) -> Path:
    return _versions(out)[1]


def _rows(version: Path, kind: str) -> list[dict[str, Any]]:
    return pq.read_table(version / kind).to_pylist()


def _listed(client: TestClient, version: Path, **params: Any) -> list[str]:
    """The ids a documents page lists (one page holds them all here)."""
    for _ in range(200):  # a search builds the index in the background first
        page = client.get(f"/v/{version.name}/docs", params={"per": MAX_PAGE, **params})
        assert page.status_code == 200, page.text
        if 'id="building"' not in page.text:
            break
        time.sleep(0.1)
    ids = re.findall(r'href="/v/[^"]+/doc/([0-9a-f]+)\?at=', page.text)
    count = re.search(r'id="count">([\d,]+)', page.text)
    assert count and int(count.group(1).replace(",", "")) == len(ids)
    return ids


def test_provenance_filters_list_exactly_the_documents_the_shards_hold(
    out: Path, client: TestClient
) -> None:
    version = _grounded(out)
    kept = _rows(version, "text")
    page = client.get(f"/v/{version.name}/docs").text
    for column in ("recipe", "source_name", "license"):
        counts = Counter(r[column] for r in kept if r[column] is not None)
        assert len(counts) > 1, column  # a filter that narrows
        select = page.split(f'<select name="{column}"')[1].split("</select>")[0]
        options = dict(re.findall(r'<option value="([^"]+)"[^>]*>[^<]* \((\d+)\)', select))
        assert options == {value: str(n) for value, n in counts.items()}, column
        for value in counts:
            want = [r["id"] for r in kept if r[column] == value]
            assert _listed(client, version, **{column: value}) == want, (column, value)
    assert sum(r["recipe"] is None for r in kept)  # the topic half: no recipe, still listed
    assert any(r["audience"] == "" for r in kept)  # a grounded document has no audience...
    for name, select in re.findall(r'<select name="(\w+)"(.*?)</select>', page, re.S):
        if name == "kind":
            continue
        assert select.count('value=""') == 1, name  # ...and no option that reads as "any"
        assert select.count("<option") > 1, name  # nor a select of "any" alone
    only = _versions(out)[2]
    assert {r["style"] for r in _rows(only, "text")} == {""}  # a recipe sets no style
    page = client.get(f"/v/{only.name}/docs").text
    assert 'name="recipe"' in page and 'name="style"' not in page  # no select of "any" alone

    for other in ("license", "audience"):  # with another provenance filter, and an older one
        narrowed = 0
        for recipe, value in sorted({(r["recipe"], r[other]) for r in kept if r["recipe"]}):
            want = [r["id"] for r in kept if (r["recipe"], r[other]) == (recipe, value)]
            alone = (sum(r["recipe"] == recipe for r in kept), sum(r[other] == value for r in kept))
            if value and len(want) < min(alone):
                assert _listed(client, version, recipe=recipe, **{other: value}) == want
                narrowed += 1
        assert narrowed, f"no recipe and {other} that narrow each other in this draw"

    source_id = next(r["source_id"] for r in kept if r["source_id"])
    want = [r["id"] for r in kept if r["source_id"] == source_id]
    assert 'id="filter-source_id"' in page
    assert _listed(client, version, source_id=source_id) == want
    assert _listed(client, version, source_id=source_id[:-1]) == []  # exact, not a prefix

    rejected = [r for r in _rows(version, "rejected") if r["recipe"]]
    assert rejected, "no grounded reject to filter"
    recipe = rejected[0]["recipe"]
    want = [r["id"] for r in rejected if r["recipe"] == recipe]
    assert _listed(client, version, kind="rejected", recipe=recipe) == want


def test_a_search_takes_the_provenance_filters_too(out: Path, client: TestClient) -> None:
    version = _grounded(out)
    kept = _rows(version, "text")
    recipe = Counter(r["recipe"] for r in kept if r["recipe"]).most_common(1)[0][0]
    word = Counter(
        w for r in kept if r["recipe"] == recipe for w in set(re.findall(r"\w+", r["text"].lower()))
        if len(w) > 4
    ).most_common(1)[0][0]  # fmt: skip
    has = [r for r in kept if word in re.findall(r"\w+", r["text"].lower())]
    want = [r["id"] for r in has if r["recipe"] == recipe]
    assert want and len(want) < len(has)  # the filter narrows the search
    assert _listed(client, version, text=word, recipe=recipe) == want
    licence = kept[[r["id"] for r in kept].index(want[0])]["license"]
    both = [r["id"] for r in has if r["recipe"] == recipe and r["license"] == licence]
    assert _listed(client, version, text=word, recipe=recipe, license=licence) == both


def test_versions_without_provenance_open_without_its_filters(
    out: Path, client: TestClient
) -> None:
    old, topic_only = out / OLD, _versions(out)[0]
    assert topic_only.name != OLD and "recipe" in pq.read_schema(topic_only / "plan.parquet").names
    assert "recipe" not in pq.read_schema(next(old.glob("text/*.parquet"))).names
    for version in (old, topic_only):
        for kind in ("text", "rejected"):
            page = client.get(f"/v/{version.name}/docs", params={"kind": kind})
            assert page.status_code == 200, (version.name, page.text)
            for name in ("recipe", "source_name", "license", "source_id"):
                assert f'name="{name}"' not in page.text, (version.name, kind, name)
        word = re.findall(r"\w{5,}", _rows(version, "text")[0]["text"])[0].lower()
        assert _listed(client, version, text=word)  # its search index builds and answers
        page = client.get(f"/v/{version.name}/docs", params={"recipe": "distill"})
        assert page.status_code == 400
        assert "records a recipe (it was written from topics" in page.text
        page = client.get(f"/v/{version.name}/docs", params={"source_id": "x"})
        assert page.status_code == 400 and "records a source id" in page.text
    grounded = _grounded(out)
    page = client.get(f"/v/{grounded.name}/docs", params={"license": "WTFPL"})
    licences = sorted({r["license"] for r in _rows(grounded, "text") if r["license"]})
    assert page.status_code == 400
    assert f"no document of {grounded.name} has this licence; its licences: " in page.text
    assert ", ".join(licences) in page.text


def test_a_grounded_document_shows_its_provenance(out: Path, client: TestClient) -> None:
    version = _grounded(out)
    kept = _rows(version, "text")
    doc = next(r for r in kept if r["source_id"])
    page = client.get(f"/v/{version.name}/doc/{doc['id']}")
    assert page.status_code == 200
    section = page.text.split('id="provenance"')[1].split("</section>")[0]
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", section))
    assert f"recipe {doc['recipe']} template {doc['template_version']}" in text
    assert f"source {doc['source_name']} sha256 {doc['source_checksum'][:12]}" in text
    assert f"source id {doc['source_id']}" in text
    assert f"licence {doc['license']}" in text
    span = f"passage {doc['source_passage']}, characters {doc['source_start']} to "
    assert span + str(doc["source_end"]) in text
    assert f'href="/v/{version.name}/docs?kind=text&recipe={doc["recipe"]}"' in section
    topic_doc = next(r for r in kept if r["source_id"] is None)
    page = client.get(f"/v/{version.name}/doc/{topic_doc['id']}")
    assert page.status_code == 200 and 'id="provenance"' not in page.text
    assert "<th>recipe</th>" not in page.text  # nor its null columns among the metadata


def _coverage(client: TestClient, version: Path) -> str:
    page = client.get(f"/v/{version.name}")
    assert page.status_code == 200, page.text
    return page.text.split('<h2 id="coverage">')[1].split("<h2")[0]


def test_every_coverage_count_links_to_that_many_documents(out: Path, client: TestClient) -> None:
    """On each version page, each count the coverage section links is the number of documents
    its link lists; no row or column is labelled "" (a grounded document's audience or format):
    those documents are counted apart, by recipe, and the two parts add up to the kept ones."""
    linked: dict[str, list[str]] = {}
    for version in (out / OLD, *_versions(out)):
        kept = _rows(version, "text")
        section = _coverage(client, version)
        head, _, body = section.partition("</thead>")
        labels = re.findall(r"<th>(.*?)</th>", head)[1:] + re.findall(r"<th>(.*?)</th>", body)
        assert all(label.strip() for label in labels), (version.name, labels)
        links = re.findall(r'<a href="([^"]+)">([\d,]+)</a>', section)
        assert links, version.name
        for href, count in links:
            path, _, query = html.unescape(href).partition("?")
            assert path == f"/v/{version.name}/docs", href
            params = dict(parse_qsl(query, keep_blank_values=True))
            assert all(params.values()), href  # an empty filter is no filter: every document
            ids = _listed(client, version, **params)
            assert len(ids) == int(count.replace(",", "")), (version.name, href, count)
        linked[version.name] = [href for href, _ in links]

        table = re.findall(r'<td class="n"[^>]*><a href="[^"]+">([\d,]+)</a></td>', section)
        cells = Counter((r["audience"], r["format"]) for r in kept if r["audience"] and r["format"])
        assert sum(int(n) for n in table) == sum(cells.values()), version.name
        outside = [r for r in kept if not (r["audience"] and r["format"])]
        line = re.search(r'id="coverage-grounded">[^:]*: (?:all )?([\d,]+)', section)
        if outside:
            assert line and int(line.group(1).replace(",", "")) == len(outside), version.name
            recipes = Counter(r["recipe"] for r in outside)
            for recipe, n in recipes.items():
                assert f'/docs?recipe={recipe}">{n}</a>' in section, (version.name, recipe)
        else:  # topic documents only: the table alone, as before grounding
            assert line is None and "grounded" not in section, version.name
    old, topic_only, mixed, only = (out / OLD, *_versions(out))
    assert linked[old.name] == [
        h.replace(topic_only.name, old.name) for h in linked[topic_only.name]
    ]
    assert "No table: all " in _coverage(client, only)  # no audience x format at all
    assert any("format=" in h for h in linked[mixed.name])  # its topic half is a table
    assert any("recipe=" in h and "audience=" in h for h in linked[mixed.name])  # qa_rephrase


def test_a_recipe_both_in_and_out_of_the_table_links_its_own_count() -> None:
    """A recipe whose documents are partly in the table (one that sets an audience and a format
    for some only: none does as shipped) links the count its link lists, not the part outside."""
    rows = [
        ("college", "story", None, 4),
        ("college", "story", "mixed", 2),
        ("", "", "mixed", 3),
        ("college", "", "mixed", 1),
        ("", "", "distill", 5),
        ("", "", None, 1),  # no recipe to link
    ]
    m = _matrix(rows)
    assert (m["rows"], m["cols"]) == (["college"], ["story"])
    assert m["cells"] == {("college", "story"): 6}
    assert m["outside"] == 10
    by = {g["recipe"]: g for g in m["grounded"]}
    assert [g["recipe"] for g in m["grounded"]] == ["distill", "mixed", None]
    assert (by["distill"]["n"], by["distill"]["listed"]) == (5, 5)
    assert (by["mixed"]["n"], by["mixed"]["listed"]) == (4, 6)
    assert by["mixed"]["audiences"] == [("college", 1, 3)]
    assert (by[None]["n"], by[None]["listed"]) == (1, None)
