"""Values from the URL or from a run are shown as text, never as Markdown or HTML (AppTest)."""

from __future__ import annotations

import html
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apptest_pages import html_of, markdown_of, notes
from explorer_payloads import LINK, PAYLOADS, SCENARIOS, TASK, write_payload_run

from explorer.render import literal_html, markdown_literal, plotly_text
from explorer.state import VIEWS


@pytest.fixture(scope="module")
def payload_run(tmp_path_factory) -> Path:
    return write_payload_run(tmp_path_factory.mktemp("runs"))


def assert_literal(at, *values: str) -> None:
    """No value reaches an element streamlit renders as Markdown, and the st.html bodies hold
    it only escaped."""
    assert not at.exception, [e.value for e in at.exception]
    markdown = markdown_of(at)
    bodies = html_of(at)
    assert "evil.example" not in markdown
    for value in values:
        assert value not in markdown
        if html.escape(value) != value:
            assert value not in bodies


@pytest.mark.parametrize("payload", PAYLOADS)
def test_url_scenario_is_shown_literally_in_the_warning(app, image_run, payload):
    at = app(image_run, scenario=payload)
    assert_literal(at, payload)
    assert notes(at, "warning") == [f'Scenario "{payload}" is not in this run; showing "fixed".']


@pytest.mark.parametrize("name", ["test", "k", "view", "example"])
def test_every_url_value_in_a_note_is_literal(app, image_run, name):
    at = app(image_run, **{name: LINK})
    assert_literal(at, LINK)
    warnings = notes(at, "warning")
    assert len(warnings) == 1 and LINK in warnings[0]


def test_url_run_name_is_literal(app, image_run, tmp_path):
    (tmp_path / "a").symlink_to(image_run)
    at = app(tmp_path, run=LINK)
    assert_literal(at, LINK)
    assert notes(at, "warning") == [f'There is no run named "{LINK}" in {tmp_path}; showing "a".']


@pytest.mark.parametrize("view", list(VIEWS))
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_run_values_are_literal_in_every_view(app, payload_run, view, scenario):
    at = app(payload_run, test=1, scenario=scenario, view=view)
    assert_literal(at, *PAYLOADS, TASK, SCENARIOS[1], payload_run.name)
    assert not notes(at, "error"), notes(at, "error")
    # the scenario switch renders its labels as Markdown: they arrive escaped
    options = at.button_group(key="scenario_pick").options
    assert options == [markdown_literal(s) for s in sorted(SCENARIOS)]


def test_payload_run_shows_its_names_as_text(app, payload_run):
    at = app(payload_run, test=1, scenario=SCENARIOS[1], view="provenance")
    bodies = html_of(at)
    assert html.escape(TASK) in bodies  # sidebar: task
    assert html.escape(payload_run.name) in bodies  # sidebar and heading: run folder
    assert f'<h3 class="msif-h3">Run {html.escape(payload_run.name)}</h3>' in bodies
    warnings = notes(at, "warning")
    assert any(f"test 1 in the {SCENARIOS[1]} scenario" in w for w in warnings), warnings


def test_literal_html_escapes_everything_and_markdown_literal_escapes_punctuation():
    assert literal_html("<b>x</b> & **y**", "c") == (
        '<div class="c">&lt;b&gt;x&lt;/b&gt; &amp; **y**</div>'
    )
    assert markdown_literal(LINK) == (
        r"\[Session expired\: click here\]\(https\:\/\/evil\.example\/login\)"
    )
    assert markdown_literal("fixed") == "fixed"
    assert plotly_text("<a href='x'>a</a>") == "&lt;a href=&#x27;x&#x27;&gt;a&lt;/a&gt;"


def test_text_that_looks_like_an_image_stays_text(app, text_run, tmp_path):
    """A text run's input column is text even when a text starts with "data:image": the grid
    would otherwise load every cell (an https://evil.example/... one too) as a picture."""
    run = tmp_path / "run"
    shutil.copytree(text_run, run)
    for name in ("test", "pretrain"):
        frame = pq.read_table(run / f"{name}.parquet").to_pandas()
        frame["text"] = ["data:image/png;base64,iVBORw0KGgo=", "https://evil.example/x.png"] * (
            len(frame) // 2
        ) + ["x"] * (len(frame) % 2)
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), run / f"{name}.parquet")
    for view in ("tests", "false_transfer"):
        at = app(run, test=0, view=view)
        assert not at.exception, [e.value for e in at.exception]
        columns = json.loads(at.dataframe[0].proto.columns)
        assert columns["input"]["type_config"]["type"] == "text", view
