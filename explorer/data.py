"""Cached, pure readers of a run directory (DESIGN.md section 5). No widgets in here.

The file format itself (schemas, manifest checks, the one-test score read) lives in
`precompute.rundir`; this module adds caching and the few summaries the views need. Large
tables are cached as shared resources (read-only by convention) so a rerun costs no copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import streamlit as st

from precompute.rundir import RunError, read_manifest, read_table, read_test_scores

REQUIRED_TABLES = ("pretrain", "test", "predictions", "top")


@dataclass(frozen=True)
class Run:
    """One loaded run. Frames are shared between sessions: never modify them in place."""

    path: Path
    manifest: dict
    pretrain: pd.DataFrame  # indexed by pretrain_id
    test: pd.DataFrame  # indexed by test_id
    predictions: pd.DataFrame  # scenario, test_id, pred, pred_name, confidence, loss, correct
    top: pd.DataFrame  # scenario, test_id, kind, rank, pretrain_id, score
    has_scores: bool
    validation: pd.DataFrame | None
    stamp: float  # manifest mtime: part of every cache key, so a rewritten run is re-read

    @property
    def key(self) -> str:
        """A cache key for the per-run readers below."""
        return str(self.path)

    @property
    def scenarios(self) -> list[str]:
        found = list(dict.fromkeys(self.predictions["scenario"]))
        listed = [s for s in self.manifest.get("scenarios", []) if s in found]
        return listed + [s for s in found if s not in listed]

    @property
    def top_k(self) -> int:
        return int(self.top["rank"].max()) if len(self.top) else 0

    @property
    def name(self) -> str:
        return self.path.name


def _stamp(run_dir: Path) -> float:
    """Changes when a run is rewritten in place, so a cached copy is not reused."""
    try:
        return (run_dir / "manifest.json").stat().st_mtime
    except OSError:
        return 0.0


def class_names(frame: pd.DataFrame, name: str = "label_name", number: str = "label") -> pd.Series:
    """The class of each row as text: its name, else its number, else "unlabelled"."""
    numbers = frame[number].astype("Int64").astype("string")
    return frame[name].astype("string").fillna(numbers).fillna("unlabelled").astype(str)


def looks_like_run(path: Path) -> bool:
    """A folder meant as one run (it holds a manifest or any of the run tables)."""
    return (path / "manifest.json").exists() or any(
        (path / f"{name}.parquet").exists() for name in REQUIRED_TABLES
    )


def find_runs(root: Path) -> list[Path]:
    """Runs (finished or not) directly inside `root`; hidden temporary folders are skipped."""
    if not root.is_dir():
        return []
    children = [p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")]
    return [p for p in children if looks_like_run(p)]


def load_run(run_dir: Path) -> Run:
    """The run at `run_dir`, read once per process; RunError says what is wrong with it."""
    run_dir = Path(run_dir).resolve()
    return _load_run(str(run_dir), _stamp(run_dir))


@st.cache_resource(show_spinner="Loading run…", max_entries=8)
def _load_run(run_dir: str, stamp: float) -> Run:
    path = Path(run_dir)
    manifest = read_manifest(path)
    missing = [
        f"{name}.parquet" for name in REQUIRED_TABLES if not (path / f"{name}.parquet").is_file()
    ]
    if missing:
        raise RunError(f"{path} is missing {', '.join(missing)}")
    try:
        pretrain = read_table(path, "pretrain").set_index("pretrain_id", drop=False)
        test = read_table(path, "test").set_index("test_id", drop=False)
        predictions = read_table(path, "predictions")
        top = read_table(path, "top").sort_values(["scenario", "test_id", "kind", "rank"])
        validation = (
            read_table(path, "validation") if (path / "validation.parquet").is_file() else None
        )
    except (OSError, KeyError, ValueError) as exc:  # unreadable parquet, missing columns
        raise RunError(f"{path} holds a table that cannot be read ({exc})") from exc
    return Run(
        path=path,
        manifest=manifest,
        pretrain=pretrain,
        test=test,
        predictions=predictions,
        top=top.reset_index(drop=True),
        has_scores=(path / "scores.parquet").is_file(),
        validation=validation,
        stamp=stamp,
    )


def top_list(run: Run, scenario: str, test_id: int, kind: str, k: int) -> pd.DataFrame:
    """The top-k `kind` ("helpful" | "harmful") of one test, joined with the example rows."""
    top = _top_index(run.key, run.stamp).get((scenario, int(test_id), kind))
    if top is None:
        return run.top.iloc[:0].join(run.pretrain.drop(columns="pretrain_id"), on="pretrain_id")
    top = top[top["rank"] <= k]
    return top.join(run.pretrain.drop(columns="pretrain_id"), on="pretrain_id")


@st.cache_resource(max_entries=8)
def _top_index(run_key: str, stamp: float) -> dict[tuple[str, int, str], pd.DataFrame]:
    top = load_run(Path(run_key)).top
    return {
        (str(s), int(t), str(k)): group
        for (s, t, k), group in top.groupby(["scenario", "test_id", "kind"], sort=False)
    }


def prediction(run: Run, scenario: str, test_id: int) -> pd.Series | None:
    """The finetuned model's prediction of one test in one scenario."""
    rows = run.predictions[
        (run.predictions["scenario"] == scenario) & (run.predictions["test_id"] == test_id)
    ]
    return rows.iloc[0] if len(rows) else None


