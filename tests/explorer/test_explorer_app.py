"""Page logic of the explorer through streamlit.testing.v1.AppTest (fast, no browser)."""

from __future__ import annotations

import re

import pandas as pd
import pyarrow.parquet as pq
import pytest
from apptest_pages import html_of, notes, param

from explorer.render import content_words
from explorer.state import VIEWS
from precompute.rundir import read_table, to_table


def list_ids(at, kind: str) -> list[int]:
    """The `#<pretrain_id>`s shown in the helpful or harmful list, in page order."""
    for body in (element.value for element in at.html):
        if body.startswith(f'<div class="msif-{kind}"><div class="msif-list'):
            return [int(i) for i in re.findall(r'class="msif-id">(?:<a [^>]*>)?#(\d+)<', body)]
    return []


def expected(run_dir, scenario: str, test_id: int, kind: str) -> list[int]:
    top = read_table(run_dir, "top")
    rows = top[(top["scenario"] == scenario) & (top["test_id"] == test_id) & (top["kind"] == kind)]
    return rows.sort_values("rank")["pretrain_id"].tolist()


def assert_clean(at) -> None:
    assert not at.exception, [e.value for e in at.exception]


def test_deep_link_shows_that_test_and_its_lists(app, image_run):
    at = app(image_run, test=7, scenario="updated")
    assert_clean(at)
    assert "<h2>Test 7</h2>" in html_of(at)
    assert "UPDATED scenario" in html_of(at)
    assert list_ids(at, "helpful") == expected(image_run, "updated", 7, "helpful")
    assert list_ids(at, "harmful") == expected(image_run, "updated", 7, "harmful")
    assert param(at, "test") == "7" and param(at, "scenario") == "updated"


def test_k_limits_the_lists(app, image_run):
    at = app(image_run, test=3, k=3)
    assert_clean(at)
    assert list_ids(at, "helpful") == expected(image_run, "fixed", 3, "helpful")[:3]
    assert len(list_ids(at, "harmful")) == 3


def test_k_slider_writes_the_url(app, image_run):
    at = app(image_run, test=3)
    at.slider(key="k_pick").set_value(4).run()
    assert_clean(at)
    assert param(at, "k") == "4"
    assert list_ids(at, "harmful") == expected(image_run, "fixed", 3, "harmful")[:4]


def test_selecting_a_test_updates_url_and_lists(app, image_run):
    at = app(image_run, test=2)
    at.selectbox(key="test_pick").select(11).run()
    assert_clean(at)
    assert param(at, "test") == "11"
    assert list_ids(at, "helpful") == expected(image_run, "fixed", 11, "helpful")
    at.button(key="next_test").click().run()
    assert param(at, "test") == "12"
    assert "<h2>Test 12</h2>" in html_of(at)


def test_scenario_and_view_switches_write_the_url(app, image_run):
    at = app(image_run, test=4)
    at.button_group(key="scenario_pick").set_value("updated").run()
    assert param(at, "scenario") == "updated"
    assert list_ids(at, "harmful") == expected(image_run, "updated", 4, "harmful")
    at.button_group(key="view_pick").set_value("provenance").run()
    assert_clean(at)
    assert param(at, "view") == "provenance"
    assert '<h3 class="msif-h3">Run digits</h3>' in html_of(at)


def test_bad_url_values_fall_back_with_a_message(app, image_run):
    at = app(image_run, test=99999, scenario="sideways", k=500, view="nope")
    assert_clean(at)
    warnings = " ".join(notes(at, "warning"))
    assert "Test 99999 is not in this run" in warnings
    assert '"sideways"' in warnings and "k=500" in warnings and '"nope"' in warnings
    assert param(at, "test") != "99999"
    assert list_ids(at, "helpful")


def test_default_selection_is_written_to_the_url(app, image_run):
    at = app(image_run)
    assert_clean(at)
    test_id = int(param(at, "test"))
    assert list_ids(at, "helpful") == expected(image_run, "fixed", test_id, "helpful")
    assert param(at, "view") == "examples"


