"""The explorer on a larger run (AppTest): the map as a raster with a small overlay, selection,
search, zoom, and the comparison of two runs. 30,000 text rows: large enough that a point per
example would show, small enough for CI."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from apptest_pages import html_of, notes, param
from PIL import Image

from explorer import data, raster, state
from explorer.state import Selection
from explorer.synthetic import write_synthetic_run
from explorer.views import compare, embedding_map
from precompute.rundir import read_table, read_test_scores

pytestmark = pytest.mark.slow

N = 30_000


@pytest.fixture(scope="module")
def big_run(tmp_path_factory) -> Path:
    return write_synthetic_run(tmp_path_factory.mktemp("runs") / "big", N, 12, images=False)


def figure_of(at) -> dict:
    charts = at.get("plotly_chart")
    assert len(charts) == 1
    return json.loads(charts[0].proto.spec)


def points(trace: dict) -> int:
    """The number of points of a trace (plotly sends numeric arrays as base64 'bdata')."""
    x = trace.get("x")
    if isinstance(x, dict):
        return len(base64.b64decode(x["bdata"])) // np.dtype(x["dtype"]).itemsize
    return len(x or [])


def raster_of(spec: dict) -> Image.Image:
    source = spec["layout"]["images"][0]["source"]
    assert source.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1])))


def test_the_map_is_a_raster_under_a_small_overlay(app, big_run):
    at = app(big_run, test=4, scenario="fixed", view="map")
    assert not at.exception, [e.value for e in at.exception]
    spec = figure_of(at)
    names = [trace.get("name") for trace in spec["data"]]
    assert "test 4" in names and "top-10 helpful" in names and "top-10 harmful" in names
    # no trace carries the pretraining examples: at most the tests, the top-k and the star
    assert sum(points(trace) for trace in spec["data"]) <= 12 + 2 * 10 + 3
    assert len(at.get("plotly_chart")[0].proto.spec) < 250_000
    assert raster_of(spec).size == (raster.WIDTH, raster.HEIGHT)
    tests = next(t for t in spec["data"] if t["name"].startswith("test examples"))
    assert tests["marker"]["symbol"] == "diamond-open"  # the colours under them stay visible


def test_the_map_stays_one_chart_across_reruns_and_warms_ahead(app, big_run):
    """A page's first map is preceded by a blank chart (so the browser loads plotly while the
    raster is drawn) that the map replaces; later reruns send the map alone. Warming draws the
    first test's map off any page, with the same raster a visitor then gets."""
    at = app(big_run, test=5, scenario="fixed", view="map")
    first = figure_of(at)  # exactly one chart: the blank one was replaced
    assert at.session_state[embedding_map.PLOTLY_SHOWN]
    at.query_params["test"] = "6"
    again = figure_of(at.run())
    assert "test 5" in {t.get("name") for t in first["data"]}
    assert "test 6" in {t.get("name") for t in again["data"]}
    blank = embedding_map.blank_figure().to_dict()
    assert not blank["data"] and blank["layout"]["height"] == first["layout"]["height"]

    run = data.load_run(big_run)
    embedding_map.warm(run)
    scenario = run.scenarios[0]
    test_id = state.default_test(run, scenario)
    png, _, _ = data.map_image(run, scenario, test_id, run.map_extent)
    shown = app(big_run, test=test_id, scenario=scenario, view="map")
    assert raster_of(figure_of(shown)).tobytes() == Image.open(io.BytesIO(png)).tobytes()


def test_the_raster_shows_every_score_of_the_selected_test(app, big_run):
    """The map's PNG equals the raster drawn from a whole read of scores.parquet."""
    at = app(big_run, test=7, scenario="updated", view="map")
    shown = np.asarray(raster_of(figure_of(at)).convert("RGBA"))
    pretrain = read_table(big_run, "pretrain", columns=["pretrain_id", "umap_x", "umap_y"])
    scores = read_test_scores(big_run, "updated", 7).set_index("pretrain_id")["score"]
    values = scores.reindex(pretrain["pretrain_id"]).to_numpy(np.float32)
    run = data.load_run(big_run)
    extent = run.map_extent
    pixel = raster.pixels(pretrain["umap_x"].to_numpy(), pretrain["umap_y"].to_numpy(), extent)
    expected, _ = raster.score_image(pixel, values)
    expected = np.asarray(Image.open(io.BytesIO(raster.png(expected))).convert("RGBA"))
    np.testing.assert_array_equal(shown, expected)
    other = np.asarray(raster_of(figure_of(app(big_run, test=8, view="map"))).convert("RGBA"))
    assert (other != shown).any()


def test_without_scores_the_map_is_coloured_by_class(app, text_run):
    at = app(text_run, test=2, view="map")
    spec = figure_of(at)
    legend = [trace.get("name") for trace in spec["data"]]
    assert {"sports", "science", "politics", "arts"} <= set(legend)
    colours = {
        tuple(c) for c in np.asarray(raster_of(spec).convert("RGBA"))[..., :3].reshape(-1, 3)
    }
    assert set(raster.PALETTE[:4]) <= colours


def test_zoom_in_the_url_redraws_that_part_of_the_map(app, big_run):
    at = app(big_run, test=4, view="map", zoom="0,3,-1,2")
    spec = figure_of(at)
    assert spec["layout"]["xaxis"]["range"] == [0, 3] and spec["layout"]["yaxis"]["range"] == [
        -1,
        2,
    ]
    image = spec["layout"]["images"][0]
    assert (image["x"], image["y"], image["sizex"], image["sizey"]) == (0, 2, 3, 3)
    assert "Show the whole map" in [b.label for b in at.button]
    at = app(big_run, test=4, view="map", zoom="left")
    assert notes(at, "warning") == ["zoom=left is not x0,x1,y0,y1: showing the whole map."]


