"""The test-prediction picker: every test with its input, true label and prediction; filters
(wrong only, class) and sorting; selecting a row selects the test."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from explorer import data, state
from explorer.data import Run
from explorer.render import caption, note, png_data_uri
from explorer.state import Selection

SORTS = {
    "test id": ("test_id", True),
    "loss, highest first": ("loss", False),
    "confidence, lowest first": ("confidence", True),
    "confidence, highest first": ("confidence", False),
}


@st.cache_data(max_entries=8, show_spinner=False)
def _thumbnails(run_key: str, stamp: float) -> list[str | None]:
    """Test thumbnails scaled up with nearest neighbour (the table would blur small images)."""
    pngs = data.load_run(Path(run_key)).test["image_png"]
    return [png_data_uri(png, upscale_to=32) for png in pngs]


def picker_table(run: Run, scenario: str) -> pd.DataFrame:
    """One row per test: id, input (thumbnail or text snippet), label, prediction, scores."""
    preds = run.predictions[run.predictions["scenario"] == scenario].set_index("test_id")
    test = run.test
    table = pd.DataFrame(
        {
            "test_id": test.index.astype(int),
            "label": data.class_names(test),
        },
        index=test.index.rename(None),
    )
    if test["image_png"].notna().any():
        table.insert(1, "input", _thumbnails(run.key, run.stamp))
    else:
        snippet = test["text"].fillna("").astype(str).str.slice(0, 80)
        table.insert(1, "input", snippet)
    table["prediction"] = data.class_names(preds, "pred_name", "pred").reindex(test.index)
    table["confidence"] = preds["confidence"].reindex(test.index).astype(float)
    table["loss"] = preds["loss"].reindex(test.index).astype(float)
    table["correct"] = preds["correct"].reindex(test.index).astype("boolean")
    return table


def render(run: Run, selection: Selection) -> None:
    table = picker_table(run, selection.scenario)
    left, middle, right = st.columns([1, 2, 1.4])
    wrong_only = left.toggle("Wrong predictions only", key="filter_wrong")
    classes = middle.multiselect(
        "True class", sorted(table["label"].unique()), key="filter_class", placeholder="all classes"
    )
    sort = right.selectbox("Sort by", list(SORTS), key="sort_tests")
    if wrong_only:
        table = table[table["correct"] == False]  # noqa: E712 (nullable booleans)
    if classes:
        table = table[table["label"].isin(classes)]
    if table.empty:
        note("info", "No test prediction matches these filters. Clear a filter to see tests again.")
        return
    column, ascending = SORTS[sort]
    table = table.sort_values(column, ascending=ascending, kind="stable").reset_index(drop=True)
    caption(
        f"{len(table)} of {len(run.test)} test predictions ({selection.scenario}). "
        "Click a row to select it."
    )
    st.download_button(
        "Download this table (CSV)",
        table.drop(columns="input").to_csv(index=False),
        file_name=f"msif_{run.name}_{selection.scenario}_tests.csv",
        mime="text/csv",
        icon=":material/download:",
    )
    position = table.index[table["test_id"] == selection.test_id]
    is_image = bool(run.test["image_png"].notna().any())  # never decided from the cells
    # a new key whenever the rows or the selected test change, so the table shows the
    # selection of the URL rather than an old click
    key = f"picker_{selection.scenario}_{selection.test_id}_{hash(tuple(table['test_id']))}"
    st.dataframe(
        table,
        key=key,
        hide_index=True,
        height=520,
        row_height=44 if is_image else None,
        on_select=lambda: _on_select(key, table),
        selection_mode="single-row",
        selection_default={"selection": {"rows": [int(p) for p in position]}}
        if len(position)
        else None,
        column_config={
            "test_id": st.column_config.NumberColumn("test", format="%d"),
            "input": st.column_config.ImageColumn("input")
            if is_image
            else st.column_config.TextColumn("input"),
            "confidence": st.column_config.ProgressColumn(
                "confidence", min_value=0.0, max_value=1.0, format="percent"
            ),
            "loss": st.column_config.NumberColumn("loss", format="%.3f"),
        },
    )


def _on_select(key: str, table: pd.DataFrame) -> None:
    rows = st.session_state[key].selection.rows
    if rows:
        state.select_test(int(table["test_id"].iloc[rows[0]]))
