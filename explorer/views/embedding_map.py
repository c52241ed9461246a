"""The embedding map: every pretraining example on the precomputed UMAP (a background layer that
is not selectable), coloured by the selected test's score on a diverging scale centred at zero;
the top-k helpful and harmful highlighted; the test examples on the same map, clickable."""

from __future__ import annotations

import html

import numpy as np
import plotly.graph_objects as go
import streamlit as st

from explorer import data, state
from explorer.data import Run
from explorer.render import (
    DIVERGING,
    HARMFUL,
    HELPFUL,
    NEUTRAL,
    TEST_MARK,
    example_body,
    format_score,
    label_text,
)
from explorer.state import Selection


def _labels(frame) -> np.ndarray:
    """Class names escaped for plotly's hover labels (which would render tags in the data)."""
    return np.array([html.escape(name) for name in data.class_names(frame)], dtype=object)


def _snippets(frame) -> np.ndarray:
    """The first words of each example's text (escaped), for the hover label; "" for images."""
    texts = frame["text"].astype("string").fillna("").str.slice(0, 60)
    return np.array([f"<br>{html.escape(t)}" if t else "" for t in texts], dtype=object)


def figure(run: Run, selection: Selection) -> go.Figure:
    """The map as a plotly figure (WebGL traces)."""
    pretrain = run.pretrain
    scores = data.test_scores(run, selection.scenario, selection.test_id)
    fig = go.Figure()
    if scores is not None:
        values = scores.reindex(pretrain.index).to_numpy(dtype=np.float32)
        limit = float(np.nanquantile(np.abs(values), 0.99)) or 1.0
        marker = dict(
            size=4,
            color=values,
            colorscale=DIVERGING,
            cmin=-limit,
            cmid=0.0,
            cmax=limit,
            colorbar=dict(title="score", thickness=12, len=0.6),
            opacity=0.75,
        )
    else:
        marker = dict(size=4, color=NEUTRAL, opacity=0.6)
    fig.add_trace(
        go.Scattergl(
            x=pretrain["umap_x"],
            y=pretrain["umap_y"],
            mode="markers",
            marker=marker,
            name="pretraining examples",
            hoverinfo="skip",
        )
    )

    test = run.test
    fig.add_trace(
        go.Scattergl(
            x=test["umap_x"],
            y=test["umap_y"],
            mode="markers",
            name="test examples (click)",
            marker=dict(
                size=7,
                symbol="diamond",
                color="rgba(31,58,147,0.35)",
                line=dict(width=0.5, color=TEST_MARK),
            ),
            customdata=np.stack(
                [
                    np.full(len(test), "test"),
                    test.index.astype(str),
                    _labels(test),
                    _snippets(test),
                ],
                axis=1,
            ),
            hovertemplate="Test %{customdata[1]} · %{customdata[2]}%{customdata[3]}<extra></extra>",
        )
    )
    for kind, colour in (("helpful", HELPFUL), ("harmful", HARMFUL)):
        top = data.top_list(run, selection.scenario, selection.test_id, kind, selection.k)
        fig.add_trace(
            go.Scattergl(
                x=top["umap_x"],
                y=top["umap_y"],
                mode="markers",
                name=f"top-{selection.k} {kind}",
                marker=dict(size=12, color=colour, line=dict(width=1.5, color="white")),
                customdata=np.stack(
                    [
                        np.full(len(top), "pretrain"),
                        top["pretrain_id"].astype(str),
                        _labels(top),
                        [format_score(s) for s in top["score"]],
                        _snippets(top),
                    ],
                    axis=1,
                )
                if len(top)
                else None,
                hovertemplate="#%{customdata[1]} · %{customdata[2]}<br>score %{customdata[3]}"
                "%{customdata[4]}<extra></extra>",
            )
        )
    if selection.example is not None:
        opened = pretrain.loc[selection.example]
        fig.add_trace(
            go.Scattergl(
                x=[opened["umap_x"]],
                y=[opened["umap_y"]],
                mode="markers",
                name=f"#{selection.example}",
                marker=dict(size=22, symbol="circle-open", color="#111827", line=dict(width=3)),
                hoverinfo="skip",
            )
        )
    row = test.loc[selection.test_id]
    fig.add_trace(
        go.Scattergl(
            x=[row["umap_x"]],
            y=[row["umap_y"]],
            mode="markers",
            name=f"test {selection.test_id}",
            marker=dict(
                size=20, symbol="star", color=TEST_MARK, line=dict(width=1.5, color="white")
            ),
            hoverinfo="skip",
        )
    )
    fig.update_layout(
        template="plotly_white",
        font=dict(family="Source Sans Pro, sans-serif", size=13, color="#262730"),
        height=600,
        margin=dict(l=10, r=10, t=10, b=10),
        plot_bgcolor="white",
        legend=dict(orientation="h", yanchor="bottom", y=1.0, x=0),
        clickmode="event+select",
        xaxis=dict(showticklabels=False, title="UMAP 1", showgrid=False, zeroline=False),
        yaxis=dict(showticklabels=False, title="UMAP 2", showgrid=False, zeroline=False),
    )
    return fig


