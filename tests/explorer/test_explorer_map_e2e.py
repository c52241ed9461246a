"""The map of a larger run in headless Chromium: drawn as a raster, box selection lists and
exports the examples inside, zoom redraws, search opens an example, and visitors arriving at
once each see their own test."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from explorer.launch import start, stop, wait_until_healthy, warm_up
from explorer.synthetic import write_synthetic_run
from precompute.rundir import read_table

pytestmark = [pytest.mark.browser, pytest.mark.slow]

TIMEOUT_MS = 60_000
EXCEPTIONS = '[data-testid="stException"]'
MAP_DRAWN = """(name) => [...document.querySelectorAll('.js-plotly-plot')].some(plot =>
    (plot.data || []).some(trace => trace.name === name)
    && [...plot.querySelectorAll('.imagelayer image')]
        .some(img => (img.getAttribute('href') || '').startsWith('data:image/png')))"""
# The map drawn for the URL: its first chart (one it replaces may linger below it for a moment)
# spans the URL's `zoom` (when there is one) with its raster exactly where its axes are (drawn
# for this view, not magnified), and the zoom hook listens to it (embedding_map.ZOOM_JS marks
# it): a drag or double click on it now reaches the server.
MAP_READY = """() => { const p = document.querySelector('.js-plotly-plot');
    if (!p || !p.layout || p.getAttribute('data-msif-zoom') !== 'hooked') return false;
    const image = (p.layout.images || [])[0], range = p.layout.xaxis.range;
    const near = (a, b) => Math.abs(a - b) < 1e-6 * (range[1] - range[0]);
    const zoom = new URLSearchParams(location.search).get('zoom');
    const [x0, x1] = zoom ? zoom.split(',').map(Number) : range;
    return !!image && near(image.x, range[0]) && near(image.x + image.sizex, range[1])
        && near(range[0], x0) && near(range[1], x1); }"""


@pytest.fixture(scope="module")
def big_run(tmp_path_factory) -> Path:
    return write_synthetic_run(tmp_path_factory.mktemp("runs") / "big", 30_000, 12, images=False)


@pytest.fixture(scope="module")
def big_url(big_run, tmp_path_factory):
    log = (tmp_path_factory.mktemp("logs") / "streamlit.log").open("w")
    process, port = start(big_run, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until_healthy(port, process)
        warm_up(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(process)
        log.close()


def open_map(page, url: str, test_id: int) -> None:
    page.goto(f"{url}/?test={test_id}&scenario=fixed&view=map")
    page.wait_for_function(MAP_DRAWN, arg=f"test {test_id}", timeout=TIMEOUT_MS)


def drag(page, start: tuple[float, float], end: tuple[float, float]) -> None:
    """Drag on the plot between two points given as fractions of its drawing area."""
    area = page.locator(".js-plotly-plot .nsewdrag").first.bounding_box()

    def at(fraction):
        return area["x"] + area["width"] * fraction[0], area["y"] + area["height"] * fraction[1]

    page.mouse.move(*at(start))
    page.mouse.down()
    for step in range(1, 11):
        fx = start[0] + (end[0] - start[0]) * step / 10
        fy = start[1] + (end[1] - start[1]) * step / 10
        page.mouse.move(*at((fx, fy)))
    page.mouse.up()


def tool(page, title: str) -> None:
    """Pick a tool in the plot's toolbar (plotly's mode bar), e.g. "Box Select"."""
    page.locator(".js-plotly-plot").first.hover()
    page.locator(f'.js-plotly-plot .modebar-btn[data-title="{title}"]').first.click()


def image_range(page) -> list[float]:
    """The x range the map's raster covers, and the x range of the axis."""
    return page.evaluate(
        """() => { const plot = document.querySelector('.js-plotly-plot');
                   const image = plot.layout.images[0];
                   return [image.x, image.x + image.sizex, ...plot.layout.xaxis.range]; }"""
    )


