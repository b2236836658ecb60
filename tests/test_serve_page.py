"""The web page in a real headless Chromium (Debian's ``chromium`` driven by Playwright):
upload a query, see ranked thumbnails, take a screenshot."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from test_serve_support import RunningServer, build_image_index, person_image

try:
    from playwright.sync_api import expect
except ImportError:  # pragma: no cover - the tests skip without a browser anyway
    expect = None
from vireid.serve.app import ServiceConfig

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
#: With VIREID_UPDATE_SCREENSHOT=1 the screenshot also replaces the one in the documentation.
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "images" / "search_page.png"


def _wait_for_images(page, count: int) -> None:  # type: ignore[no-untyped-def]
    """Every result thumbnail loaded (read through the DOM, not evaluated: the CSP forbids eval)."""
    images = page.locator("#results img")
    expect(images).to_have_count(count)
    for i in range(count):
        expect(images.nth(i)).to_have_js_property("complete", True)
        expect(images.nth(i)).not_to_have_js_property("naturalWidth", 0)


@pytest.fixture(scope="module")
def chromium_path() -> Path:
    if not CHROMIUM.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{CHROMIUM} is required in CI (apt-get install -y chromium)")
        pytest.skip(f"{CHROMIUM} not installed")
    return CHROMIUM


def test_upload_a_query_and_see_ranked_thumbnails(chromium_path: Path, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    index = build_image_index(tmp_path, pids=range(1, 11), per_pid=3)
    query = tmp_path / "night_query.jpg"
    query.write_bytes(person_image(4, 12, size=(48, 96)))
    with RunningServer(index, ServiceConfig()) as server, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium_path), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 640})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(server.url + "/")
            expect(page.locator("#index-info")).to_contain_text("30 gallery images")  # no eval: the page's CSP forbids it
            page.set_input_files("#query-file", str(query))
            page.select_option("#modality", "visible")
            page.select_option("#rerank", "aim")
            page.fill("#topk", "12")
            page.click("#search-button")
            page.wait_for_selector("#results li.hit >> nth=11")
            _wait_for_images(page, 12)
            cards = page.locator("#results li.hit")
            assert cards.count() == 12
            assert cards.nth(0).locator(".rank").inner_text() == "#1"
            assert cards.nth(0).locator(".name").inner_text().startswith("0004_")
            assert "12 results from 30 gallery images (aim" in page.inner_text("#status")
            shot = tmp_path / "page.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            if os.environ.get("VIREID_UPDATE_SCREENSHOT") == "1":
                shutil.copyfile(shot, SCREENSHOT)
            assert errors == []
        finally:
            browser.close()


def test_the_page_asks_for_the_token_and_reports_a_failing_health_check(chromium_path: Path, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    index = build_image_index(tmp_path, pids=range(1, 5), per_pid=3)
    query = tmp_path / "q.jpg"
    query.write_bytes(person_image(2, 12, size=(48, 96)))
    token = "page-token-3f9e2b71"
    with RunningServer(index, ServiceConfig(token=token)) as server, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium_path), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(server.url + "/")
            expect(page.locator("#token-field")).to_be_visible()
            page.fill("#token", token)
            page.dispatch_event("#token", "change")
            page.set_input_files("#query-file", str(query))
            page.click("#search-button")
            page.wait_for_selector("#results li.hit >> nth=3")
            _wait_for_images(page, 12)  # the whole gallery: topk 20 > 12 items
            assert page.locator("#results img").first.get_attribute("src").startswith("blob:")  # fetched with the token
            assert errors == []

            failing = browser.new_page()
            failing.route("**/health", lambda route: route.fulfill(status=503, content_type="application/json",
                                                                    body='{"detail": "index damaged"}'))
            failing.goto(server.url + "/")
            expect(failing.locator("#index-info")).to_contain_text("unavailable")
            assert "index damaged" in failing.inner_text("#index-info")
            down = browser.new_page()
            down.route("**/health", lambda route: route.abort())
            down.goto(server.url + "/")
            expect(down.locator("#index-info")).to_contain_text("unavailable")
        finally:
            browser.close()