def test_a_box_lists_its_examples_with_their_scores_and_summed_influence(big_run):
    run = data.load_run(big_run)
    selection = Selection(scenario="fixed", test_id=3, k=10, view="map")
    box = ((-2.0, 1.5), (3.0, 7.0))
    positions = data.region_positions(run, box=box)
    pretrain = read_table(big_run, "pretrain", columns=["pretrain_id", "umap_x", "umap_y"])
    inside = pretrain[pretrain.umap_x.between(-2, 1.5) & pretrain.umap_y.between(3, 7)]
    assert len(positions) == len(inside) > 100
    table = embedding_map.region_table(run, selection, positions)
    scores = read_test_scores(big_run, "fixed", 3).set_index("pretrain_id")["score"]
    expected = scores.loc[inside["pretrain_id"]]
    assert sorted(table["pretrain_id"]) == sorted(inside["pretrain_id"])
    assert table["score"].abs().is_monotonic_decreasing
    totals = embedding_map.region_totals(run, selection, table)
    assert totals["summed"] == pytest.approx(float(expected.sum()), rel=1e-4)
    assert totals["share"] == pytest.approx(expected.abs().sum() / scores.abs().sum(), rel=1e-4)
    csv = pd.read_csv(io.StringIO(embedding_map.selection_csv(run, table)))
    assert len(csv) == len(inside) and {"pretrain_id", "class", "score", "text"} <= set(csv)
    texts = read_table(big_run, "pretrain").set_index("pretrain_id")["text"]
    assert (csv["text"].to_numpy() == texts.loc[csv["pretrain_id"]].to_numpy()).all()


def test_search_finds_texts_and_lists_them(app, big_run):
    at = app(big_run, test=1, view="map", find="POLITICS senate")
    texts = read_table(big_run, "pretrain")["text"]
    count = int(texts.str.contains("politics senate", case=False, regex=False).sum())
    assert count > 100
    assert f"{count:,} pretraining examples match" in html_of(at)
    table = at.dataframe[0].value
    assert len(table) == embedding_map.SEARCH_ROWS
    assert table["input"].str.contains("politics senate", case=False).all()
    at = app(big_run, test=1, view="map", find="no such words here")
    assert "No pretraining example matches" in html_of(at)


@pytest.fixture(scope="module")
def runs_folder(tmp_path_factory) -> Path:
    """Three runs side by side: a and b of one task (b with other scores), c of another."""
    root = tmp_path_factory.mktemp("folder")
    write_synthetic_run(root / "a", 400, 10, seed=1)
    write_synthetic_run(root / "b", 400, 10, seed=2)
    write_synthetic_run(root / "c", 400, 10, seed=1, images=False)
    return root


def expected_overlap(root: Path, test_id: int, kind: str, k: int) -> int:
    lists = []
    for name in ("a", "b"):
        top = read_table(root / name, "top")
        rows = top[(top.scenario == "fixed") & (top.test_id == test_id) & (top.kind == kind)]
        lists.append(set(rows[rows["rank"] <= k]["pretrain_id"]))
    return len(lists[0] & lists[1])


def test_two_runs_of_a_task_are_compared_side_by_side(app, runs_folder):
    at = app(runs_folder, run="a", test=2, scenario="fixed", view="compare", vs_run="b")
    assert not at.exception, [e.value for e in at.exception]
    metrics = {m.label: m.value for m in at.metric}
    for kind in ("helpful", "harmful"):
        overlap = expected_overlap(runs_folder, 2, kind, 10)
        assert metrics[f"top-10 {kind} in both"] == f"{overlap} of 10"
    a = read_test_scores(runs_folder / "a", "fixed", 2).set_index("pretrain_id")["score"]
    b = read_test_scores(runs_folder / "b", "fixed", 2).set_index("pretrain_id")["score"]
    rho = a.rank().corr(b.reindex(a.index).rank())
    assert metrics["rank correlation (Spearman)"] == f"{rho:.3f}"
    options = at.selectbox(key="vs_pick").options
    assert "b · fixed" in options and "this run · updated" in options and "c · fixed" in options
    per_test = at.dataframe[-1].value
    assert len(per_test) == 10
    row = per_test[per_test["test_id"] == 2].iloc[0]
    assert row["top-10 helpful in both"] == expected_overlap(runs_folder, 2, "helpful", 10)

    at.selectbox(key="vs_pick").select("this run · updated").run()
    assert param(at, "vs_run") is None and param(at, "vs_scenario") == "updated"
    at = app(runs_folder, run="a", test=2, view="compare", vs_run="c")
    assert any("is of task 'synthetic-text'" in n for n in notes(at, "info"))


def test_changes_of_side_are_the_listed_examples_whose_sign_differs(runs_folder):
    a_run, b_run = data.load_run(runs_folder / "a"), data.load_run(runs_folder / "b")
    a = compare.Side(a_run, "fixed", "a")
    b = compare.Side(b_run, "fixed", "b")
    table = compare.overlaps(a, b, 10)
    top_a, top_b = a_run.top, b_run.top
    for test_id in range(10):
        rows_a = top_a[(top_a.scenario == "fixed") & (top_a.test_id == test_id)]
        rows_b = top_b[(top_b.scenario == "fixed") & (top_b.test_id == test_id)]
        kinds = rows_a.merge(rows_b, on="pretrain_id")
        flips = int((kinds["kind_x"] != kinds["kind_y"]).sum())
        assert table.loc[table.test_id == test_id, "changed sides"].item() == flips
