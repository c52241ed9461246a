"""Cached, pure readers of a run directory (docs/design.md section 5). No widgets in here.

The file format itself (schemas, manifest checks, id checks) lives in `precompute.rundir`; the
reads that stay small at a million pretraining examples live in `explorer.store`; this module
adds caching and the few summaries the views need. Shared resources (st.cache_resource) are
read-only by convention, so a rerun costs no copy. What grows with the run is bounded: one
test's scores are 4 bytes per pretraining example and at most SCORE_CACHE_ENTRIES of them are
kept, whatever the number of tests opened; the text and images of pretraining examples are read
from pretrain.parquet only for the examples shown.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from explorer import raster, store
from explorer.targets import REQUIRED_TABLES
from precompute.rundir import RunError, check_ids, read_manifest, read_table, unconverged_tests

SCORE_CACHE_ENTRIES = 24  # tests whose scores stay in memory (4 MB each at 1M examples)
TOP_ROWS_LOADED = 50_000  # the inputs of up to this many top-k examples are read with the run


@dataclass(frozen=True)
class Run:
    """One loaded run. Frames are shared between sessions: never modify them in place."""

    path: Path
    manifest: dict
    # pretrain_id, label, label_name (categorical), umap_x, umap_y; indexed by pretrain_id. The
    # text and images are not in it: read them with `examples` (a few rows at a time)
    pretrain: pd.DataFrame
    test: pd.DataFrame  # indexed by test_id, every column
    predictions: pd.DataFrame  # scenario, test_id, pred, pred_name, confidence, loss, correct
    top: pd.DataFrame  # scenario, test_id, kind, rank, pretrain_id, score
    has_scores: bool
    validation: pd.DataFrame | None
    stamp: float  # manifest mtime: part of every cache key, so a rewritten run is re-read
    unconverged: dict[str, frozenset[int]] = field(default_factory=dict)  # scenario -> tests
    store: store.Pretrain | None = field(default=None, repr=False)
    scores_index: store.ScoresIndex | None = field(default=None, repr=False)
    # every column of the examples in the top-k lists, indexed by pretrain_id (None when
    # there are more than TOP_ROWS_LOADED of them): a deep link reads no parquet
    top_rows: pd.DataFrame | None = field(default=None, repr=False)
    # the whole map (pretraining and test examples) and each pretraining example's pixel in
    # its raster: a test's map then only re-colours pixels
    map_extent: raster.Extent | None = field(default=None, repr=False)
    map_pixels: np.ndarray | None = field(default=None, repr=False)

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

    @property
    def has_images(self) -> bool:
        """Whether the pretraining inputs are images (decided from the run, never the cells)."""
        return bool(self.store and self.store.has_images)

    @property
    def has_text(self) -> bool:
        return bool(self.store and self.store.has_text)


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
        pretrain = store.load_pretrain(path / "pretrain.parquet")
        test = read_table(path, "test").set_index("test_id", drop=False)
        predictions = read_table(path, "predictions")
        top = read_table(path, "top").sort_values(["scenario", "test_id", "kind", "rank"])
        validation = (
            read_table(path, "validation") if (path / "validation.parquet").is_file() else None
        )
    except (OSError, KeyError, ValueError) as exc:  # unreadable parquet, missing columns
        raise RunError(f"{path} holds a table that cannot be read ({exc})") from exc
    tables = {"pretrain": pretrain.frame, "test": test, "predictions": predictions, "top": top}
    check_ids(path, {**tables, "validation": validation}, manifest)
    unconverged = unconverged_tests(manifest, test.index)
    has_scores = (path / "scores.parquet").is_file()
    scenarios = predictions["scenario"].astype(str).unique()
    top_ids = np.unique(top["pretrain_id"].to_numpy())
    try:
        top_rows = pretrain.rows(top_ids) if len(top_ids) <= TOP_ROWS_LOADED else None
        scores_index = (
            store.scores_index(path / "scores.parquet", scenarios, test.index)
            if has_scores
            else None
        )
    except (OSError, KeyError, ValueError) as exc:
        raise RunError(f"{path} holds a table that cannot be read ({exc})") from exc
    x, y = pretrain.frame["umap_x"].to_numpy(), pretrain.frame["umap_y"].to_numpy()
    extent = raster.full_extent(
        np.concatenate([x, test["umap_x"].to_numpy()]).astype(np.float64),
        np.concatenate([y, test["umap_y"].to_numpy()]).astype(np.float64),
    )
    return Run(
        path=path,
        manifest=manifest,
        pretrain=pretrain.frame,
        test=test,
        predictions=predictions,
        top=top.reset_index(drop=True),
        has_scores=has_scores,
        validation=validation,
        stamp=stamp,
        unconverged={s: frozenset(ids) for s, ids in unconverged.items()},
        store=pretrain,
        scores_index=scores_index,
        top_rows=top_rows,
        map_extent=extent,
        map_pixels=raster.pixels(x, y, extent),
    )


# --- pretraining examples ----------------------------------------------------------------------


def examples(run: Run, ids) -> pd.DataFrame:
    """The pretraining examples `ids` with every column (text and images included), in that
    order, indexed by pretrain_id; ids the run does not hold are left out."""
    key = tuple(int(i) for i in ids)
    if not key:
        return run.store.rows([])
    return _examples(run.key, run.stamp, key)


@st.cache_data(max_entries=256, show_spinner=False)
def _examples(run_key: str, stamp: float, ids: tuple[int, ...]) -> pd.DataFrame:
    return load_run(Path(run_key)).store.rows(list(ids))


def example(run: Run, pretrain_id: int) -> pd.Series | None:
    """One pretraining example with every column, or None when the run does not hold it."""
    rows = examples(run, [pretrain_id])
    return rows.iloc[0] if len(rows) else None


def pretrain_classes(run: Run) -> pd.Series:
    """The class name of every pretraining example (categorical, indexed by pretrain_id, the
    categories in `class_order`); computed once per run from the distinct (label, name) pairs."""
    return _pretrain_classes(run.key, run.stamp)


@st.cache_resource(max_entries=8, show_spinner=False)
def _pretrain_classes(run_key: str, stamp: float) -> pd.Series:
    run = load_run(Path(run_key))
    frame = run.pretrain
    labels, label_values = pd.factorize(frame["label"], use_na_sentinel=False)
    names, name_values = pd.factorize(frame["label_name"], use_na_sentinel=False)
    pairs, pair_values = pd.factorize(labels.astype(np.int64) * len(name_values) + names)
    distinct = pd.DataFrame(
        {
            "label": np.asarray(label_values, dtype=object)[pair_values // len(name_values)],
            "label_name": np.asarray(name_values, dtype=object)[pair_values % len(name_values)],
        }
    )
    distinct["label"] = pd.to_numeric(distinct["label"]).astype("Float64")
    pair_names = class_names(distinct).to_numpy()
    order = class_order(run)
    codes = pd.Index(order).get_indexer(pair_names)[pairs]
    categorical = pd.Categorical.from_codes(codes, categories=order)
    return pd.Series(categorical, index=frame.index, name="class")


def class_order(run: Run) -> list[str]:
    """Class names (label_name, else the label number) ordered by label number."""
    return _class_order(run.key, run.stamp)


@st.cache_resource(max_entries=8, show_spinner=False)
def _class_order(run_key: str, stamp: float) -> list[str]:
    run = load_run(Path(run_key))
    frames = [run.pretrain[["label", "label_name"]], run.test[["label", "label_name"]]]
    frames = [f.astype({"label_name": object}).drop_duplicates() for f in frames]
    pairs = pd.concat(frames, ignore_index=True).drop_duplicates()
    pairs["name"] = class_names(pairs)
    pairs = pairs.sort_values(["label", "name"], na_position="last")
    return list(dict.fromkeys(pairs["name"]))


# --- top-k lists and scores ----------------------------------------------------------------------


def top_list(run: Run, scenario: str, test_id: int, kind: str, k: int) -> pd.DataFrame:
    """The top-k `kind` ("helpful" | "harmful") of one test, joined with the example rows."""
    rows = _top_rows(run.key, run.stamp, scenario, int(test_id), kind)
    return rows[rows["rank"] <= k]


@st.cache_data(max_entries=512, show_spinner=False)
def _top_rows(run_key: str, stamp: float, scenario: str, test_id: int, kind: str) -> pd.DataFrame:
    run = load_run(Path(run_key))
    top = _top_index(run_key, stamp).get((scenario, test_id, kind), run.top.iloc[:0])
    rows = run.top_rows if run.top_rows is not None else run.store.rows(top["pretrain_id"])
    return top.join(rows.drop(columns="pretrain_id"), on="pretrain_id")


@st.cache_resource(max_entries=8)
def _top_index(run_key: str, stamp: float) -> dict[tuple[str, int, str], pd.DataFrame]:
    top = load_run(Path(run_key)).top
    return {
        (str(s), int(t), str(k)): group
        for (s, t, k), group in top.groupby(["scenario", "test_id", "kind"], sort=False)
    }


def top_rank(run: Run, scenario: str, test_id: int, pretrain_id: int) -> tuple[int, str] | None:
    """(rank, kind) of one example in a test's top-k lists, or None when it is in neither."""
    for kind in ("helpful", "harmful"):
        rows = _top_index(run.key, run.stamp).get((scenario, int(test_id), kind))
        if rows is not None:
            hit = rows[rows["pretrain_id"] == pretrain_id]
            if len(hit):
                return int(hit["rank"].iloc[0]), kind
    return None


