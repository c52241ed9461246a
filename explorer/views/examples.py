"""The main view: the top-k helpful and harmful pretraining examples of the selected test,
side by side, each with its input, `#<pretrain_id>`, label, score and share of the influence."""

from __future__ import annotations

import html
from functools import partial

import pandas as pd
import streamlit as st

from explorer import data
from explorer.data import Run
from explorer.render import content_words, example_cards, list_header, note
from explorer.state import Selection

EXPORT_COLUMNS = [
    "scenario",
    "test_id",
    "kind",
    "rank",
    "pretrain_id",
    "score",
    "label",
    "label_name",
]


def total_influence(run: Run, selection: Selection) -> tuple[float | None, str]:
    """Sum of |score| over every pretraining example (the share's denominator), and its name."""
    total = data.total_influence(run, selection.scenario, selection.test_id)
    if total is not None:
        return total, "of the total |score| over all pretraining examples"
    top = pd.concat(
        [
            data.top_list(run, selection.scenario, selection.test_id, kind, run.top_k)
            for kind in ("helpful", "harmful")
        ]
    )
    return float(top["score"].abs().sum()), "of the |score| in the top-k lists (no scores.parquet)"


def _map_link(selection: Selection, pretrain_id: int) -> str:
    """Each `#id` opens that example on the embedding map, for the same test."""
    return selection.link(view="map", example=pretrain_id)


def summary(lists: dict[str, pd.DataFrame], scores: dict | None) -> str:
    """One sentence a stakeholder can read: which classes dominate each list, and how
    concentrated the influence is."""
    parts = []
    for kind, rows in lists.items():
        if rows.empty:
            continue
        names = data.class_names(rows)
        top_name, count = names.value_counts().index[0], int(names.value_counts().iloc[0])
        parts.append(
            f'the top-{len(rows)} <span class="msif-{kind}-word">{kind}</span> are mostly '
            f"<b>{html.escape(top_name)}</b> ({count} of {len(rows)})"
        )
    sentence = "; ".join(parts)
    if scores is not None and scores["count"]:
        sentence += (
            f". {scores['mass'][0.8]:,} of the {scores['count']:,} pretraining examples carry "
            "80% of the total influence (sum of |score|)"
        )
    return f'<div class="msif-summary">{sentence[:1].upper() + sentence[1:]}.</div>'


def render(run: Run, selection: Selection) -> None:
    total, denominator = total_influence(run, selection)
    lists = {
        kind: data.top_list(run, selection.scenario, selection.test_id, kind, selection.k)
        for kind in ("helpful", "harmful")
    }
    # the lists first, the sentence above them after: a deep link shows its ids sooner
    sentence = st.empty()
    subtitles = {
        "helpful": "Removing these would raise the test loss most (score > 0).",
        "harmful": "Removing these would lower the test loss most (score < 0).",
    }
    # text runs: mark the words a pretraining passage shares with the test input, so surface
    # overlap is told apart from deeper influence
    shared = content_words(run.test.loc[selection.test_id].get("text"))
    if shared:
        st.caption("Words shared with the test input are marked.")
    columns = st.columns(2, gap="large")
    for column, (kind, rows) in zip(columns, lists.items(), strict=True):
        with column:
            st.html(list_header(kind, subtitles[kind]))
            if rows.empty:
                note("info", f"No {kind} examples are stored for this test.")
            else:
                link = partial(_map_link, selection)
                st.html(example_cards(rows, kind, total, link=link, shared=shared))
    sentence.html(summary(lists, data.score_summary(run, selection.scenario, selection.test_id)))
    st.caption(f"Share = |score| {denominator}.")
    export = pd.concat(lists.values())
    export = export[[c for c in EXPORT_COLUMNS if c in export.columns]]
    st.download_button(
        "Download these lists (CSV)",
        export.to_csv(index=False),
        file_name=f"msif_{run.name}_{selection.scenario}_test{selection.test_id}_top{selection.k}.csv",
        mime="text/csv",
        icon=":material/download:",
    )