def _on_click(key: str) -> None:
    points = st.session_state[key].selection.points
    if not points or "customdata" not in points[0]:
        return
    kind, identifier = points[0]["customdata"][:2]
    if kind == "test":
        state.select_test(int(identifier))
    else:
        st.query_params["example"] = str(int(identifier))


def detail(run: Run, selection: Selection, pretrain_id: int) -> None:
    """One pretraining example in full, with its score and rank for the selected test."""
    row = run.pretrain.loc[pretrain_id]
    scores = data.test_scores(run, selection.scenario, selection.test_id)
    top = run.top[
        (run.top["scenario"] == selection.scenario)
        & (run.top["test_id"] == selection.test_id)
        & (run.top["pretrain_id"] == pretrain_id)
    ]
    if scores is not None and pretrain_id in scores.index:
        score = format_score(float(scores.loc[pretrain_id]))
    elif len(top):
        score = format_score(float(top["score"].iloc[0]))
    else:
        score = "not stored (outside the top-k, and the run has no scores.parquet)"
    rank = (
        f"rank {int(top['rank'].iloc[0])} {top['kind'].iloc[0]}"
        if len(top)
        else "not in the top-k lists"
    )
    st.html(
        '<div class="msif-hero">'
        + example_body(row, css_class="msif-big")
        + f"<div><h2>#{pretrain_id}</h2><div class='msif-sub'>pretraining example · "
        + f"{html.escape(label_text(row))}</div>"
        + "<div class='msif-facts'><div class='msif-fact'><div class='k'>score for test "
        + f"{selection.test_id}</div><div class='v'>{html.escape(score)}</div></div>"
        + f"<div class='msif-fact'><div class='k'>position</div><div class='v'>{rank}</div>"
        + "</div></div></div></div>"
    )


def render(run: Run, selection: Selection) -> None:
    if run.has_scores:
        st.caption(
            f"Every pretraining example, coloured by its score for test {selection.test_id} "
            "(green helpful, red harmful, centred at zero). Click a test (diamond) to select "
            "it, or a highlighted example to open it."
        )
    else:
        st.info(
            "This run has no scores.parquet: the background is not coloured by score; "
            "only the top-k lists are highlighted."
        )
    key = f"map_{selection.scenario}_{selection.test_id}_{selection.k}"
    st.plotly_chart(
        figure(run, selection),
        key=key,
        on_select=lambda: _on_click(key),
        selection_mode="points",
        config={"displaylogo": False},
        theme=None,  # streamlit's theme re-styles all 40k points in the browser: 2-3x slower
    )
    ids = run.pretrain.index
    left, right = st.columns([1, 2.4], gap="large")
    st.session_state["example_pick"] = selection.example
    left.number_input(
        "Open pretraining example #",
        min_value=int(ids.min()),
        max_value=int(ids.max()),
        step=1,
        key="example_pick",
        placeholder="type an id, or click a highlighted example",
        on_change=state.set_param,
        args=("example", "example_pick"),
    )
    if selection.example is not None:
        with right:
            detail(run, selection, selection.example)
