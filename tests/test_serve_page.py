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
ERROR_SCREENSHOT = SCREENSHOT.with_name("search_page_error.png")


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
            preview = page.locator("#query-preview")
            expect(preview).to_have_js_property("complete", True)
            box = preview.bounding_box()
            assert box is not None and box["height"] >= 128  # readable: the 48×96 query is shown at 2×
            assert box["width"] / box["height"] == pytest.approx(48 / 96, abs=0.02)  # aspect kept
            page.select_option("#modality", "visible")
            page.select_option("#rerank", "aim")
            page.fill("#topk", "12")
            page.click("#search-button")
            page.wait_for_selector("#results li.hit >> nth=11")
            _wait_for_images(page, 12)
            cards = page.locator("#results li.hit")
            assert cards.count() == 12
            assert cards.nth(0).locator(".rank").inner_text() == "#1"
            first_name = cards.nth(0).locator(".name")
            assert first_name.inner_text().startswith("0004_")
            assert first_name.get_attribute("title") == first_name.inner_text()
            # a folder gallery with Market-style names (0004_c1_00.jpg): identity and camera shown
            assert cards.nth(0).locator(".facts").inner_text() == "person 4 · camera 1"
            assert "12 results from 30 gallery images (aim" in page.inner_text("#status")
            assert "smaller = closer" in page.inner_text("#distance-note")
            expect(page.locator("#token-field")).to_be_hidden()  # no token configured
            shot = tmp_path / "page.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            if os.environ.get("VIREID_UPDATE_SCREENSHOT") == "1":
                shutil.copyfile(shot, SCREENSHOT)
            for method in ("plain", "aim", "sgr", "mnnr", "sim", "krr"):  # one convention for every method
                page.select_option("#rerank", method)
                page.click("#search-button")
                expect(page.locator("#status")).to_contain_text(f"30 gallery images ({method},")
                shown = [float(text.removeprefix("distance ")) for text in page.locator("#results .distance").all_inner_texts()]
                assert len(shown) == 12 and shown == sorted(shown) and shown[0] >= 0, (method, shown)
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

            failing = browser.new_page(viewport={"width": 800, "height": 330})
            failing.route("**/health", lambda route: route.fulfill(status=503, content_type="application/json",
                                                                    body='{"detail": "index damaged"}'))
            failing.goto(server.url + "/")
            expect(failing.locator("#index-info")).to_contain_text("unavailable")
            assert "index damaged" in failing.inner_text("#index-info")
            if os.environ.get("VIREID_UPDATE_SCREENSHOT") == "1":
                failing.screenshot(path=str(ERROR_SCREENSHOT))
            down = browser.new_page()
            down.route("**/health", lambda route: route.abort())
            down.goto(server.url + "/")
            expect(down.locator("#index-info")).to_contain_text("unavailable")
        finally:
            browser.close()


def test_long_file_names_wrap_at_separators(chromium_path: Path, tmp_path: Path) -> None:
    """A long name breaks after ``_ - . /`` (never inside a part, never past its card); the full
    name is the tooltip."""
    import json

    from playwright.sync_api import sync_playwright

    index = build_image_index(tmp_path, pids=range(1, 3), per_pid=2)
    query = tmp_path / "q.jpg"
    query.write_bytes(person_image(1, 12, size=(48, 96)))
    names = ["entrance-north/2026-01-07T08.15.33_visible_camera_0004_frame_000123.jpg",
             "0002_c3s1_000451_03.jpg", "short.jpg"]
    body = {"version": "v000001", "count": 3, "modality": "infrared", "rerank": "sim",
            "timing_ms": {"encode": 1.0, "search": 1.0},
            "results": [{"rank": r + 1, "distance": 0.1 * r, "id": r, "name": name, "modality": "visible",
                         "pid": None, "cam": None, "time": None} for r, name in enumerate(names)]}
    with RunningServer(index, ServiceConfig()) as server, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium_path), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 900, "height": 640})
            page.route("**/search", lambda route: route.fulfill(status=200, content_type="application/json",
                                                                 body=json.dumps(body)))
            page.goto(server.url + "/")
            page.set_input_files("#query-file", str(query))
            page.click("#search-button")
            expect(page.locator("#results li.hit")).to_have_count(3)
            long_name = page.locator("#results .name").first
            assert long_name.inner_text() == names[0] and long_name.get_attribute("title") == names[0]
            card = page.locator("#results li.hit").first.bounding_box()
            box = long_name.bounding_box()
            assert card is not None and box is not None
            assert card["x"] <= box["x"] and box["x"] + box["width"] <= card["x"] + card["width"]  # no overflow
            # the lines each part of the name occupies: every part on one line, the name on several
            parts = long_name.evaluate("""node => Array.from(node.childNodes)
                .filter(child => child.nodeType === Node.TEXT_NODE)
                .map(child => { const range = document.createRange(); range.selectNodeContents(child);
                                return [child.textContent, Array.from(range.getClientRects(),
                                                                      rect => Math.round(rect.top))]; })""")
            assert "".join(part for part, _ in parts) == names[0]
            assert all(len(set(tops)) == 1 for _, tops in parts), parts  # no part broken inside
            assert len({tops[0] for _, tops in parts}) >= 3, parts  # the name wraps onto several lines
            assert page.locator("#results .facts").count() == 0  # unknown identities stay blank
        finally:
            browser.close()