def test_scores(run: Run, scenario: str, test_id: int) -> pd.Series | None:
    """Every pretraining score of one test (indexed by pretrain_id), or None without scores."""
    if not run.has_scores:
        return None
    return _test_scores(run.key, run.stamp, scenario, int(test_id))


@st.cache_data(max_entries=256, show_spinner=False)
def _test_scores(run_key: str, stamp: float, scenario: str, test_id: int) -> pd.Series | None:
    frame = read_test_scores(Path(run_key), scenario, test_id)
    if frame is None or frame.empty:
        return None
    return frame.set_index("pretrain_id")["score"]


def influence_mass(scores: np.ndarray, fractions=(0.5, 0.8, 0.95)) -> dict[float, int]:
    """How many examples (largest |score| first) carry each fraction of the total |score|."""
    mass = np.sort(np.abs(np.asarray(scores, dtype=float)))[::-1]
    total = mass.sum()
    if total == 0:
        return {f: 0 for f in fractions}
    cumulative = np.cumsum(mass) / total
    return {f: int(np.searchsorted(cumulative, f) + 1) for f in fractions}


def class_heatmap(run: Run, scenario: str) -> tuple[pd.DataFrame, str]:
    """Mean score per (test true class, pretraining class) over all tests of a scenario.

    Uses scores.parquet (one streamed pass, cached) when present, else the top-k lists; the
    second value names the source.
    """
    return _class_heatmap(run.key, run.stamp, scenario)


@st.cache_data(max_entries=16, show_spinner="Aggregating scores over all tests…")
def _class_heatmap(run_key: str, stamp: float, scenario: str) -> tuple[pd.DataFrame, str]:
    run = load_run(Path(run_key))
    test_label = class_names(run.test)
    pretrain_label = class_names(run.pretrain)
    sums: dict[tuple[str, str], float] = {}
    counts: dict[tuple[str, str], int] = {}
    if run.has_scores:
        source = "all pretraining scores (scores.parquet)"
        parquet = pq.ParquetFile(run.path / "scores.parquet")
        for batch in parquet.iter_batches(batch_size=1 << 20):
            frame = batch.to_pandas()
            frame = frame[frame["scenario"] == scenario]
            if frame.empty:
                continue
            grouped = frame.groupby(
                [
                    frame["test_id"].map(test_label).to_numpy(),
                    frame["pretrain_id"].map(pretrain_label).to_numpy(),
                ]
            )["score"].agg(["sum", "count"])
            for key, row in grouped.iterrows():
                sums[key] = sums.get(key, 0.0) + float(row["sum"])
                counts[key] = counts.get(key, 0) + int(row["count"])
    else:
        source = "the top-k lists only (this run has no scores.parquet)"
        top = run.top[run.top["scenario"] == scenario]
        grouped = top.groupby(
            [
                top["test_id"].map(test_label).to_numpy(),
                top["pretrain_id"].map(pretrain_label).to_numpy(),
            ]
        )["score"].agg(["sum", "count"])
        for key, row in grouped.iterrows():
            sums[key], counts[key] = float(row["sum"]), int(row["count"])
    cells = pd.Series({key: sums[key] / counts[key] for key in sums}, dtype=float)
    if cells.empty:
        return pd.DataFrame(), source
    cells.index = pd.MultiIndex.from_tuples(cells.index, names=["test class", "pretrain class"])
    return cells.unstack(), source


