"""The page state lives in the URL: `?test=ID&scenario=S&k=K&view=V` (plus `example=ID` for an
opened pretraining example, `run=` for a folder of runs, and the map's `zoom=x0,x1,y0,y1`, the
search's `find=` and the comparison's `vs=`), so every view is a link that can be sent to
someone.

Widgets never own the state: they write `st.query_params` in their callbacks, and each rerun
reads the selection back from the URL.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from urllib.parse import urlencode

import streamlit as st

from explorer.data import Run

VIEWS = {
    "examples": "Helpful & harmful",
    "map": "Embedding map",
    "tests": "All tests",
    "distribution": "Score distribution",
    "classes": "Per class",
    "compare": "Compare",
    "false_transfer": "False transfer",
    "provenance": "Provenance",
}
DEFAULT_VIEW = "examples"
DEFAULT_K = 10


@dataclass(frozen=True)
class Selection:
    """What the page shows: one test prediction of one scenario, k examples, one view."""

    scenario: str
    test_id: int
    k: int
    view: str
    example: int | None = None  # a pretraining example opened in detail

    def link(self, **changes) -> str:
        """The relative URL (`?test=...`) of this selection with `changes` applied."""
        values = {**asdict(self), **changes}
        params = {
            "test": values["test_id"],
            "scenario": values["scenario"],
            "k": values["k"],
            "view": values["view"],
        }
        if values["example"] is not None:
            params["example"] = values["example"]
        return "?" + urlencode(params)


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def read_selection(run: Run) -> tuple[Selection, list[str]]:
    """The selection in the URL, validated against the run; the URL is rewritten to the
    values shown. The second value lists what in the URL could not be used, as sentences of
    plain text (show them with explorer.render.note, never as Markdown)."""
    params = st.query_params
    notes = []

    scenarios = run.scenarios
    scenario = params.get("scenario")
    if scenario not in scenarios:
        if scenario is not None:
            notes.append(f'Scenario "{scenario}" is not in this run; showing "{scenarios[0]}".')
        scenario = scenarios[0]

    test_ids = run.test.index
    test_id = _int(params.get("test"))
    if test_id is None or test_id not in test_ids:
        fallback = default_test(run, scenario)
        if params.get("test") is not None:
            notes.append(f"Test {params.get('test')} is not in this run; showing test {fallback}.")
        test_id = fallback

    top_k = max(1, run.top_k)
    k = _int(params.get("k"))
    if k is None or not 1 <= k <= top_k:
        if params.get("k") is not None:
            notes.append(
                f"k={params.get('k')} is out of range 1..{top_k}; showing {min(DEFAULT_K, top_k)}."
            )
        k = min(DEFAULT_K, top_k)

    view = params.get("view", DEFAULT_VIEW)
    if view not in VIEWS:
        notes.append(f'There is no view "{view}"; showing the main view.')
        view = DEFAULT_VIEW

    example = _int(params.get("example"))
    if params.get("example") is not None and (example is None or example not in run.pretrain.index):
        notes.append(f"There is no pretraining example {params.get('example')} in this run.")
        example = None

    selection = Selection(scenario=scenario, test_id=int(test_id), k=k, view=view, example=example)
    write_selection(selection)
    return selection, notes


def default_test(run: Run, scenario: str) -> int:
    """The first wrong prediction (the interesting case), else the first test."""
    preds = run.predictions[run.predictions["scenario"] == scenario]
    wrong = preds[~preds["correct"].astype(bool) & preds["test_id"].isin(run.test.index)]
    if len(wrong):
        return int(wrong["test_id"].iloc[0])
    return int(run.test.index[0])


def write_selection(selection: Selection) -> None:
    """Put the selection into the URL (only the keys that changed, to keep history clean)."""
    wanted = {
        "test": str(selection.test_id),
        "scenario": selection.scenario,
        "k": str(selection.k),
        "view": selection.view,
    }
    for key, value in wanted.items():
        if st.query_params.get(key) != value:
            st.query_params[key] = value
    if selection.example is None:
        if "example" in st.query_params:
            del st.query_params["example"]
    elif st.query_params.get("example") != str(selection.example):
        st.query_params["example"] = str(selection.example)


def select_test(test_id: int) -> None:
    """Make `test_id` the selected test (used from callbacks; the rerun reads it back)."""
    st.query_params["test"] = str(int(test_id))


def set_param(name: str, widget_key: str) -> None:
    """Callback: copy a widget's value into the URL parameter `name` (None removes it)."""
    value = st.session_state.get(widget_key)
    if value is not None:
        st.query_params[name] = str(int(value) if isinstance(value, float) else value)
    elif name in st.query_params:
        del st.query_params[name]


def param(name: str) -> str | None:
    """A URL parameter outside the selection (e.g. the map's `zoom`, the search's `find`)."""
    return st.query_params.get(name)


def set_url(name: str, value: str | None) -> None:
    """Set (or, given None, remove) the URL parameter `name`; usable from callbacks."""
    if value is None:
        if name in st.query_params:
            del st.query_params[name]
    elif st.query_params.get(name) != value:
        st.query_params[name] = value