def test_zoom_and_pan_redraw_the_raster_at_the_new_ranges(page, big_url):
    open_map(page, big_url, 4)
    page.wait_for_timeout(500)
    page.wait_for_function(MAP_READY, timeout=TIMEOUT_MS)
    whole = image_range(page)
    drag(page, (0.3, 0.3), (0.55, 0.6))  # plotly's zoom: the default drag
    page.wait_for_function("() => new URLSearchParams(location.search).has('zoom')")
    page.wait_for_function(MAP_DRAWN, arg="test 4", timeout=TIMEOUT_MS)
    page.wait_for_function(MAP_READY, timeout=TIMEOUT_MS)
    x0, x1, a0, a1 = image_range(page)
    assert (x0, x1) == pytest.approx((a0, a1), rel=1e-6, abs=1e-6)  # redrawn where shown
    assert x1 - x0 < 0.4 * (whole[1] - whole[0])
    zoom = page.evaluate("() => new URLSearchParams(location.search).get('zoom')")

    # another test from the sidebar: the map is drawn for it at the same zoom, zooming still
    # redraws
    select = page.locator('[data-testid="stSidebar"] [data-testid="stSelectbox"]').last
    select.click()
    page.keyboard.type("Test 6 ·")
    page.get_by_role("option", name=re.compile("^Test 6 ·")).first.click()
    page.wait_for_function(MAP_DRAWN, arg="test 6", timeout=TIMEOUT_MS)
    page.wait_for_timeout(1000)
    page.wait_for_function(MAP_READY, timeout=TIMEOUT_MS)
    drag(page, (0.2, 0.2), (0.7, 0.7))
    page.wait_for_function(
        "(old) => new URLSearchParams(location.search).get('zoom') !== old", arg=zoom
    )
    # the new zoom mounts a new chart: double-click it once it is drawn and hooked (before the
    # hook listens to it, the reset would show a magnified raster and never reach the server)
    page.wait_for_function(MAP_READY, timeout=TIMEOUT_MS)
    page.locator(".js-plotly-plot .nsewdrag").first.dblclick()  # back to the whole map
    page.wait_for_function("() => !new URLSearchParams(location.search).has('zoom')")
    page.wait_for_function(
        "(x0) => document.querySelector('.js-plotly-plot').layout.images[0].x === x0",
        arg=whole[0],
        timeout=TIMEOUT_MS,
    )
    assert image_range(page) == pytest.approx(whole, rel=1e-6, abs=1e-6)
    assert page.locator(EXCEPTIONS).count() == 0


def test_a_box_lists_the_examples_inside_and_exports_them(page, big_url, big_run, tmp_path):
    open_map(page, big_url, 3)
    page.wait_for_timeout(500)
    tool(page, "Box Select")
    drag(page, (0.45, 0.15), (0.8, 0.55))
    heading = page.get_by_role("heading", name=re.compile(r"^Selection: [\d,]+ pretraining"))
    heading.wait_for(timeout=TIMEOUT_MS)
    box = page.evaluate(
        """() => { const s = document.querySelector('.js-plotly-plot').layout.selections[0];
                   return [s.x0, s.x1, s.y0, s.y1]; }"""
    )
    x0, x1 = sorted(box[:2])
    y0, y1 = sorted(box[2:])
    pretrain = read_table(big_run, "pretrain", columns=["pretrain_id", "umap_x", "umap_y"])
    inside = pretrain[pretrain.umap_x.between(x0, x1) & pretrain.umap_y.between(y0, y1)]
    assert len(inside) > 100
    assert heading.inner_text() == f"Selection: {len(inside):,} pretraining examples"
    assert page.locator(EXCEPTIONS).count() == 0

    with page.expect_download(timeout=TIMEOUT_MS) as download:
        page.get_by_role("button", name=re.compile("Download the selection")).click()
    path = tmp_path / "selection.csv"
    download.value.save_as(path)
    csv = pd.read_csv(path)
    assert sorted(csv["pretrain_id"]) == sorted(inside["pretrain_id"])

    page.get_by_role("button", name=re.compile("Zoom into the selection")).click()
    page.wait_for_function("() => new URLSearchParams(location.search).has('zoom')")
    page.wait_for_function(MAP_DRAWN, arg="test 3", timeout=TIMEOUT_MS)
    page.wait_for_function(MAP_READY, timeout=TIMEOUT_MS)  # the new chart, not the one it replaces
    shown = page.evaluate("() => document.querySelector('.js-plotly-plot').layout.xaxis.range")
    assert x0 - 0.2 * (x1 - x0) < shown[0] < x0 and x1 < shown[1] < x1 + 0.2 * (x1 - x0)


def test_search_by_id_opens_the_example(page, big_url, big_run):
    open_map(page, big_url, 5)
    box = page.get_by_label("Find pretraining examples")
    box.fill("#1234")
    box.press("Enter")
    page.get_by_role("heading", name="#1234", exact=True).wait_for(timeout=TIMEOUT_MS)
    text = read_table(big_run, "pretrain").set_index("pretrain_id").loc[1234, "text"]
    assert text in page.locator(".msif-hero").last.inner_text()
    assert "example=1234" in page.url


def test_visitors_arriving_at_once_each_see_their_own_test(browser, big_url, big_run):
    top = read_table(big_run, "top")
    tests = [2, 5, 8, 11]
    contexts = [browser.new_context(viewport={"width": 1280, "height": 900}) for _ in tests]
    pages = [context.new_page() for context in contexts]
    try:
        for page, test_id in zip(pages, tests, strict=True):  # all requests go out first
            page.goto(f"{big_url}/?test={test_id}&scenario=updated", wait_until="commit")
        for page, test_id in zip(pages, tests, strict=True):
            rows = top[(top.scenario == "updated") & (top.test_id == test_id) & (top["rank"] == 1)]
            for kind, pretrain_id in zip(rows["kind"], rows["pretrain_id"], strict=True):
                card = page.locator(f".msif-{kind} .msif-id", has_text=f"#{pretrain_id}")
                card.first.wait_for(timeout=TIMEOUT_MS)
            page.get_by_role("heading", name=f"Test {test_id}", exact=True).wait_for()
            assert f"test={test_id}" in page.url
    finally:
        for context in contexts:
            context.close()
