"""The msif explorer, a Streamlit app over a run directory (docs/design.md section 5).

Run it with `msif explore RUN_DIR_OR_RUNS_ROOT` (explorer/launch.py), or
`MSIF_RUN=RUN_DIR streamlit run explorer/app.py`. Thin entry: it resolves the run, reads the
selection from the URL and hands over to the view modules.
"""

from __future__ import annotations

import logging

import streamlit as st

from explorer import data, render, state
from explorer.targets import app_target
from explorer.views import controls, prediction, preload, runs, view_module
from precompute.rundir import RunError

st.set_page_config(page_title="msif explorer", page_icon="🔎", layout="wide")
st.html(render.CSS)


def main() -> None:
    target = app_target()
    if target is None:
        render.note("error", "No run given: start the explorer with msif explore RUN_DIR.")
        return
    run_dir = runs.choose(target)
    if run_dir is None:
        return
    try:
        run = data.load_run(run_dir)
    except RunError as exc:
        render.note("error", f"This run cannot be shown: {exc}")
        return
    if run.test.empty or run.predictions.empty:
        render.note("error", f"The run {run.name} has no test predictions to show.")
        return

    selection, notes = state.read_selection(run)
    # the page's top is laid out first but filled last: the view's elements reach the browser
    # first, so its lists (or the map's plotly code) load while the header is drawn
    header = st.container()
    try:
        view_module(selection.view).render(run, selection)
    except RunError as exc:  # e.g. this test's scores name an example the run does not hold
        render.note("error", f"This test's scores cannot be shown: {exc}")
    except Exception as exc:  # a broken view must not take the page down; the log has more
        logging.getLogger("msif.explorer").exception("view %s failed", selection.view)
        title = state.VIEWS[selection.view]
        render.note("error", f"The {title} view could not be drawn for this run: {exc}")
    with header:
        for note in notes:
            render.note("warning", note)
        prediction.render(run, selection)
        prediction.unconverged_banner(run, selection)
        controls.view_switch(selection)
    controls.render(run, selection)
    # after the page is drawn: the first visitor does not wait for it
    preload(lambda: view_module("map").warm(run))


main()
