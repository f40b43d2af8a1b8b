"""`booksmith view` (viewer/): each page against figures computed independently with pyarrow
from two real versions (nightly runs on the fake server: near-duplicates inside a run and
across the two, truncated and empty rejects), over a local output and over S3.

The same pages are clicked through in a real browser in test_viewer_browser.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from starlette.testclient import TestClient

from booksmith.filters.quality import train
from booksmith.filters.records_io import read_labelled
from booksmith.flows.cli_view import bind
from booksmith.schemas.filter_settings import QualitySettings
from booksmith.shards.version_dir import MANIFEST
from booksmith.viewer.app import create_app
from booksmith.viewer.store import PAGE, Output, ViewError
from tests.conftest import fake_backend_config
from tests.fakeserver import FakeServer
from tests.filters_helpers import LABELLED

pytestmark = pytest.mark.slow


def _run(server: FakeServer, out: Path, config_dir: Path, seed: int, model: Path) -> Path:
    import yaml

    from booksmith.flows.nightly import nightly
    from booksmith.flows.task_runners import with_runner
    from booksmith.schemas.config import load_config

    cfg = fake_backend_config(server.base_url, out)
    cfg["seed"] = seed
    cfg["plan"] = {"limit": 36, "chunk_requests": 12}
    cfg["dedup"] = {"redis_url": "redis://:hunter2@cache.internal:6379/0"}  # to be redacted
    cfg["filters"] = {"quality": {"model_path": str(model), "threshold": 0.0}}  # scores all
    path = config_dir / f"config-{seed}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return Path(with_runner(nightly, load_config(path))(config=str(path)))


def build_output(root: Path) -> Path:
    """Two versions of a run on the fake server (shared by the browser test)."""
    faults = {"truncated": 0.1, "empty": 0.05, "near_duplicate": 0.4, "near_duplicate_pool": 3}
    out = root / "out"
    data, _ = read_labelled(LABELLED)
    model = train(data, root / "quality", QualitySettings(), judge="hand labels").model_path
    with FakeServer(faults) as server:
        _run(server, out, root, seed=1, model=model)
        _run(server, out, root, seed=2, model=model)
    return out


@pytest.fixture(scope="module")
def out(prefect_api: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_output(tmp_path_factory.mktemp("viewer"))


@pytest.fixture(scope="module")
def client(out: Path) -> Iterator[TestClient]:
    with TestClient(create_app(Output(str(out)))) as c:
        yield c


def _rows(version: Path, kind: str) -> list[dict[str, Any]]:
    return pq.read_table(version / kind).to_pylist()


def _text(html: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


def _doc_links(html: str) -> list[str]:
    return re.findall(r'href="(/v/[^"]+/doc/[0-9a-f]+\?at=[^"]+)"', html)


def test_versions_page_lists_each_version_with_its_figures(out: Path, client: TestClient) -> None:
    versions = sorted(p for p in out.iterdir() if (p / MANIFEST).exists())
    assert len(versions) == 2
    page = client.get("/?all")
    assert page.status_code == 200
    rows = re.findall(r"<tr>(.*?)</tr>", page.text.split("<tbody>")[1], re.S)
    assert len(rows) == 2
    for row, version in zip(rows, reversed(versions), strict=True):  # newest first
        m = json.loads((version / MANIFEST).read_text())
        cells = _text(row)
        assert version.name in cells
        assert f" {m['documents']:,} " in cells and f" {m['counts']['rejected']:,} " in cells
    newer = _text(rows[0])
    first = json.loads((versions[0] / MANIFEST).read_text())["documents"]
    second = json.loads((versions[1] / MANIFEST).read_text())["documents"]
    assert f"kept {second - first:+,}" in newer and "config: seed" in newer
    assert f"/compare?a={versions[0].name}&b={versions[1].name}" in rows[0]


def test_version_page_shows_the_funnel_quality_coverage_and_redacted_manifest(
    out: Path, client: TestClient
) -> None:
    version = sorted(out.glob("2*"))[-1]
    m = json.loads((version / MANIFEST).read_text())
    page = client.get(f"/v/{version.name}")
    assert page.status_code == 200
    funnel = page.text.split('id="funnel"')[1].split("</table>")[0]
    for name, counts in m["counts"]["filter"].items():
        for reason, n in counts.items():
            if reason not in ("input", "kept") and n:
                assert f">{reason}</a> {n:,}" in funnel, (name, reason)
    kept = _rows(version, "text")
    cells = Counter((r["audience"], r["format"]) for r in kept)
    coverage = page.text.split('id="coverage"')[1].split("</table>")[0]
    for (audience, fmt), n in cells.items():
        assert f'audience={audience}&format={fmt}">{n}</a>' in coverage
    assert "hunter2" not in page.text and "cache.internal" in page.text
    assert "hunter2" not in client.get(f"/v/{version.name}/manifest.json").text


def test_no_credential_is_shown_whatever_the_manifest_holds(out: Path, tmp_path: Path) -> None:
    """A manifest written by hand (or before redaction existed) with secrets in URLs outside
    the config: no page shows them."""
    copy = tmp_path / "out"
    version = sorted(out.glob("2*"))[-1]
    shutil.copytree(version, copy / version.name)
    m = json.loads((copy / version.name / MANIFEST).read_text())
    m["card"]["source"] = "https://ops:swordfish@data.internal/x?X-Amz-Signature=s3cr3t&part=1"
    (copy / version.name / MANIFEST).write_text(json.dumps(m))
    with TestClient(create_app(Output(str(copy)))) as c:
        for url in ("/?all", f"/v/{version.name}", f"/v/{version.name}/manifest.json"):
            text = c.get(url).text
            assert "swordfish" not in text and "s3cr3t" not in text, url
        assert "data.internal" in c.get(f"/v/{version.name}").text  # the rest is still shown


def test_documents_page_filters_and_pages_like_a_scan_of_the_shards(
    out: Path, client: TestClient
) -> None:
    version = sorted(out.glob("2*"))[0]
    kept = _rows(version, "text")
    audience = Counter(r["audience"] for r in kept).most_common(1)[0][0]
    want = [r["id"] for r in kept if r["audience"] == audience]
    got: list[str] = []
    page_no = 1
    while True:
        params = {"audience": audience, "page": page_no, "per": 3}  # pages of 3, to page
        page = client.get(f"/v/{version.name}/docs", params=params)
        assert page.status_code == 200
        got += [link.split("/doc/")[1].split("?")[0] for link in _doc_links(page.text)]
        if 'id="next"' not in page.text:
            break
        page_no += 1
    assert got == want  # every match once, in shard order, across pages
    assert page_no == -(-len(want) // 3) > 1
    assert f"{len(want):,} document" in _text(page.text)

    qmin = sorted(r["quality_score"] for r in kept if r["quality_score"] is not None)[
        len(kept) // 2
    ]
    page = client.get(f"/v/{version.name}/docs", params={"qmin": qmin})
    n = sum(1 for r in kept if r["quality_score"] is not None and r["quality_score"] >= qmin)
    assert f"{n:,} document" in _text(page.text)

    rejected = _rows(version, "rejected")
    reason = Counter(r["reason"] for r in rejected).most_common(1)[0][0]
    page = client.get(f"/v/{version.name}/docs", params={"kind": "rejected", "reason": reason})
    n = sum(r["reason"] == reason for r in rejected)
    assert f"{n:,} document" in _text(page.text)
    assert len(_doc_links(page.text)) == min(n, PAGE)


def test_a_near_duplicate_shows_the_document_it_matched_across_versions(
    out: Path, client: TestClient
) -> None:
    first, second = sorted(out.glob("2*"))
    near = [r for r in _rows(second, "rejected") if r["reason"] == "dedup_minhash"]
    across = [r for r in near if json.loads(r["detail"])["matched_run"] == first.name]
    assert across, "the second run matched none of the first run's documents"
    doc = across[0]
    page = client.get(f"/v/{second.name}/doc/{doc['id']}")
    assert page.status_code == 200
    matched = {r["id"]: r for r in _rows(first, "text")}[doc["duplicate_of"]]
    assert f'href="/v/{first.name}/doc/{matched["id"]}?at=' in page.text
    pair = page.text.split('id="pair"')[1]
    assert pair.count("<mark>") >= 2  # shared passages marked on both sides
    jaccard = json.loads(doc["detail"])["jaccard"]
    assert f"MinHash, when dedup decided): {jaccard}" in _text(page.text)
    # The text outside the marks is the documents' own: nothing dropped by highlighting.
    left = pair.split('class="plain">')[1].split("</div>")[0]
    assert re.sub(r"</?mark>", "", left).replace("&#39;", "'") == doc["text"].replace("&", "&amp;")


def test_a_document_page_shows_its_text_metadata_and_prompt(out: Path, client: TestClient) -> None:
    version = sorted(out.glob("2*"))[0]
    doc = _rows(version, "text")[3]
    page = client.get(f"/v/{version.name}/doc/{doc['id']}")
    assert page.status_code == 200
    plan = {r["id"]: r for r in _rows(version, "plan.parquet")}[doc["id"]]
    prompt = page.text.split('id="prompt"')[1]
    for message in plan["messages"]:
        assert _text(message["content"]).strip()[:80] in _text(prompt)
    assert doc["text"].split()[5] in page.text
    assert client.get(f"/v/{version.name}/doc/{'0' * 32}").status_code == 404


def test_rejects_and_topics_count_what_the_shards_hold(out: Path, client: TestClient) -> None:
    version = sorted(out.glob("2*"))[-1]
    rejected = _rows(version, "rejected")
    page = _text(client.get(f"/v/{version.name}/rejects").text)
    for reason, n in Counter(r["reason"] for r in rejected).items():
        assert f"{reason} {n:,}" in page
    tree = client.get(f"/v/{version.name}/topics").text
    kept = Counter(r["topic_path"][0] for r in _rows(version, "text"))
    for root, n in kept.items():
        node = tree.split(f'<span class="node">{root}</span>')[1].split("</span>")[0]
        assert f"kept {n}" in _text(node) or f">{n}</a>" in node


def test_full_text_search_finds_exactly_the_documents_with_all_the_words(
    out: Path, client: TestClient
) -> None:
    version = sorted(out.glob("2*"))[0]
    kept = _rows(version, "text")
    words = [w for w in re.findall(r"\w+", kept[0]["text"].lower()) if len(w) > 4][:2]
    want = [r["id"] for r in kept if all(w in re.findall(r"\w+", r["text"].lower()) for w in words)]
    url = f"/v/{version.name}/docs"
    for _ in range(100):  # the index builds in the background on the first search
        page = client.get(url, params={"text": " ".join(words)})
        if 'id="building"' not in page.text:
            break
        time.sleep(0.1)
    got = [link.split("/doc/")[1].split("?")[0] for link in _doc_links(page.text)]
    assert got == want[:PAGE] and want
    assert list((out / "_state" / "view" / version.name).glob("search-*.sqlite"))
    assert not list(version.rglob("*.sqlite"))  # nothing written inside the version


def test_compare_page_puts_two_versions_side_by_side(out: Path, client: TestClient) -> None:
    a, b = sorted(out.glob("2*"))
    page = client.get("/compare", params={"a": a.name, "b": b.name})
    ma, mb = (json.loads((v / MANIFEST).read_text()) for v in (a, b))
    row = page.text.split("<td>kept</td>")[1].split("</tr>")[0]
    assert f"{ma['documents']:,}" in row and f"{mb['documents']:,}" in row
    assert "<td>seed</td><td>1</td><td>2</td>" in page.text


def test_bad_locations_and_queries_say_what_is_wrong(out: Path, client: TestClient) -> None:
    with pytest.raises(ViewError, match="no such file or directory"):
        Output(str(out / "missing"))
    with pytest.raises(ViewError, match="no dataset versions here"):
        Output(str(out / "_state"))
    version = sorted(out.glob("2*"))[0].name
    page = client.get(f"/v/{version}/docs", params={"qmin": "high"})
    assert page.status_code == 400 and "qmin=&#39;high&#39;: give a number" in page.text
    assert client.get("/v/nope").status_code == 404


def test_a_version_exported_to_s3_reads_the_same(out: Path, bucket: str) -> None:
    from booksmith.shards.export import export

    for version in sorted(out.glob("2*")):
        export(version, f"s3://{bucket}/datasets/{version.name}")  # as a nightly's export does
    with TestClient(create_app(Output(f"s3://{bucket}/datasets"))) as s3:
        page = s3.get("/?all")
        assert version.name in page.text
        near = next(r for r in _rows(version, "rejected") if r["reason"] == "dedup_minhash")
        doc = s3.get(f"/v/{version.name}/doc/{near['id']}")
        assert doc.status_code == 200 and "<mark>" in doc.text
        kept = _rows(version, "text")
        listed = s3.get(f"/v/{version.name}/docs").text
        assert [link.split("/doc/")[1].split("?")[0] for link in _doc_links(listed)] == [
            r["id"] for r in kept[:PAGE]
        ]


def test_the_command_serves_on_loopback_and_warns_off_it(out: Path) -> None:
    bad = subprocess.run(
        [sys.executable, "-m", "booksmith", "view", str(out / "missing")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 2 and "no such file or directory" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    for host, warned in (("127.0.0.1", False), ("0.0.0.0", True)):
        proc = subprocess.Popen(
            [sys.executable, "-m", "booksmith", "view", str(out), "--host", host],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "NO_COLOR": "1"},
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            url = proc.stdout.readline().strip()
            assert re.fullmatch(rf"http://{re.escape(host)}:\d+/", url)
            import urllib.request

            port = url.rsplit(":", 1)[1].rstrip("/")
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/?all", timeout=30) as r:
                assert r.status == 200 and b"Versions" in r.read()
        finally:
            proc.terminate()
            _, err = proc.communicate(timeout=30)
        assert ("anyone who can reach this machine" in err) is warned


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_the_viewers_connections_send_without_waiting_for_acks(host: str) -> None:
    """Connections accepted on `booksmith view`'s socket have Nagle off under asyncio (which
    uvicorn serves on), so a response's head and body go out without the ~40 ms stall."""
    nodelay: list[int] = []

    class Probe(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            sock = transport.get_extra_info("socket")
            nodelay.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            transport.close()

    async def accept_one() -> None:
        listening = bind(host, 0)
        server = await asyncio.get_running_loop().create_server(Probe, sock=listening)
        reader, writer = await asyncio.open_connection(host, listening.getsockname()[1])
        await reader.read()  # the server closes the connection once it has looked
        writer.close()
        server.close()
        await server.wait_closed()

    asyncio.run(accept_one())
    assert nodelay == [1]
