"""False transfer: the pretraining examples harmful to the most test predictions, the
first-order estimate of removing the top N, and (where the run has validation.parquet) the
predicted vs actual effect of retraining."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from explorer import data
from explorer.data import Run
from explorer.render import TEST_MARK, heading, note, plotly_text, png_data_uri
from explorer.state import Selection


def offenders(run: Run, scenario: str, limit: int = 50) -> pd.DataFrame:
    """The `limit` pretraining examples most often in a test's top-k harmful list."""
    counts = data.harmful_counts(run, scenario).head(limit)
    rows = data.examples(run, counts["pretrain_id"])
    if images(run):
        inputs = [png_data_uri(p, upscale_to=32) for p in rows["image_png"]]
    else:
        inputs = rows["text"].fillna("").astype(str).str.slice(0, 80).tolist()
    return pd.DataFrame(
        {
            "pretrain_id": "#" + counts["pretrain_id"].astype(str),
            "input": inputs,
            "label": data.class_names(rows).to_numpy(),
            "harmful to tests": counts["harmful_to_tests"].to_numpy(),
            "of them wrong": counts["harmful_to_wrong"].to_numpy(),
            "summed score over wrong": counts["summed_score_wrong"].to_numpy(),
        }
    ), counts


def images(run: Run) -> bool:
    """Whether the run's inputs are images (then the input column shows pictures; deciding it
    from the cells would let a text that starts "data:image" turn the column into images)."""
    return run.has_images


def render(run: Run, selection: Selection) -> None:
    scenario = selection.scenario
    heading(f"Pretraining examples harmful to the most predictions ({scenario})")
    table, counts = offenders(run, scenario)
    if table.empty:
        note("info", "No harmful lists are stored for this scenario.")
        return
    st.caption(
        "Counted over every test's top-k harmful list; the summed score is over the wrong "
        "predictions only (more negative = more harm to them)."
    )
    is_image = images(run)
    st.dataframe(
        table,
        hide_index=True,
        height=360,
        row_height=40 if is_image else None,
        column_config={
            "input": st.column_config.ImageColumn("input")
            if is_image
            else st.column_config.TextColumn("input")
        },
    )
    st.download_button(
        "Download this table (CSV)",
        table.drop(columns="input").to_csv(index=False),
        file_name=f"msif_{run.name}_{scenario}_false_transfer.csv",
        mime="text/csv",
        icon=":material/download:",
    )

    n = st.slider("Remove the top N of them", 1, len(counts), min(10, len(counts)), key="remove_n")
    preds = run.predictions[run.predictions["scenario"] == scenario]
    tests = preds["test_id"].astype(int).tolist()
    change, source = data.removal_estimate(
        run, scenario, counts["pretrain_id"].head(n).tolist(), tests
    )
    wrong = preds.set_index("test_id")["correct"].reindex(change.index).eq(False).to_numpy()
    columns = st.columns(3)
    columns[0].metric(
        "estimated mean loss change, wrong predictions",
        f"{change[wrong].mean():+.4f}" if wrong.any() else "n/a",
        border=True,
    )
    columns[1].metric("estimated mean loss change, all tests", f"{change.mean():+.4f}", border=True)
    columns[2].metric(
        "tests whose loss would drop", f"{int((change < 0).sum())} of {len(change)}", border=True
    )
    st.caption(
        f"ESTIMATE, not a retraining: first-order sum of the scores of the removed examples "
        f"(removing z changes the loss of t by about score(z, t)), from {source}."
    )

    validation = run.validation
    if validation is None or validation.empty:
        st.caption(
            "This run has no validation.parquet, so there is no predicted vs actual "
            "retraining check to show."
        )
        return
    st.subheader("Predicted vs actual retraining effect (validation.parquet)")
    fig = go.Figure()
    for name, group in validation.groupby("scenario"):
        fig.add_trace(
            go.Scatter(
                x=group["predicted"],
                y=group["actual"],
                mode="markers",
                name=plotly_text(name),
                marker=dict(
                    size=8, color=TEST_MARK if name == scenario else "#9ca3af", opacity=0.8
                ),
                text=[
                    "#" + str(i) + " · test " + str(t)
                    for i, t in zip(group["pretrain_id"], group["test_id"], strict=True)
                ],
                hovertemplate="%{text}<br>predicted %{x:.3g}<br>actual %{y:.3g}<extra></extra>",
            )
        )
    low = float(np.nanmin(validation[["predicted", "actual"]].to_numpy()))
    high = float(np.nanmax(validation[["predicted", "actual"]].to_numpy()))
    fig.add_shape(
        type="line", x0=low, y0=low, x1=high, y1=high, line=dict(dash="dot", color="#9ca3af")
    )
    fig.update_layout(
        height=420,
        margin=dict(l=10, r=10, t=10, b=10),
        xaxis_title="predicted test-loss change (score)",
        yaxis_title="actual change after retraining",
    )
    left, right = st.columns([3, 1])
    left.plotly_chart(fig, config={"displaylogo": False})
    pearson = validation["predicted"].corr(validation["actual"])
    spearman = validation["predicted"].rank().corr(validation["actual"].rank())
    right.metric("Pearson r", f"{pearson:.3f}", border=True)
    right.metric("Spearman ρ", f"{spearman:.3f}", border=True)
    right.caption(f"{len(validation)} retrained (test, pretraining example) pairs.")