@pytest.mark.parametrize("view", list(VIEWS))
@pytest.mark.parametrize("run_name", ["image_run", "text_run"])
def test_every_view_renders_without_exception(app, request, view, run_name):
    at = app(request.getfixturevalue(run_name), test=1, view=view)
    assert_clean(at)
    assert not at.error and not notes(at, "error"), notes(at, "error")


def test_picker_filters_and_selection(app, image_run):
    at = app(image_run, test=0, view="tests")
    table = at.dataframe[0].value
    assert len(table) == 24 and {"test_id", "input", "label", "prediction", "loss"} <= set(table)
    at.toggle(key="filter_wrong").set_value(True).run()
    wrong = at.dataframe[0].value
    assert len(wrong) < 24 and not wrong["correct"].any()
    predictions = read_table(image_run, "predictions")
    fixed = predictions[predictions["scenario"] == "fixed"]
    assert sorted(wrong["test_id"]) == sorted(fixed.loc[~fixed["correct"], "test_id"])

    at.selectbox(key="sort_tests").select("loss, highest first").run()
    losses = at.dataframe[0].value["loss"].tolist()
    assert losses == sorted(losses, reverse=True)


def test_empty_filter_result_says_so(app, image_run):
    test = read_table(image_run, "test")
    predictions = read_table(image_run, "predictions")
    fixed = predictions[predictions["scenario"] == "fixed"].merge(test, on="test_id")
    wrong_classes = set(fixed.loc[~fixed["correct"], "label_name"])
    only_right = sorted(set(test["label_name"]) - wrong_classes)
    assert only_right, "the synthetic run should have a class without wrong predictions"

    at = app(image_run, test=0, view="tests")
    at.toggle(key="filter_wrong").set_value(True).run()
    at.multiselect(key="filter_class").set_value([only_right[0]]).run()
    assert_clean(at)
    assert not at.dataframe
    assert any("No test prediction matches these filters" in i for i in notes(at, "info"))


def test_run_without_scores_falls_back_to_top_lists(app, text_run):
    assert not (text_run / "scores.parquet").exists()
    at = app(text_run, test=2)
    assert_clean(at)
    assert any("no scores.parquet" in i for i in notes(at.sidebar, "info"))
    assert list_ids(at, "helpful") == expected(text_run, "fixed", 2, "helpful")
    assert "top-k lists (no scores.parquet)" in " ".join(c.value for c in at.caption)
    for view in ("map", "distribution", "compare"):
        at = app(text_run, test=2, view=view)
        assert_clean(at)
        assert any("no scores.parquet" in i for i in notes(at.main, "info")), view


def test_text_with_html_and_markdown_is_shown_literally(app, text_run):
    test = read_table(text_run, "test")
    tricky = test[test["text"].str.contains("<b>x</b> **y**", regex=False)]
    test_id = int(tricky["test_id"].iloc[0])
    at = app(text_run, test=test_id)
    assert_clean(at)
    body = html_of(at)
    assert "&lt;b&gt;x&lt;/b&gt; **y**" in body
    assert "<b>x</b>" not in body and "<script>" not in body


def test_missing_run_is_a_message(app, tmp_path):
    at = app(tmp_path / "nowhere")
    assert_clean(at)
    assert "does not exist" in notes(at, "error")[0]


def test_folder_without_runs_is_a_message(app, tmp_path):
    at = app(tmp_path)
    assert_clean(at)
    assert "holds no msif run" in notes(at, "error")[0]


def test_incomplete_run_is_a_message(app, broken_run):
    at = app(broken_run(lambda m: m.update(complete=False)))
    assert_clean(at)
    assert "incomplete" in notes(at, "error")[0]


def test_run_without_manifest_is_a_message(app, broken_run):
    at = app(broken_run(lambda m: False))
    assert_clean(at)
    assert "no manifest.json" in notes(at, "error")[0]


def test_unknown_schema_version_is_a_message(app, broken_run):
    at = app(broken_run(lambda m: m.update(schema_version=99)))
    assert_clean(at)
    assert "schema_version 99" in notes(at, "error")[0]