def prediction(run: Run, scenario: str, test_id: int) -> pd.Series | None:
    """The finetuned model's prediction of one test in one scenario."""
    rows = run.predictions[
        (run.predictions["scenario"] == scenario) & (run.predictions["test_id"] == test_id)
    ]
    return rows.iloc[0] if len(rows) else None


def score_values(run: Run, scenario: str, test_id: int) -> np.ndarray | None:
    """Every pretraining score of one test as a read-only float32 array in the order of
    `run.pretrain` (NaN where the run holds none), or None without scores.parquet; RunError
    when those scores name a pretraining example that the run does not hold."""
    if not run.has_scores:
        return None
    return _score_values(run.key, run.stamp, scenario, int(test_id))


@st.cache_resource(max_entries=SCORE_CACHE_ENTRIES, show_spinner=False)
def _score_values(run_key: str, stamp: float, scenario: str, test_id: int) -> np.ndarray | None:
    run = load_run(Path(run_key))
    return store.read_scores(run.scores_index, run.store, scenario, test_id)


def test_scores(run: Run, scenario: str, test_id: int) -> pd.Series | None:
    """Every pretraining score of one test (indexed by pretrain_id), or None without scores;
    RunError when those scores name a pretraining example that the run does not hold. Shares
    its memory with the cached array (no copy)."""
    values = score_values(run, scenario, test_id)
    if values is None:
        return None
    scores = pd.Series(values, index=run.pretrain.index, name="score", copy=False)
    return scores.dropna() if np.isnan(values).any() else scores


