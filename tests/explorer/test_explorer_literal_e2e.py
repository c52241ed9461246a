"""In headless Chromium: URL and run values render as the literal characters, with no link,
image, formula or markup made from them and no request to the payloads' host."""

from __future__ import annotations

import re
import subprocess
from urllib.parse import urlencode, urlparse

import pytest
from explorer_payloads import (
    PAYLOADS,
    RUN_NAME,
    SCENARIOS,
    TASK,
    UNCONVERGED_TEST,
    write_payload_run,
)

from explorer.launch import start, stop, wait_until_healthy, warm_up
from explorer.state import VIEWS

pytestmark = [pytest.mark.browser, pytest.mark.slow]

TIMEOUT_MS = 30_000
EVIL_HOST = "evil.example"
# every element whose link or source resolves to the payloads' host (SVG links included); the
# app's own relative links carry the URL's values in their query, which is fine
EVIL_ELEMENTS = """host => Array.from(document.querySelectorAll('*')).filter(e =>
    Array.from(e.attributes).some(a => {
        if (!/^(href|src|srcset|xlink:href|action|formaction|data|poster)$/.test(a.name)) {
            return false;
        }
        try { return new URL(a.value, location.href).hostname === host; }
        catch (err) { return false; }
    })).map(e => e.outerHTML.slice(0, 200))"""
FORMULAS = ".katex, mjx-container, .MathJax"


@pytest.fixture(scope="module")
def payload_url(tmp_path_factory):
    """The explorer served over a run made of payloads."""
    run = write_payload_run(tmp_path_factory.mktemp("runs"))
    log = (tmp_path_factory.mktemp("logs") / "streamlit.log").open("w")
    process, port = start(run, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until_healthy(port, process)
        warm_up(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(process)
        log.close()


@pytest.fixture
def requests(page):
    """Every URL the page asks for."""
    seen: list[str] = []
    page.on("request", lambda request: seen.append(request.url))
    return seen


def open_page(page, url: str) -> None:
    page.goto(url)
    page.get_by_role("heading", name=re.compile(r"^Test \d+$")).first.wait_for(timeout=TIMEOUT_MS)
    page.wait_for_load_state("networkidle")
    page.wait_for_timeout(800)  # let plotly and the widgets finish drawing


def assert_inert(page, requests: list[str]) -> None:
    assert page.locator('[data-testid="stException"]').count() == 0
    assert page.evaluate(EVIL_ELEMENTS, EVIL_HOST) == []
    assert page.locator(FORMULAS).count() == 0
    assert [u for u in requests if urlparse(u).hostname == EVIL_HOST] == []


def test_url_values_show_literally_in_the_warning_boxes(page, payload_url, requests):
    names = ["scenario", "view", "example", "k", "test"]
    for start_at in range(0, len(PAYLOADS), len(names)):
        values = PAYLOADS[start_at : start_at + len(names)]
        open_page(page, f"{payload_url}/?" + urlencode(dict(zip(names, values, strict=False))))
        assert_inert(page, requests)
        boxes = page.locator(".msif-note-warning")
        texts = [boxes.nth(i).inner_text() for i in range(boxes.count())]
        for value in values:
            shown = [t for t in texts if value in t]
            assert len(shown) == 1, (value, texts)
        # each box is one text node: nothing in it became an element
        for i in range(boxes.count()):
            assert boxes.nth(i).evaluate("e => e.children.length") == 0
    first = sorted(SCENARIOS)[0]  # the payload scenario: "*" sorts before "f"
    scenario_note = f'Scenario "{PAYLOADS[0]}" is not in this run; showing "{first}".'
    open_page(page, f"{payload_url}/?" + urlencode({"scenario": PAYLOADS[0]}))
    assert page.locator(".msif-note-warning").first.inner_text() == scenario_note


def test_run_values_show_literally_in_every_view(page, payload_url, requests):
    scenario = SCENARIOS[1]
    for view in VIEWS:
        query = {"test": UNCONVERGED_TEST, "scenario": scenario, "view": view}
        open_page(page, f"{payload_url}/?" + urlencode(query))
        assert_inert(page, requests)
        sidebar = page.locator('[data-testid="stSidebar"]').inner_text()
        assert TASK in sidebar and RUN_NAME in sidebar, view
        switch = page.locator('[data-testid="stSidebar"] [data-testid="stButtonGroup"]')
        assert scenario in switch.inner_text(), view  # the scenario name, as typed
        banner = page.locator(".msif-note-warning", has_text="did not converge")
        assert scenario in banner.inner_text(), view
        assert page.locator('[data-testid="stAlertContentError"], .msif-note-error').count() == 0
    # the example cards and the hero show the class names as typed
    open_page(page, f"{payload_url}/?" + urlencode({"test": 2, "scenario": "fixed"}))
    labels = page.locator(".msif-label").all_inner_texts()
    assert labels and set(labels) <= set(PAYLOADS)
    assert any("<" in label or "*" in label or "$" in label for label in labels)
    assert_inert(page, requests)
