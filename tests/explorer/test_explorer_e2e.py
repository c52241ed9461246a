"""End-to-end: the served explorer in real headless Chromium (Playwright + Debian chromium).

Everything expected is read from the run directory of the `e2e_run` fixture, so the same tests
hold for a synthetic run and for a real `msif precompute --task digits` run.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from precompute.rundir import read_table

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ASSETS = Path(__file__).resolve().parents[2] / "assets"
EXCEPTIONS = '[data-testid="stException"]'
TIMEOUT_MS = 30_000


def rank1(run_dir: Path, scenario: str, test_id: int) -> tuple[int, int]:
    """The rank-1 helpful and rank-1 harmful pretrain_id of one test, from top.parquet."""
    top = read_table(run_dir, "top")
    rows = top[(top["scenario"] == scenario) & (top["test_id"] == test_id) & (top["rank"] == 1)]
    by_kind = dict(zip(rows["kind"], rows["pretrain_id"], strict=True))
    return int(by_kind["helpful"]), int(by_kind["harmful"])


def two_tests(run_dir: Path) -> tuple[str, int, int]:
    """A scenario and two of its tests with different rank-1 lists (a wrong prediction first,
    the interesting case for a demo)."""
    predictions = read_table(run_dir, "predictions")
    scenario = str(predictions["scenario"].iloc[0])
    rows = predictions[predictions["scenario"] == scenario].sort_values(["correct", "test_id"])
    first = int(rows["test_id"].iloc[0])
    for other in rows["test_id"].iloc[1:]:
        if set(rank1(run_dir, scenario, int(other))).isdisjoint(rank1(run_dir, scenario, first)):
            return scenario, first, int(other)
    return scenario, first, int(rows["test_id"].iloc[1])


def expect_lists(page, run_dir: Path, scenario: str, test_id: int) -> None:
    """Wait until the page shows this test with its rank-1 helpful and harmful `#id`s."""
    helpful, harmful = rank1(run_dir, scenario, test_id)
    page.get_by_role("heading", name=f"Test {test_id}", exact=True).wait_for(timeout=TIMEOUT_MS)
    for kind, pretrain_id in (("helpful", helpful), ("harmful", harmful)):
        card_id = page.locator(f".msif-{kind} .msif-id", has_text=re.compile(f"^#{pretrain_id}$"))
        card_id.first.wait_for(timeout=TIMEOUT_MS)


def test_deep_link_shows_rank1_helpful_and_harmful(page, explorer_url, e2e_run):
    scenario, test_id, _ = two_tests(e2e_run)
    page.goto(f"{explorer_url}/?test={test_id}&scenario={scenario}")
    expect_lists(page, e2e_run, scenario, test_id)
    helpful, harmful = rank1(e2e_run, scenario, test_id)
    text = page.inner_text("body")
    assert f"#{helpful}" in text and f"#{harmful}" in text
    assert page.locator(EXCEPTIONS).count() == 0
    assert f"test={test_id}" in page.url and f"scenario={scenario}" in page.url


def test_selecting_another_test_updates_url_and_lists(page, explorer_url, e2e_run):
    scenario, first, second = two_tests(e2e_run)
    page.goto(f"{explorer_url}/?test={first}&scenario={scenario}")
    expect_lists(page, e2e_run, scenario, first)

    select = page.locator('[data-testid="stSidebar"] [data-testid="stSelectbox"]').last
    select.click()
    page.keyboard.type(f"Test {second} ·")
    page.get_by_role("option", name=re.compile(f"^Test {second} ·")).first.click()

    wait_for_param(page, "test", second)
    expect_lists(page, e2e_run, scenario, second)
    # the old test's rank-1 helpful example is gone unless it helps the new test too
    old_helpful, _ = rank1(e2e_run, scenario, first)
    top = read_table(e2e_run, "top")
    new_helpful = top[
        (top["scenario"] == scenario) & (top["test_id"] == second) & (top["kind"] == "helpful")
    ]["pretrain_id"].tolist()
    if old_helpful not in new_helpful:
        shown = page.locator(".msif-helpful .msif-id", has_text=re.compile(f"^#{old_helpful}$"))
        assert shown.count() == 0
    assert page.locator(EXCEPTIONS).count() == 0


def test_every_view_opens_without_exception_boxes(page, explorer_url, e2e_run):
    from explorer.state import VIEWS

    scenario, test_id, _ = two_tests(e2e_run)
    page.goto(f"{explorer_url}/?test={test_id}&scenario={scenario}")
    page.get_by_role("heading", name=f"Test {test_id}", exact=True).wait_for(timeout=TIMEOUT_MS)
    for view, title in VIEWS.items():
        page.locator("[data-testid=stButtonGroup]").get_by_text(title, exact=True).click()
        wait_for_param(page, "view", view)
        page.wait_for_timeout(1000)  # let the view finish drawing
        assert page.locator(EXCEPTIONS).count() == 0, view
        errors = page.locator('[data-testid="stAlertContentError"], .msif-note-error')
        assert errors.count() == 0, view
        assert f"test={test_id}" in page.url, view
    # the map draws with WebGL: its plotly container is on the page
    page.goto(f"{explorer_url}/?test={test_id}&scenario={scenario}&view=map")
    page.locator(".js-plotly-plot").first.wait_for(timeout=TIMEOUT_MS)


def test_screenshot_of_the_main_view(page, explorer_url, e2e_run):
    """Saves assets/explorer.png, the screenshot the README shows."""
    scenario, test_id, _ = two_tests(e2e_run)
    page.set_viewport_size({"width": 1440, "height": 940})
    page.goto(f"{explorer_url}/?test={test_id}&scenario={scenario}&k=8")
    expect_lists(page, e2e_run, scenario, test_id)
    page.wait_for_load_state("networkidle")
    page.wait_for_timeout(1000)
    assert page.locator(EXCEPTIONS).count() == 0
    ASSETS.mkdir(exist_ok=True)
    page.screenshot(path=str(ASSETS / "explorer.png"))
    assert (ASSETS / "explorer.png").stat().st_size > 20_000


def click_on_map(page, x: float, y: float) -> None:
    """Click the map at data coordinates (x, y), converted to pixels by plotly's own axes."""
    left, top = page.evaluate(
        """([x, y]) => {
            const plot = document.querySelector('.js-plotly-plot');
            const layout = plot._fullLayout, box = plot.getBoundingClientRect();
            return [box.left + layout.xaxis._offset + layout.xaxis.l2p(x),
                    box.top + layout.yaxis._offset + layout.yaxis.l2p(y)];
        }""",
        [x, y],
    )
    page.mouse.move(left, top)
    page.wait_for_timeout(200)
    page.mouse.click(left, top)


