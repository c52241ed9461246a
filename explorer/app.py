"""The msif explorer, a Streamlit app over a run directory (DESIGN.md section 5).

Run it with `msif explore RUN_DIR_OR_RUNS_ROOT` (explorer/launch.py), or
`MSIF_RUN=RUN_DIR streamlit run explorer/app.py`. Thin entry: it resolves the run, reads the
selection from the URL and hands over to the view modules.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import streamlit as st

from explorer import data, render, state
from explorer.views import controls, prediction, runs, view_module
from precompute.rundir import RunError

st.set_page_config(page_title="msif explorer", page_icon="🔎", layout="wide")
st.html(render.CSS)


def _target() -> Path | None:
    """The run (or folder of runs) named by MSIF_RUN or the first script argument."""
    value = os.environ.get("MSIF_RUN") or (sys.argv[1] if len(sys.argv) > 1 else None)
    return Path(value).expanduser() if value else None


def main() -> None:
    target = _target()
    if target is None:
        st.error("No run given: start the explorer with `msif explore RUN_DIR`.")
        return
    run_dir = runs.choose(target)
    if run_dir is None:
        return
    try:
        run = data.load_run(run_dir)
    except RunError as exc:
        st.error(f"This run cannot be shown: {exc}")
        return
    if run.test.empty or run.predictions.empty:
        st.error(f"The run {run.name} has no test predictions to show.")
        return

    selection, notes = state.read_selection(run)
    for note in notes:
        st.warning(note)
    controls.render(run, selection)
    prediction.render(run, selection)
    controls.view_switch(selection)
    try:
        view_module(selection.view).render(run, selection)
    except Exception as exc:  # a broken view must not take the page down; the log has more
        logging.getLogger("msif.explorer").exception("view %s failed", selection.view)
        st.error(f"The {state.VIEWS[selection.view]} view could not be drawn for this run: {exc}")


main()
