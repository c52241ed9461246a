"""The sidebar (run, scenario, test, k) and the view switch; each writes the URL."""

from __future__ import annotations

import html
from pathlib import Path

import streamlit as st

from explorer import data, state
from explorer.data import Run
from explorer.render import label_text, markdown_literal, note
from explorer.state import VIEWS, Selection


@st.cache_data(max_entries=16, show_spinner=False)
def _test_labels(run_key: str, stamp: float, scenario: str) -> dict[int, str]:
    """ "Test 12 · seven ✗ → one" for every test, computed once per run and scenario."""
    run = data.load_run(Path(run_key))
    preds = run.predictions[run.predictions["scenario"] == scenario].set_index("test_id")
    unconverged = run.unconverged.get(scenario, frozenset())
    labels = {}
    for test_id, row in run.test.iterrows():
        text = f"Test {test_id} · {label_text(row)}"
        if test_id in preds.index:
            pred = preds.loc[test_id]
            mark = "✓" if bool(pred["correct"]) else "✗ → " + label_text(pred, "pred_name", "pred")
            text += f" {mark}"
        if test_id in unconverged:
            text += " · solve not converged"
        labels[int(test_id)] = text
    return labels


def _step(test_ids: list[int], current: int, step: int) -> None:
    index = test_ids.index(current) if current in test_ids else 0
    state.select_test(test_ids[(index + step) % len(test_ids)])


def render(run: Run, selection: Selection) -> None:
    """Sidebar controls. Values come from the URL; changes go back into it."""
    sidebar = st.sidebar
    task = html.escape(str(run.manifest.get("task", "run")))
    sidebar.html(
        f'<div style="font-size:22px;font-weight:700">msif explorer</div>'
        f'<div style="color:#6b7280">run <b>{html.escape(run.name)}</b> · task <b>{task}</b></div>'
    )

    st.session_state["scenario_pick"] = selection.scenario
    sidebar.segmented_control(
        "Scenario",
        run.scenarios,
        key="scenario_pick",
        format_func=markdown_literal,  # its labels are Markdown; scenario names are run data
        required=True,
        on_change=state.set_param,
        args=("scenario", "scenario_pick"),
        help="FIXED: the pretrained embedding is frozen during finetuning. "
        "UPDATED: it is finetuned too (tied to the pretrained one by the proximal term).",
    )

    test_ids = [int(t) for t in run.test.index]
    st.session_state["test_pick"] = selection.test_id
    sidebar.selectbox(
        "Test prediction",
        test_ids,
        key="test_pick",
        format_func=_test_labels(run.key, run.stamp, selection.scenario).get,
        on_change=state.set_param,
        args=("test", "test_pick"),
    )
    left, right = sidebar.columns(2)
    left.button(
        "‹ Previous",
        key="prev_test",
        on_click=_step,
        args=(test_ids, selection.test_id, -1),
        width="stretch",
    )
    right.button(
        "Next ›",
        key="next_test",
        on_click=_step,
        args=(test_ids, selection.test_id, 1),
        width="stretch",
    )

    top_k = max(1, run.top_k)
    if top_k > 1:
        st.session_state["k_pick"] = selection.k
        sidebar.slider(
            "Examples per list (k)",
            1,
            top_k,
            key="k_pick",
            on_change=state.set_param,
            args=("k", "k_pick"),
        )
    sidebar.caption(
        "Score = predicted change of the test loss if the pretraining example were removed "
        "and both stages retrained. Positive: **helpful**; negative: **harmful**."
    )
    if not run.has_scores:
        note("info", "This run has no scores.parquet: views use the top-k lists only.", sidebar)


def view_switch(selection: Selection) -> None:
    """The row of views under the header; the chosen one is `?view=` in the URL."""
    st.session_state["view_pick"] = selection.view
    st.segmented_control(
        "View",
        list(VIEWS),
        key="view_pick",
        format_func=VIEWS.get,
        required=True,
        label_visibility="collapsed",
        on_change=state.set_param,
        args=("view", "view_pick"),
    )
