"""`booksmith view` in a real browser: Debian's Chromium driven by Selenium (through
/usr/bin/chromedriver, which `make setup` installs with apt), against the real command serving
two versions of fake-server runs. It clicks through every page by its links and forms, filters
documents, opens a near-duplicate pair, and fails on any error in the browser's console.
Screenshots of each page are kept in build/test-artifacts/viewer/ (BOOKSMITH_TEST_ARTIFACTS).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.test_viewer import build_output

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
ARTIFACTS = Path(os.environ.get("BOOKSMITH_TEST_ARTIFACTS", "build/test-artifacts")) / "viewer"


@pytest.fixture(scope="module")
def out(prefect_api: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_output(tmp_path_factory.mktemp("viewer-browser"))


@pytest.fixture(scope="module")
def server(out: Path) -> Iterator[str]:
    """The real command, on a free port; yields the URL it prints."""
    log = (out.parent / "view.log").open("w")  # a pipe no one reads could fill and block it
    proc = subprocess.Popen(
        [sys.executable, "-m", "booksmith", "view", str(out)],
        stdout=subprocess.PIPE, stderr=log, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        yield proc.stdout.readline().strip().rstrip("/")
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    assert Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists(), (
        "Chromium is missing: `make setup` installs Debian's chromium and chromium-driver"
    )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--window-size=1400,1000",
    ):  # fmt: skip
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        yield driver
    finally:
        driver.quit()


def _check(driver: WebDriver, name: str) -> None:
    """The page loaded without a console error; keep its screenshot."""
    driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, f"{name}: console errors {errors}"
    assert driver.find_elements(By.TAG_NAME, "main"), f"{name}: no page"
    assert not driver.find_elements(By.ID, "error"), driver.find_element(By.ID, "error").text


def _click(driver: WebDriver, text: str) -> None:
    driver.find_element(By.LINK_TEXT, text).click()


def test_every_page_by_its_links(out: Path, server: str, browser: WebDriver) -> None:
    first, second = sorted(p.name for p in out.glob("2*"))
    browser.get(server + "/")
    _check(browser, "01-versions")
    assert [
        r.text for r in browser.find_elements(By.CSS_SELECTOR, "#versions tbody td:first-child a")
    ] == [second, first]

    _click(browser, second)
    _check(browser, "02-version")
    assert browser.find_element(By.ID, "funnel").is_displayed()
    assert browser.find_elements(By.CSS_SELECTOR, "table.funnel tbody tr")
    assert browser.find_elements(By.CSS_SELECTOR, "table.matrix td a")

    _click(browser, "documents")
    _check(browser, "03-documents")
    kept = pq.read_table(out / second / "text").to_pylist()
    assert browser.find_element(By.ID, "count").text.startswith(f"{len(kept):,} document")

    # Filter by an audience with the form's select, as a user does.
    audience = kept[0]["audience"]
    Select(browser.find_element(By.NAME, "audience")).select_by_value(audience)
    browser.find_element(By.CSS_SELECTOR, "#filters button[type=submit]").click()
    _check(browser, "04-documents-filtered")
    want = sum(r["audience"] == audience for r in kept)
    assert browser.find_element(By.ID, "count").text.startswith(f"{want:,} document")
    assert f"audience={audience}" in browser.current_url
    cells = browser.find_elements(By.CSS_SELECTOR, "#docs tbody td:nth-child(3)")
    assert cells and {c.text for c in cells} == {audience}

    # A document, then its topic's documents by the metadata link.
    browser.find_element(By.CSS_SELECTOR, "#docs a.doc").click()
    _check(browser, "05-document")
    assert browser.find_element(By.CSS_SELECTOR, "#text .rendered").text.strip()
    assert browser.find_element(By.ID, "prompt").text.strip()

    # Rejects by reason, then a near-duplicate beside the document it matched.
    _click(browser, "reasons")
    _check(browser, "06-reasons")
    section = next(
        s for s in browser.find_elements(By.CSS_SELECTOR, "section.reason")
        if s.find_element(By.TAG_NAME, "h2").text.startswith("dedup_minhash")
    )  # fmt: skip
    section.find_element(By.CSS_SELECTOR, "a.doc").click()
    _check(browser, "07-near-duplicate")
    assert browser.find_element(By.ID, "reason").text == "dedup_minhash"
    pair = browser.find_element(By.ID, "pair")
    assert len(pair.find_elements(By.TAG_NAME, "mark")) >= 2
    assert re.search(
        r"exact Jaccard of word 5-grams: [01]\.\d{3}", browser.find_element(By.ID, "jaccard").text
    )
    browser.find_element(By.ID, "matched").click()
    _check(browser, "08-matched")
    assert "kept" in browser.find_element(By.TAG_NAME, "h1").text

    # The rejected list with a reason filter, a search, the topic tree, the comparison.
    browser.get(f"{server}/v/{second}/docs?kind=rejected")
    _check(browser, "09-rejected")
    Select(browser.find_element(By.NAME, "reason")).select_by_value("dedup_minhash")
    browser.find_element(By.CSS_SELECTOR, "#filters button[type=submit]").click()
    _check(browser, "10-rejected-dedup")
    assert {c.text.split("\n")[0] for c in browser.find_elements(By.CSS_SELECTOR, "td.reason")} == {
        "dedup_minhash"
    }

    word = max(re.findall(r"[a-z]{6,}", kept[0]["text"].lower()), key=len)
    box = browser.find_element(By.NAME, "text")
    box.clear()
    Select(browser.find_element(By.NAME, "kind")).select_by_value("text")
    Select(browser.find_element(By.NAME, "reason")).select_by_value("")
    box.send_keys(word)
    browser.find_element(By.CSS_SELECTOR, "#filters button[type=submit]").click()
    # The index builds once, in a child process, while the search page reloads itself every 2 s:
    # wait for the search page's own count (the page before had one too), not for "building" to
    # vanish, which it also does mid-reload.
    WebDriverWait(browser, 120, poll_frequency=1).until(
        lambda b: f"text={word}" in b.current_url and b.find_elements(By.ID, "count"),
        "the search index was never built",
    )
    _check(browser, "11-search")
    want = sum(word in re.findall(r"\w+", r["text"].lower()) for r in kept)
    assert browser.find_element(By.ID, "count").text.startswith(f"{want:,} document")

    _click(browser, "topics")
    _check(browser, "12-topics")
    assert browser.find_elements(By.CSS_SELECTOR, "#tree .node")

    _click(browser, "compare")
    _check(browser, "13-compare")
    assert browser.find_elements(By.CSS_SELECTOR, "#compare tr.differs")


def test_the_demo_output_of_the_embedded_model(
    prefect_api: str, tmp_path: Path, browser: WebDriver
) -> None:
    """`booksmith run` on the embedded default (small), then every page of its version, with
    the real model's text rendered."""
    from tests.test_e2e_embedded import booksmith

    out = tmp_path / "out"
    config = tmp_path / "demo.yaml"
    config.write_text(
        "seed: 3\nplan: {limit: 6}\ngeneration: {sampling: {max_tokens: 48}}\n"
        "fill: {documents: null}\npublish: {min_documents: 0}\n"
    )
    result = booksmith("run", "--config", str(config), "--out", str(out), api=prefect_api)
    assert result.returncode == 0, result.stderr[-3000:]
    (version,) = [p.name for p in out.glob("2*")]
    rows = [*pq.read_table(out / version / "text").to_pylist(),
            *pq.read_table(out / version / "rejected").to_pylist()]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "booksmith", "view", str(out / version)],
        stdout=subprocess.PIPE, stderr=(tmp_path / "view.log").open("w"), text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip().rstrip("/")
        browser.get(url + "/")  # a version given: the page opens at it
        assert browser.current_url.endswith(f"/v/{version}")
        _check(browser, "demo-01-version")
        for name in ("documents", "rejected", "reasons", "topics"):
            _click(browser, name)
            _check(browser, f"demo-{name}")
        browser.get(f"{url}/v/{version}/doc/{rows[0]['id']}")
        _check(browser, "demo-document")
        shown = browser.find_element(By.CSS_SELECTOR, "#text .rendered").text
        assert rows[0]["text"].split()[0].strip("#*_`") in shown
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