def total_influence(run: Run, scenario: str, test_id: int) -> float | None:
    """The sum of |score| over every pretraining example of one test; None without scores."""
    if not run.has_scores:
        return None
    return _total_influence(run.key, run.stamp, scenario, int(test_id))


@st.cache_data(max_entries=1024, show_spinner=False)
def _total_influence(run_key: str, stamp: float, scenario: str, test_id: int) -> float | None:
    values = score_values(load_run(Path(run_key)), scenario, test_id)
    return None if values is None else float(np.nansum(np.abs(values), dtype=np.float64))


def score_summary(run: Run, scenario: str, test_id: int) -> dict | None:
    """For one test with full scores, computed once: `count`, `total_abs` (sum of |score|),
    `mass` (how many examples carry 50/80/95% of it, see `influence_mass`), `histogram`
    (counts, bin edges; 120 bins) and `curve` (ranks, cumulative share of |score|, at most
    CURVE_POINTS points); None without scores."""
    if not run.has_scores:
        return None
    return _score_summary(run.key, run.stamp, scenario, int(test_id))


CURVE_POINTS = 4000  # a few thousand points draw the cumulative curve as well as a million


@st.cache_data(max_entries=512, show_spinner=False)
def _score_summary(run_key: str, stamp: float, scenario: str, test_id: int) -> dict | None:
    values = score_values(load_run(Path(run_key)), scenario, test_id)
    if values is None:
        return None
    return summarise(values)