def wait_for_param(page, name: str, value) -> None:
    page.wait_for_function(
        f"() => new URLSearchParams(location.search).get('{name}') === '{value}'",
        timeout=TIMEOUT_MS,
    )


def isolated(candidates: pd.DataFrame, marks: pd.DataFrame):
    """The index of the candidate farthest from every other mark, so a click hits it."""
    xy = marks[["umap_x", "umap_y"]].to_numpy(dtype=float)
    best, best_gap = None, -1.0
    for index, row in candidates.iterrows():
        gaps = np.hypot(xy[:, 0] - row["umap_x"], xy[:, 1] - row["umap_y"])
        gaps = gaps[gaps > 1e-9]  # not itself
        gap = gaps.min() if gaps.size else np.inf
        if gap > best_gap:
            best, best_gap = index, gap
    return best


def test_map_opens_examples_and_picks_a_test(page, explorer_url, e2e_run):
    scenario, first, _ = two_tests(e2e_run)
    helpful, _ = rank1(e2e_run, scenario, first)
    page.goto(f"{explorer_url}/?test={first}&scenario={scenario}")
    expect_lists(page, e2e_run, scenario, first)

    # an id in the helpful list opens that example on the map
    page.locator(".msif-helpful .msif-id a", has_text=re.compile(f"^#{helpful}$")).first.click()
    wait_for_param(page, "example", helpful)
    assert "view=map" in page.url
    page.get_by_role("heading", name=f"#{helpful}", exact=True).wait_for(timeout=TIMEOUT_MS)
    page.locator(".js-plotly-plot").first.wait_for(timeout=TIMEOUT_MS)
    page.wait_for_timeout(1000)

    # clicking a highlighted example on the map opens it (one that no other marker covers)
    pretrain = read_table(e2e_run, "pretrain").set_index("pretrain_id")
    test = read_table(e2e_run, "test").set_index("test_id")
    top = read_table(e2e_run, "top")
    shown = top[(top["scenario"] == scenario) & (top["test_id"] == first) & (top["rank"] <= 10)]
    highlighted = pretrain.loc[shown["pretrain_id"], ["umap_x", "umap_y"]]
    marks = pd.concat([highlighted, test.loc[[first], ["umap_x", "umap_y"]]])
    example = int(isolated(highlighted.drop(index=helpful, errors="ignore"), marks))
    click_on_map(page, *pretrain.loc[example, ["umap_x", "umap_y"]].astype(float))
    wait_for_param(page, "example", example)
    page.get_by_role("heading", name=f"#{example}", exact=True).wait_for(timeout=TIMEOUT_MS)

    # clicking a test example on the map selects it
    marks = pd.concat([marks, test[["umap_x", "umap_y"]]])
    other = int(isolated(test.drop(index=first), marks))
    page.wait_for_timeout(500)
    click_on_map(page, *test.loc[other, ["umap_x", "umap_y"]].astype(float))
    wait_for_param(page, "test", other)
    page.get_by_role("heading", name=f"Test {other}", exact=True).wait_for(timeout=TIMEOUT_MS)
    assert page.locator(EXCEPTIONS).count() == 0


def test_picker_table_row_selects_a_test(page, explorer_url, e2e_run):
    scenario, first, _ = two_tests(e2e_run)
    test_ids = sorted(read_table(e2e_run, "test")["test_id"].astype(int))
    row = next(i for i in range(1, 6) if test_ids[i] != first)  # a row near the top
    page.goto(f"{explorer_url}/?test={first}&scenario={scenario}&view=tests")
    grid = page.locator('[data-testid="stDataFrame"]').first
    grid.wait_for(timeout=TIMEOUT_MS)
    page.wait_for_timeout(1000)
    box = grid.bounding_box()
    header, height = 35, 44  # the picker's header and thumbnail row heights, in pixels
    page.mouse.click(box["x"] + 15, box["y"] + header + height * row + height / 2)
    wait_for_param(page, "test", test_ids[row])
    page.get_by_role("heading", name=f"Test {test_ids[row]}", exact=True).wait_for()
    assert page.locator(EXCEPTIONS).count() == 0
