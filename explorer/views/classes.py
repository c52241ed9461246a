"""Per-class aggregates: helpful and harmful mass per pretraining class for the selected test,
and across all tests a heatmap of test class x pretraining class (mean score)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from explorer import data
from explorer.data import Run
from explorer.render import DIVERGING, HARMFUL, HELPFUL, caption, note, plotly_text
from explorer.state import Selection


def _escaped(names) -> list[str]:
    """Class names for plotly, which would otherwise render tags found in the data."""
    return [plotly_text(name) for name in names]


def class_mass(run: Run, selection: Selection) -> tuple[pd.DataFrame, str]:
    """Helpful (sum of positive scores) and harmful (sum of negative) mass per pretrain class."""
    classes = data.pretrain_classes(run)
    values = data.score_values(run, selection.scenario, selection.test_id)
    if values is None:
        top = pd.concat(
            [
                data.top_list(run, selection.scenario, selection.test_id, kind, run.top_k)
                for kind in ("helpful", "harmful")
            ]
        )
        codes = classes.cat.codes.reindex(top["pretrain_id"]).fillna(-1).to_numpy(np.int64)
        values = top["score"].to_numpy(np.float64)
        source = "the top-k lists only (no scores.parquet)"
    else:
        codes = classes.cat.codes.to_numpy()
        source = "all pretraining examples"
    use = (codes >= 0) & np.isfinite(values)
    codes, values = codes[use], values[use].astype(np.float64)
    size = len(classes.cat.categories)
    helpful = np.bincount(codes, weights=np.clip(values, 0, None), minlength=size)
    harmful = np.bincount(codes, weights=np.clip(values, None, 0), minlength=size)
    present = np.bincount(codes, minlength=size) > 0
    mass = pd.DataFrame(
        {"helpful": helpful, "harmful": harmful}, index=pd.Index(classes.cat.categories)
    )
    return mass[present], source


def render(run: Run, selection: Selection) -> None:
    mass, source = class_mass(run, selection)
    order = data.class_order(run)
    mass = mass.reindex([c for c in order if c in mass.index])
    st.subheader(f"Test {selection.test_id}: influence per pretraining class")
    st.caption(f"Sum of positive (helpful) and negative (harmful) scores per class, from {source}.")
    bars = go.Figure(
        [
            go.Bar(x=_escaped(mass.index), y=mass["helpful"], name="helpful", marker_color=HELPFUL),
            go.Bar(x=_escaped(mass.index), y=mass["harmful"], name="harmful", marker_color=HARMFUL),
        ]
    )
    bars.update_layout(
        barmode="relative",
        height=360,
        margin=dict(l=10, r=10, t=10, b=10),
        xaxis_title="pretraining class",
        yaxis_title="summed score",
    )
    st.plotly_chart(bars, config={"displaylogo": False})

    st.subheader("All tests: test class × pretraining class")
    heat, source = data.class_heatmap(run, selection.scenario)
    if heat.empty:
        note("info", "No scores to aggregate in this scenario.")
        return
    caption(f"Mean score over {source}, {selection.scenario} scenario.")
    heat = heat.reindex(
        index=[c for c in order if c in heat.index], columns=[c for c in order if c in heat.columns]
    )
    limit = float(heat.abs().max().max()) or 1.0
    fig = go.Figure(
        go.Heatmap(
            z=heat.to_numpy(),
            x=_escaped(heat.columns),
            y=_escaped(heat.index),
            colorscale=DIVERGING,
            zmid=0.0,
            zmin=-limit,
            zmax=limit,
            colorbar=dict(title="mean score"),
            hovertemplate="test %{y} · pretrain %{x}<br>mean score %{z:.3g}<extra></extra>",
        )
    )
    fig.update_layout(
        height=460,
        margin=dict(l=10, r=10, t=10, b=10),
        xaxis_title="pretraining class",
        yaxis_title="test class (true)",
        yaxis_autorange="reversed",
    )
    st.plotly_chart(fig, config={"displaylogo": False})
