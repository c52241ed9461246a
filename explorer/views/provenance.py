"""Provenance: how the run was made (task, solver, damping, alpha, counts, timings, created)."""

from __future__ import annotations

import json

import pandas as pd
import streamlit as st

from explorer.data import Run
from explorer.render import caption, heading
from explorer.state import Selection

LABELS = {
    "task": "Task",
    "scenarios": "Scenarios",
    "solver": "Solver",
    "damping": "Damping",
    "proximal_alpha": "Proximal alpha (UPDATED)",
    "top_k": "Top-k stored",
    "full_scores": "Full scores stored",
    "device": "Device",
    "created_at": "Created",
    "schema_version": "Schema version",
}


def _text(value) -> str:
    return json.dumps(value, default=str) if isinstance(value, (dict, list)) else str(value)


def render(run: Run, selection: Selection) -> None:
    manifest = run.manifest
    heading(f"Run {run.name}")
    caption(str(run.path))
    rows = [(LABELS[k], _text(manifest[k])) for k in LABELS if k in manifest]
    rows += [
        (k, _text(v))
        for k, v in manifest.items()
        if k not in LABELS and k not in ("counts", "timings_s", "versions", "complete")
    ]
    left, right = st.columns(2)
    left.dataframe(pd.DataFrame(rows, columns=["setting", "value"]), hide_index=True)
    for title, key in (
        ("Counts", "counts"),
        ("Timings (s)", "timings_s"),
        ("Versions", "versions"),
    ):
        value = manifest.get(key)
        if isinstance(value, dict) and value:
            right.markdown(f"**{title}**")
            right.dataframe(
                pd.DataFrame({"": list(value), "value": [_text(v) for v in value.values()]}),
                hide_index=True,
            )
    tables = sorted(p.name for p in run.path.glob("*.parquet"))
    caption("Files: " + ", ".join(tables + ["manifest.json"]))
    with st.expander("manifest.json"):
        st.json(manifest)
