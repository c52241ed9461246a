"""The run picker: when the explorer is pointed at a folder of runs, choose one (`?run=NAME`)."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from explorer.render import note
from explorer.targets import find_runs, looks_like_run


def _on_pick() -> None:
    name = st.session_state.get("run_pick")
    st.query_params.clear()  # a test id of one run means nothing in another
    if name:
        st.query_params["run"] = name


def choose(target: Path) -> Path | None:
    """The run directory to show, or None after writing a message into the page."""
    if not target.exists():
        note("error", f"No run at {target}: the folder does not exist.")
        return None
    if not target.is_dir():
        note("error", f"{target} is not a folder: give a run directory or a folder of runs.")
        return None
    if looks_like_run(target):
        return target
    candidates = find_runs(target)
    if not candidates:
        note(
            "error",
            f"{target} holds no msif run: a run directory has a manifest.json "
            "(make one with msif precompute --task digits --out RUN_DIR).",
        )
        return None
    names = [p.name for p in candidates]
    wanted = st.query_params.get("run")
    if wanted not in names:
        if wanted is not None:
            note("warning", f'There is no run named "{wanted}" in {target}; showing "{names[0]}".')
        wanted = names[0]
        st.query_params["run"] = wanted
    st.session_state["run_pick"] = wanted
    st.sidebar.selectbox("Run", names, key="run_pick", on_change=_on_pick)
    return target / wanted
