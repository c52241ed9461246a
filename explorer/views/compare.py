"""Comparison of two sets of scores for the same tests: the other scenario of this run (FIXED vs
UPDATED), or a scenario of another run of the same task in the folder of runs (two solvers, two
model versions). For the selected test: top-k overlap, rank correlation, the examples that
change sides and a scatter of the scores; for every test: the top-k overlaps and changes of
side from the top-k lists (instant), and on request the rank correlation of all scores.

The other side is `?vs_run=NAME&vs_scenario=S` in the URL (no `vs_run`: this run).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from explorer import data, state, store
from explorer.data import Run
from explorer.render import HARMFUL, HELPFUL, NEUTRAL, caption, heading, note, plotly_text
from explorer.state import Selection
from explorer.targets import app_target, find_runs, looks_like_run
from precompute.rundir import RunError

SAMPLE = 5000  # examples drawn in the scatter (the top-k on top of them)


@dataclass(frozen=True)
class Side:
    """One set of scores: a scenario of a run."""

    run: Run
    scenario: str
    label: str  # how the page names it: "updated", or "run_b · updated"


def peer_runs(run: Run) -> list[Path]:
    """The other runs beside `run` when the explorer serves a folder of runs (none when it
    serves one run: only that run's files are shown)."""
    root = app_target()
    if root is None or not root.is_dir() or looks_like_run(root):
        return []
    return [p for p in find_runs(root) if p.resolve() != run.path]


def choices(run: Run) -> list[tuple[str, str]]:
    """(run name or "" for this run, scenario) of every set of scores `run` can be compared
    with; the runs of a folder are listed by their scenarios once opened, so here each peer
    is offered with the scenarios its manifest names."""
    options = [("", s) for s in run.scenarios]
    for path in peer_runs(run):
        try:
            other = data.load_run(path)
        except RunError:
            continue
        options += [(path.name, s) for s in other.scenarios]
    return options


def _label(option: tuple[str, str]) -> str:
    name, scenario = option
    return f"this run · {scenario}" if not name else f"{name} · {scenario}"


def other_side(run: Run, selection: Selection) -> tuple[Side | None, str | None]:
    """The side to compare with, from the URL (default: this run's other scenario), or None
    with the reason."""
    wanted_run, wanted = state.param("vs_run") or "", state.param("vs_scenario")
    if wanted_run:
        paths = {p.name: p for p in peer_runs(run)}
        if wanted_run not in paths:
            return None, f'There is no run "{wanted_run}" beside this one to compare with.'
        try:
            other = data.load_run(paths[wanted_run])
        except RunError as exc:
            return None, f'The run "{wanted_run}" cannot be compared: {exc}'
        problem = comparable(run, other)
        if problem:
            return None, problem
        scenario = wanted if wanted in other.scenarios else selection.scenario
        if scenario not in other.scenarios:
            scenario = other.scenarios[0]
        return Side(other, scenario, f"{other.name} · {scenario}"), None
    others = [s for s in run.scenarios if s != selection.scenario]
    if wanted in run.scenarios and wanted != selection.scenario:
        return Side(run, wanted, wanted), None
    if others:
        return Side(run, others[0], others[0]), None
    return None, (
        f"This run has one scenario ({selection.scenario}) and no other run beside it: "
        "there is nothing to compare with. Serve a folder of runs to compare runs."
    )


def comparable(run: Run, other: Run) -> str | None:
    """Why two runs' scores cannot be compared example by example, or None."""
    task, other_task = run.manifest.get("task"), other.manifest.get("task")
    if task != other_task:
        return (
            f'The run "{other.name}" is of task {other_task!r}, not {task!r}: its ids name '
            "other examples."
        )
    if len(run.pretrain) != len(other.pretrain) or not np.array_equal(
        run.pretrain.index.to_numpy(), other.pretrain.index.to_numpy()
    ):
        return f'The run "{other.name}" holds other pretraining examples than this run.'
    return None


def _top_ids(side: Side, test_id: int, kind: str, k: int) -> set[int]:
    return set(data.top_list(side.run, side.scenario, test_id, kind, k)["pretrain_id"].astype(int))


def paired_scores(a: Side, b: Side, test_id: int) -> tuple[pd.DataFrame, bool]:
    """Scores of one test on both sides, one row per pretraining example (columns "a", "b");
    True when they are all the scores (else only examples in the top-k lists of both)."""
    sa = data.score_values(a.run, a.scenario, test_id)
    sb = data.score_values(b.run, b.scenario, test_id)
    if sa is not None and sb is not None:
        both = np.isfinite(sa) & np.isfinite(sb)
        return pd.DataFrame({"a": sa[both], "b": sb[both]}, index=a.run.pretrain.index[both]), True
    frames = []
    for side in (a, b):
        top = pd.concat(
            data.top_list(side.run, side.scenario, test_id, kind, side.run.top_k)
            for kind in ("helpful", "harmful")
        )
        frames.append(top.set_index("pretrain_id")["score"])
    return pd.concat(frames, axis=1, keys=["a", "b"]).dropna(), False


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    if len(a) < 3:
        return float("nan")
    return float(pd.Series(a).rank().corr(pd.Series(b).rank()))


def overlaps(a: Side, b: Side, k: int) -> pd.DataFrame:
    """Per test: how many of the top-k helpful and harmful are in both, and how many examples
    of one side's top-k lists are in the other side's list of the other kind (changed sides);
    from the top-k lists only."""

    def lists(side: Side) -> pd.DataFrame:
        top = side.run.top
        return top[(top["scenario"] == side.scenario) & (top["rank"] <= k)]

    left, right = lists(a), lists(b)
    keys = ["test_id", "pretrain_id"]
    same = left.merge(right, on=keys, suffixes=("_a", "_b"))
    kept = same[same["kind_a"] == same["kind_b"]]
    flipped = same[same["kind_a"] != same["kind_b"]]
    tests = sorted(set(left["test_id"]) & set(right["test_id"]))
    table = pd.DataFrame(
        {
            "test_id": tests,
            f"top-{k} helpful in both": kept[kept["kind_a"] == "helpful"]
            .groupby("test_id")
            .size()
            .reindex(tests, fill_value=0)
            .to_numpy(),
            f"top-{k} harmful in both": kept[kept["kind_a"] == "harmful"]
            .groupby("test_id")
            .size()
            .reindex(tests, fill_value=0)
            .to_numpy(),
            "changed sides": flipped.groupby("test_id")
            .size()
            .reindex(tests, fill_value=0)
            .to_numpy(),
        }
    )
    return table


def correlations(a: Side, b: Side) -> pd.Series:
    """Spearman's rank correlation of all scores, per test (reads every test's scores on both
    sides once; cached)."""
    return _correlations(a.run.key, a.run.stamp, a.scenario, b.run.key, b.run.stamp, b.scenario)


@st.cache_data(max_entries=16, show_spinner="Reading every test's scores on both sides…")
def _correlations(
    key_a: str, stamp_a: float, scenario_a: str, key_b: str, stamp_b: float, scenario_b: str
) -> pd.Series:
    run_a, run_b = data.load_run(Path(key_a)), data.load_run(Path(key_b))
    found = {}
    for test_id in run_a.test.index.intersection(run_b.test.index):
        try:  # one test at a time, outside the score cache that visitors use
            sa = store.read_scores(run_a.scores_index, run_a.store, scenario_a, test_id)
            sb = store.read_scores(run_b.scores_index, run_b.store, scenario_b, test_id)
        except RunError:
            continue
        if sa is not None and sb is not None:
            both = np.isfinite(sa) & np.isfinite(sb)
            found[int(test_id)] = spearman(sa[both], sb[both])
    return pd.Series(found, dtype=float, name="rank correlation")


def _pick(run: Run, selection: Selection, side: Side | None) -> None:
    options = [o for o in choices(run) if o != ("", selection.scenario)]
    if not options:
        return
    current = (
        "" if side is None or side.run is run else side.run.name,
        side.scenario if side else "",
    )
    st.session_state["vs_pick"] = current if current in options else options[0]
    st.selectbox(
        "Compare with",
        options,
        key="vs_pick",
        format_func=_label,
        on_change=_on_pick,
        help="Another scenario of this run, or a scenario of another run of the same task in "
        "the folder the explorer serves (two solvers, two model versions).",
    )


def _on_pick() -> None:
    name, scenario = st.session_state["vs_pick"]
    state.set_url("vs_run", name or None)
    state.set_url("vs_scenario", scenario)


def render(run: Run, selection: Selection) -> None:
    b, problem = other_side(run, selection)
    _pick(run, selection, b)
    if b is None:
        note("info", problem)
        return
    a = Side(run, selection.scenario, selection.scenario)
    test_id, k = selection.test_id, selection.k
    if test_id not in b.run.test.index:
        note("info", f"Test {test_id} is not in the run {b.run.name}: pick another test.")
        return
    heading(f"Test {test_id}: {a.label} vs {b.label}")

    columns = st.columns(3)
    for column, kind in zip(columns[:2], ("helpful", "harmful"), strict=True):
        shared = _top_ids(a, test_id, kind, k) & _top_ids(b, test_id, kind, k)
        column.metric(f"top-{k} {kind} in both", f"{len(shared)} of {k}", border=True)
    pairs, complete = paired_scores(a, b, test_id)
    rho = spearman(pairs["a"].to_numpy(), pairs["b"].to_numpy())
    columns[2].metric(
        "rank correlation (Spearman)",
        "n/a" if np.isnan(rho) else f"{rho:.3f}",
        border=True,
        help=f"over {len(pairs):,} pretraining examples",
    )
    if not complete:
        note(
            "info",
            "A side has no scores.parquet: the correlation and the changes of side use only "
            "the examples found in the top-k lists of both.",
        )

    union = set().union(
        *(_top_ids(s, test_id, kind, k) for s in (a, b) for kind in ("helpful", "harmful"))
    )
    candidates = pairs.loc[pairs.index.intersection(sorted(union))]
    flips = candidates[(candidates["a"] > 0) != (candidates["b"] > 0)]
    caption(
        f"Examples that change sides between helpful and harmful (among the top-{k} lists), "
        f"{a.label} then {b.label}:"
    )
    if flips.empty:
        caption("None: every listed example keeps its sign on both sides.")
    else:
        table = flips.join(data.pretrain_classes(run))
        table = table.rename(columns={"a": f"score, {a.label}", "b": f"score, {b.label}"})
        table = table.reset_index(names="pretrain_id")
        table["pretrain_id"] = "#" + table["pretrain_id"].astype(str)
        st.dataframe(table, hide_index=True)

    st.plotly_chart(
        scatter(pairs, a, b, test_id, k, selection.scenario), config={"displaylogo": False}
    )

    heading(f"Every test: top-{k} overlap")
    table = overlaps(a, b, k)
    if complete:
        if st.toggle("Add the rank correlation of all scores (reads every test)", key="vs_all"):
            table["rank correlation"] = correlations(a, b).reindex(table["test_id"]).to_numpy()
    st.dataframe(table, hide_index=True, height=320)


def scatter(pairs: pd.DataFrame, a: Side, b: Side, test_id: int, k: int, scenario: str):
    """Scores on side a vs side b: a sample of all examples, the top-k of side a on top."""
    sample = pairs.sample(min(len(pairs), SAMPLE), random_state=0) if len(pairs) else pairs
    fig = go.Figure(
        go.Scattergl(
            x=sample["a"],
            y=sample["b"],
            mode="markers",
            name="examples",
            marker=dict(size=4, color=NEUTRAL),
            hoverinfo="skip",
        )
    )
    for kind, colour in (("helpful", HELPFUL), ("harmful", HARMFUL)):
        ids = pairs.index.intersection(sorted(_top_ids(a, test_id, kind, k)))
        fig.add_trace(
            go.Scattergl(
                x=pairs.loc[ids, "a"],
                y=pairs.loc[ids, "b"],
                mode="markers",
                name=f"top-{k} {kind}",
                marker=dict(size=9, color=colour),
                text=[f"#{i}" for i in ids],
                # side names go in as data (meta), not into the template, which would read
                # "%{...}" and tags in them
                meta=[plotly_text(a.label), plotly_text(b.label)],
                hovertemplate="%{text}<br>%{meta[0]} %{x:.3g}<br>%{meta[1]} %{y:.3g}"
                "<extra></extra>",
            )
        )
    fig.update_layout(
        height=460,
        margin=dict(l=10, r=10, t=10, b=10),
        xaxis_title=plotly_text(f"score, {a.label}"),
        yaxis_title=plotly_text(f"score, {b.label}"),
    )
    return fig