def class_order(run: Run) -> list[str]:
    """Class names (label_name, else the label number) ordered by label number."""
    frames = [run.pretrain[["label", "label_name"]], run.test[["label", "label_name"]]]
    pairs = pd.concat(frames, ignore_index=True).drop_duplicates()
    pairs["name"] = class_names(pairs)
    pairs = pairs.sort_values(["label", "name"], na_position="last")
    return list(dict.fromkeys(pairs["name"]))


def harmful_counts(run: Run, scenario: str) -> pd.DataFrame:
    """Per pretraining example: in how many tests' top-k harmful it appears, and its summed
    score over the wrong predictions (from those lists)."""
    top = run.top[(run.top["scenario"] == scenario) & (run.top["kind"] == "harmful")]
    preds = run.predictions[run.predictions["scenario"] == scenario].set_index("test_id")
    wrong = top["test_id"].map(~preds["correct"]).fillna(False).astype(bool)
    table = pd.DataFrame(
        {
            "pretrain_id": top["pretrain_id"],
            "score": top["score"].astype(float),
            "wrong_score": top["score"].astype(float).where(wrong, 0.0),
            "wrong": wrong,
        }
    ).groupby("pretrain_id")
    result = pd.DataFrame(
        {
            "harmful_to_tests": table.size(),
            "harmful_to_wrong": table["wrong"].sum().astype(int),
            "summed_score_wrong": table["wrong_score"].sum(),
        }
    )
    return result.sort_values(
        ["harmful_to_tests", "summed_score_wrong"], ascending=[False, True]
    ).reset_index()


def removal_estimate(
    run: Run, scenario: str, pretrain_ids: list[int], test_ids: list[int]
) -> tuple[pd.Series, str]:
    """First-order estimate of each test's loss change if `pretrain_ids` were removed.

    Removing z changes the loss of t by about score(z, t) (the sign convention of DESIGN.md
    section 3), and to first order the effects add: delta l_t ~= sum over removed z of score(z,t).
    With scores.parquet every score is used; otherwise only the top-k lists (others count 0).
    """
    ids = sorted(int(i) for i in pretrain_ids)
    if run.has_scores:
        summed = _removal_scan(run.key, run.stamp, scenario, tuple(ids))
        return summed.reindex(test_ids).fillna(0.0), "all pretraining scores (scores.parquet)"
    top = run.top[
        (run.top["scenario"] == scenario)
        & run.top["pretrain_id"].isin(ids)
        & run.top["test_id"].isin(test_ids)
    ]
    summed = top.groupby("test_id")["score"].sum().reindex(test_ids).fillna(0.0)
    return summed.astype(float), "the top-k lists only (scores outside them counted as 0)"


@st.cache_data(max_entries=32, show_spinner="Summing scores over all tests…")
def _removal_scan(run_key: str, stamp: float, scenario: str, ids: tuple[int, ...]) -> pd.Series:
    table = pq.read_table(
        Path(run_key) / "scores.parquet",
        columns=["test_id", "score"],
        filters=[("scenario", "=", scenario), ("pretrain_id", "in", list(ids))],
    ).to_pandas()
    return table.groupby("test_id")["score"].sum().astype(float)