def summarise(values: np.ndarray, fractions=(0.5, 0.8, 0.95)) -> dict:
    """`score_summary` of an array of scores (NaN ignored)."""
    values = np.asarray(values)
    values = values[np.isfinite(values)]
    magnitude = np.sort(np.abs(values))[::-1]  # in the scores' own float32: twice as fast
    total = float(magnitude.sum(dtype=np.float64))
    cumulative = np.cumsum(magnitude, dtype=np.float64) / total if total else np.zeros(0)
    mass = (
        {f: int(np.searchsorted(cumulative, f) + 1) for f in fractions}
        if total
        else {f: 0 for f in fractions}
    )
    step = max(1, magnitude.size // CURVE_POINTS)
    ranks = np.arange(1, magnitude.size + 1)[::step]
    counts, edges = np.histogram(values, bins=120) if values.size else (np.zeros(0), np.zeros(1))
    return {
        "count": int(values.size),
        "total_abs": total,
        "mass": mass,
        "histogram": (counts, edges),
        "curve": (ranks, cumulative[::step]),
    }


def influence_mass(scores: np.ndarray, fractions=(0.5, 0.8, 0.95)) -> dict[float, int]:
    """How many examples (largest |score| first) carry each fraction of the total |score|."""
    return summarise(scores, fractions)["mass"]


def class_heatmap(run: Run, scenario: str) -> tuple[pd.DataFrame, str]:
    """Mean score per (test true class, pretraining class) over all tests of a scenario.

    Uses scores.parquet (one test at a time, never the whole table; cached) when present, else
    the top-k lists; the second value names the source.
    """
    return _class_heatmap(run.key, run.stamp, scenario)


@st.cache_data(max_entries=16, show_spinner="Aggregating scores over all tests…")
def _class_heatmap(run_key: str, stamp: float, scenario: str) -> tuple[pd.DataFrame, str]:
    run = load_run(Path(run_key))
    test_label = class_names(run.test)
    classes = pretrain_classes(run)
    names = list(classes.cat.categories)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}

    def add(test_class: str, codes: np.ndarray, values: np.ndarray) -> None:
        use = (codes >= 0) & np.isfinite(values)
        total = np.bincount(codes[use], weights=values[use], minlength=len(names))
        count = np.bincount(codes[use], minlength=len(names))
        sums[test_class] = sums.get(test_class, 0.0) + total
        counts[test_class] = counts.get(test_class, 0) + count

    if run.has_scores:
        source = "all pretraining scores (scores.parquet)"
        codes = classes.cat.codes.to_numpy()
        for test_id in run.test.index:
            try:  # not through the score cache: this pass would evict what visitors look at
                values = store.read_scores(run.scores_index, run.store, scenario, int(test_id))
            except RunError:  # the selected test's view says so; here it is left out
                continue
            if values is not None:
                add(test_label.loc[test_id], codes, values)
    else:
        source = "the top-k lists only (this run has no scores.parquet)"
        top = run.top[run.top["scenario"] == scenario]
        codes = classes.cat.codes.reindex(top["pretrain_id"]).fillna(-1).to_numpy(np.int64)
        values = top["score"].to_numpy(np.float64)
        for test_id, where in top.groupby("test_id").indices.items():
            add(test_label.loc[test_id], codes[where], values[where])
    if not sums:
        return pd.DataFrame(), source
    with np.errstate(invalid="ignore", divide="ignore"):
        means = {t: sums[t] / np.where(counts[t] > 0, counts[t], np.nan) for t in sums}
    heat = pd.DataFrame(means, index=pd.Index(names, name="pretrain class")).T
    heat.index.name = "test class"
    return heat.dropna(axis=1, how="all").dropna(axis=0, how="all"), source


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

    Removing z changes the loss of t by about score(z, t) (the sign convention of docs/design.md
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
    run = load_run(Path(run_key))
    positions = run.store.positions(list(ids))
    positions = positions[positions >= 0]
    summed = {}
    for test_id in run.test.index:
        try:  # one test at a time, outside the score cache (see _class_heatmap)
            values = store.read_scores(run.scores_index, run.store, scenario, int(test_id))
        except RunError:
            continue
        if values is not None:
            summed[int(test_id)] = float(np.nansum(values[positions], dtype=np.float64))
    return pd.Series(summed, dtype=float)


# --- the embedding map (explorer.raster) --------------------------------------------------------


def map_extent(run: Run) -> raster.Extent:
    """The extent of the whole map: every pretraining and test example, with a margin."""
    return run.map_extent


@st.cache_resource(max_entries=8, show_spinner=False)
def _map_pixels(run_key: str, stamp: float, bounds: tuple[float, ...]) -> np.ndarray:
    """The pixel of every pretraining example in the extent `bounds` (int32, -1 outside):
    computed once per run and extent, so a new test only re-colours the pixels."""
    run = load_run(Path(run_key))
    if bounds == astuple(run.map_extent):
        return run.map_pixels
    extent = raster.Extent(*bounds)
    return raster.pixels(
        run.pretrain["umap_x"].to_numpy(), run.pretrain["umap_y"].to_numpy(), extent
    )


@st.cache_resource(max_entries=4, show_spinner=False)
def _map_density(run_key: str, stamp: float, bounds: tuple[float, ...]) -> raster.Density:
    """How many pretraining examples each pixel of the extent `bounds` holds, and the opacity
    that gives: the same for every test, so a test's map only averages its scores."""
    return raster.density(_map_pixels(run_key, stamp, bounds))


def map_image(
    run: Run, scenario: str, test_id: int, extent: raster.Extent
) -> tuple[bytes, float | None, list[str]]:
    """The pretraining examples in `extent` as a PNG (raster.WIDTH x raster.HEIGHT): coloured by
    the test's scores (the second value is the |score| where the colour saturates), or, without
    scores, by class (the third value lists the classes of the palette's colours)."""
    has_scores = run.has_scores
    return _map_image(
        run.key,
        run.stamp,
        scenario if has_scores else "",
        int(test_id) if has_scores else -1,
        astuple(extent),
    )


@st.cache_data(max_entries=64, show_spinner=False)
def _map_image(
    run_key: str, stamp: float, scenario: str, test_id: int, bounds: tuple[float, ...]
) -> tuple[bytes, float | None, list[str]]:
    run = load_run(Path(run_key))
    pixel = _map_pixels(run_key, stamp, bounds)
    values = score_values(run, scenario, test_id) if test_id >= 0 else None
    if values is not None:
        base = _map_density(run_key, stamp, bounds)
        image, limit = raster.score_image(pixel, values, base=base)
        return raster.png(image), limit, []
    classes = pretrain_classes(run)
    by_size = classes.value_counts().index  # the commonest classes get their own colours
    rank = pd.Series(np.arange(len(by_size)), index=by_size).reindex(classes.cat.categories)
    codes = classes.cat.codes.to_numpy()
    ranks = np.where(codes >= 0, rank.to_numpy()[codes], -1)
    return raster.png(raster.class_image(pixel, ranks)), None, [str(c) for c in by_size]


def region_positions(run: Run, box=None, lasso=None) -> np.ndarray:
    """Row positions (in `run.pretrain`) of the pretraining examples inside a box
    ((x0, x1), (y0, y1)) or a lasso polygon ((x...), (y...)), both in map coordinates."""
    return _region_positions(run.key, run.stamp, box, lasso)


@st.cache_resource(max_entries=8, show_spinner=False)
def _region_positions(run_key: str, stamp: float, box, lasso) -> np.ndarray:
    run = load_run(Path(run_key))
    x, y = run.pretrain["umap_x"].to_numpy(), run.pretrain["umap_y"].to_numpy()
    if box is not None:
        (x0, x1), (y0, y1) = sorted(box[0]), sorted(box[1])
        inside = raster.Extent(x0, x1, y0, y1).contains(x, y)
    else:
        inside = raster.in_polygon(x, y, np.asarray(lasso[0]), np.asarray(lasso[1]))
    positions = np.flatnonzero(inside).astype(np.int32)  # half the memory of int64
    positions.flags.writeable = False
    return positions


def search_text(run: Run, query: str, limit: int) -> tuple[list[int], int]:
    """The first `limit` pretraining examples whose text contains `query` (any case), and how
    many do in all (one pass over the text column, cached per run and query)."""
    return _search_text(run.key, run.stamp, query, limit)


@st.cache_data(max_entries=64, show_spinner="Searching the texts…")
def _search_text(run_key: str, stamp: float, query: str, limit: int) -> tuple[list[int], int]:
    return store.search_text(Path(run_key) / "pretrain.parquet", query, limit)
