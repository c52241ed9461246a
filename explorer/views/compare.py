"""Scenario comparison, FIXED vs UPDATED on the same test: overlap of the top-k, rank
correlation of the scores, and the examples that flip between helpful and harmful."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from explorer import data
from explorer.data import Run
from explorer.render import HARMFUL, HELPFUL, NEUTRAL
from explorer.state import Selection


def _top_ids(run: Run, scenario: str, test_id: int, kind: str, k: int) -> set[int]:
    return set(data.top_list(run, scenario, test_id, kind, k)["pretrain_id"].astype(int))


def paired_scores(run: Run, a: str, b: str, test_id: int) -> tuple[pd.DataFrame, bool]:
    """Scores of one test in both scenarios, one row per pretraining example; True when they
    are all the scores (else only examples in the top-k of both scenarios)."""
    sa, sb = data.test_scores(run, a, test_id), data.test_scores(run, b, test_id)
    if sa is not None and sb is not None:
        return pd.DataFrame({a: sa, b: sb}).dropna(), True
    top = run.top[(run.top["test_id"] == test_id) & run.top["scenario"].isin([a, b])]
    wide = top.pivot_table(index="pretrain_id", columns="scenario", values="score", aggfunc="first")
    for s in (a, b):
        if s not in wide:
            wide[s] = float("nan")
    return wide[[a, b]].dropna(), False


def render(run: Run, selection: Selection) -> None:
    scenarios = run.scenarios
    if len(scenarios) < 2:
        st.info(f"This run has one scenario ({scenarios[0]}): there is nothing to compare.")
        return
    a, b = ("fixed", "updated") if {"fixed", "updated"} <= set(scenarios) else scenarios[:2]
    test_id, k = selection.test_id, selection.k
    st.subheader(f"Test {test_id}: {a.upper()} vs {b.upper()}")

    columns = st.columns(3)
    for column, kind in zip(columns[:2], ("helpful", "harmful"), strict=True):
        shared = _top_ids(run, a, test_id, kind, k) & _top_ids(run, b, test_id, kind, k)
        column.metric(f"top-{k} {kind} in both", f"{len(shared)} of {k}", border=True)
    pairs, complete = paired_scores(run, a, b, test_id)
    if len(pairs) >= 3:
        rho = pairs[a].rank().corr(pairs[b].rank())
        columns[2].metric(
            "rank correlation (Spearman)",
            f"{rho:.3f}",
            border=True,
            help=f"over {len(pairs):,} pretraining examples",
        )
    else:
        columns[2].metric("rank correlation (Spearman)", "n/a", border=True)
    if not complete:
        st.info(
            "This run has no scores.parquet: the correlation and flips use only the "
            "examples found in the top-k lists of both scenarios."
        )

    union = set().union(
        *(_top_ids(run, s, test_id, kind, k) for s in (a, b) for kind in ("helpful", "harmful"))
    )
    candidates = pairs.loc[pairs.index.intersection(sorted(union))]
    flips = candidates[(candidates[a] > 0) != (candidates[b] > 0)]
    st.markdown(f"**Examples that flip** between helpful and harmful (among the top-{k} lists)")
    if flips.empty:
        st.caption("None: every listed example keeps its sign in both scenarios.")
    else:
        table = flips.join(data.class_names(run.pretrain).rename("class"))
        table = table.reset_index(names="pretrain_id")
        table["pretrain_id"] = "#" + table["pretrain_id"].astype(str)
        st.dataframe(table, hide_index=True)

    sample = pairs.sample(min(len(pairs), 5000), random_state=0) if len(pairs) else pairs
    fig = go.Figure(
        go.Scattergl(
            x=sample[a],
            y=sample[b],
            mode="markers",
            name="examples",
            marker=dict(size=4, color=NEUTRAL),
            hoverinfo="skip",
        )
    )
    for kind, colour in (("helpful", HELPFUL), ("harmful", HARMFUL)):
        ids = pairs.index.intersection(sorted(_top_ids(run, selection.scenario, test_id, kind, k)))
        fig.add_trace(
            go.Scattergl(
                x=pairs.loc[ids, a],
                y=pairs.loc[ids, b],
                mode="markers",
                name=f"top-{k} {kind}",
                marker=dict(size=9, color=colour),
                text=[f"#{i}" for i in ids],
                hovertemplate="%{text}<br>" + a + " %{x:.3g}<br>" + b + " %{y:.3g}<extra></extra>",
            )
        )
    fig.update_layout(
        height=460,
        margin=dict(l=10, r=10, t=10, b=10),
        xaxis_title=f"score, {a}",
        yaxis_title=f"score, {b}",
    )
    st.plotly_chart(fig, config={"displaylogo": False})
