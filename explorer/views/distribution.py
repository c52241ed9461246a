"""Score distribution of the selected test: histogram with the top-k cut, the cumulative share
of the absolute influence, and how many examples carry 50/80/95% of it."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import streamlit as st

from explorer import data
from explorer.data import Run
from explorer.render import HARMFUL, HELPFUL, NEUTRAL, note
from explorer.state import Selection


def render(run: Run, selection: Selection) -> None:
    summary = data.score_summary(run, selection.scenario, selection.test_id)
    helpful = data.top_list(run, selection.scenario, selection.test_id, "helpful", selection.k)
    harmful = data.top_list(run, selection.scenario, selection.test_id, "harmful", selection.k)
    if summary is None:
        note(
            "info",
            "This run has no scores.parquet: the distribution below covers the top-k "
            "lists only, not every pretraining example.",
        )
        summary = data.summarise(np.concatenate([helpful["score"], harmful["score"]]))
    if summary["count"] == 0:
        note("info", "No scores are stored for this test.")
        return

    mass = summary["mass"]
    columns = st.columns(3)
    for column, (fraction, count) in zip(columns, mass.items(), strict=True):
        column.metric(
            f"examples carrying {fraction:.0%} of |influence|",
            f"{count:,}",
            help=f"{count / summary['count']:.2%} of the {summary['count']:,} scores shown",
            border=True,
        )

    left, right = st.columns(2)
    # binned here: a histogram trace would send every score to the browser
    counts, edges = summary["histogram"]
    hist = go.Figure(
        go.Bar(
            x=(edges[:-1] + edges[1:]) / 2,
            y=counts,
            width=np.diff(edges),
            marker_color=NEUTRAL,
            marker_line_width=0,
            name="scores",
            hovertemplate="score %{x:.3g}: %{y:,} examples<extra></extra>",
        )
    )
    for rows, colour, kind in ((helpful, HELPFUL, "helpful"), (harmful, HARMFUL, "harmful")):
        if len(rows):
            cut = float(rows["score"].iloc[-1])
            hist.add_vline(
                x=cut,
                line_color=colour,
                line_dash="dash",
                annotation_text=f"top-{len(rows)} {kind}",
                annotation_font_color=colour,
            )
    hist.update_layout(
        height=380,
        margin=dict(l=10, r=10, t=30, b=10),
        yaxis_type="log",
        xaxis_title="score",
        yaxis_title="examples (log)",
        showlegend=False,
        bargap=0,
        title="Histogram of scores",
    )
    left.plotly_chart(hist, config={"displaylogo": False})

    ranks, cumulative = summary["curve"]
    curve = go.Figure(
        go.Scattergl(
            x=ranks,
            y=cumulative,
            mode="lines",
            line_color="#1f3a93",
            name="cumulative share",
        )
    )
    for fraction, count in mass.items():
        curve.add_hline(y=fraction, line_dash="dot", line_color="#9ca3af")
        curve.add_vline(x=count, line_dash="dot", line_color="#9ca3af")
    curve.update_layout(
        height=380,
        margin=dict(l=10, r=10, t=30, b=10),
        xaxis_type="log",
        xaxis_title="examples, largest |score| first",
        showlegend=False,
        yaxis_title="share of total |score|",
        title="Cumulative |influence|",
    )
    right.plotly_chart(curve, config={"displaylogo": False})
