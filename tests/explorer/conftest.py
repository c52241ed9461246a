"""Fixtures of the explorer tests: synthetic runs, an AppTest factory, a served explorer and a
headless Chromium page (Debian chromium driven by Playwright)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from explorer.launch import APP, start, stop, wait_until_healthy, warm_up
from explorer.synthetic import write_synthetic_run

CHROMIUM = os.environ.get("MSIF_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="session")
def image_run(tmp_path_factory) -> Path:
    """A small synthetic digits run with full scores and validation.parquet."""
    return write_synthetic_run(tmp_path_factory.mktemp("runs") / "digits", 600, 24, seed=1)


@pytest.fixture(scope="session")
def text_run(tmp_path_factory) -> Path:
    """A synthetic text run WITHOUT scores.parquet (views fall back to top.parquet)."""
    out = tmp_path_factory.mktemp("runs") / "text"
    return write_synthetic_run(out, 300, 16, images=False, full_scores=False, seed=2)


@pytest.fixture
def broken_run(tmp_path, image_run):
    """A factory: a copy of the image run with its manifest changed by `edit(manifest)`."""

    def make(edit) -> Path:
        out = tmp_path / "broken"
        out.mkdir()
        for item in image_run.iterdir():
            (out / item.name).symlink_to(item)
        (out / "manifest.json").unlink()
        manifest = json.loads((image_run / "manifest.json").read_text())
        if edit(manifest) is not False:
            (out / "manifest.json").write_text(json.dumps(manifest))
        return out

    return make


@pytest.fixture
def app(monkeypatch):
    """A factory of streamlit AppTests of explorer/app.py on a run, with URL parameters."""
    from streamlit.testing.v1 import AppTest

    def make(target: Path, **params):
        monkeypatch.setenv("MSIF_RUN", str(target))
        at = AppTest.from_file(str(APP), default_timeout=60)
        for key, value in params.items():
            at.query_params[key] = str(value)
        return at.run()

    return make


# --- browser tests ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def e2e_run(digits_run) -> Path:
    """THE run directory of the end-to-end tests: the real `msif precompute --task digits` run
    (tests/conftest.py). Assertions read what they expect from its parquet files."""
    return digits_run


@pytest.fixture(scope="session")
def explorer_url(e2e_run, tmp_path_factory):
    """The explorer served on 127.0.0.1 over `e2e_run`; stopped at the end of the session."""
    log = (tmp_path_factory.mktemp("logs") / "streamlit.log").open("w")
    process, port = start(e2e_run, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until_healthy(port, process)
        warm_up(port)  # as `msif explore` does before it announces the URL
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(process)
        log.close()


@pytest.fixture(scope="session")
def browser():
    if os.environ.get("CI") and not Path(CHROMIUM).exists():  # CI must run them, never skip
        pytest.fail(f"no Chromium at {CHROMIUM}: scripts/test installs it (apt-get)")
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1440, "height": 1000})
    page = context.new_page()
    yield page
    context.close()