def test_run_missing_a_table_is_a_message(app, broken_run):
    run = broken_run(lambda m: None)
    (run / "top.parquet").unlink()
    at = app(run)
    assert_clean(at)
    assert "top.parquet" in notes(at, "error")[0]


def test_folder_of_runs_shows_a_run_picker(app, image_run, text_run, tmp_path):
    root = tmp_path / "runs"
    root.mkdir()
    (root / "a_digits").symlink_to(image_run)
    (root / "b_text").symlink_to(text_run)
    (root / ".b_text.tmp-1234").mkdir()  # a half-written run is not offered
    at = app(root)
    assert_clean(at)
    assert at.selectbox(key="run_pick").options == ["a_digits", "b_text"]
    assert param(at, "run") == "a_digits"
    at.selectbox(key="run_pick").select("b_text").run()
    assert_clean(at)
    assert param(at, "run") == "b_text"
    assert "synthetic-text" in html_of(at)


def test_provenance_shows_the_manifest(app, image_run):
    at = app(image_run, view="provenance")
    settings = at.dataframe[0].value
    assert isinstance(settings, pd.DataFrame)
    values = dict(zip(settings["setting"], settings["value"], strict=True))
    assert values["Solver"] == "synthetic" and values["Damping"] == "0.001"


def test_false_transfer_shows_validation_correlation(app, image_run):
    at = app(image_run, view="false_transfer")
    assert_clean(at)
    labels = [m.label for m in at.metric]
    assert "Pearson r" in labels and "estimated mean loss change, all tests" in labels
    pearson = next(m for m in at.metric if m.label == "Pearson r")
    assert 0.5 < float(pearson.value) <= 1.0


def test_unnamed_classes_and_missing_inputs_still_render(app, broken_run):
    run = broken_run(lambda m: None)
    for name in ("pretrain", "test"):
        frame = read_table(run, name)
        frame["label_name"] = None
        frame["image_png"] = None
        (run / f"{name}.parquet").unlink()
        pq.write_table(to_table(name, frame), run / f"{name}.parquet")
    for view in ("examples", "tests", "classes", "false_transfer", "map"):
        at = app(run, test=2, view=view)
        assert_clean(at)
        assert not notes(at, "error"), view
    at = app(run, test=2)
    assert "(no image or text)" in html_of(at)


def test_example_ids_link_to_their_detail_on_the_map(app, image_run):
    at = app(image_run, test=6, scenario="updated", k=5)
    helpful = expected(image_run, "updated", 6, "helpful")[0]
    link = f'href="?test=6&amp;scenario=updated&amp;k=5&amp;view=map&amp;example={helpful}"'
    assert link in html_of(at)

    at = app(image_run, test=6, scenario="updated", k=5, view="map", example=helpful)
    assert_clean(at)
    assert f"<h2>#{helpful}</h2>" in html_of(at) and "rank 1 helpful" in html_of(at)
    at.text_input(key="find_pick").input("#42").run()
    assert param(at, "example") == "42" and "<h2>#42</h2>" in html_of(at)
    assert param(at, "find") == "#42"
    at = app(image_run, test=6, view="map", example="nope")
    assert_clean(at)
    assert "There is no pretraining example nope" in " ".join(notes(at, "warning"))
    assert param(at, "example") is None


def test_words_shared_with_the_test_text_are_marked(app, text_run):
    test = read_table(text_run, "test").set_index("test_id")
    top = read_table(text_run, "top")
    pretrain = read_table(text_run, "pretrain").set_index("pretrain_id")
    test_id = int(top["test_id"].iloc[0])
    at = app(text_run, test=test_id, scenario="fixed", k=5)
    assert_clean(at)
    body = html_of(at)
    shown = top[(top.test_id == test_id) & (top.scenario == "fixed") & (top["rank"] <= 5)]
    passages = pretrain.loc[shown.pretrain_id, "text"]
    shared = content_words(test.loc[test_id, "text"])
    expected = {w for p in passages for w in content_words(p) if w in shared}
    assert expected, "the synthetic run should share some words between tests and passages"
    marked = set(re.findall(r'<mark class="msif-shared">([^<]*)</mark>', body))
    assert {w.lower() for w in marked} == expected
