"""Reads of a large run that stay small (docs/design.md section 5): no streamlit in here.

At a million pretraining examples the text (or image) of every example, or a test's scores as a
pandas Series of Python objects, would cost the server hundreds of MiB per run. So:
- `Pretrain` holds only the light columns (id, label, class, map position) and the first row of
  each row group of pretrain.parquet; `Pretrain.rows(ids)` reads the text and images of a few
  examples from the row groups that hold them (the engine writes groups of 20,000 rows);
- `ScoresIndex` maps (scenario, test_id) to the row groups of scores.parquet that hold them,
  from the file's footer; `read_scores` reads those groups only and returns the scores as one
  float32 array in pretrain.parquet's row order (4 bytes per example);
- `search` scans the text column one row group at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from precompute.rundir import RunError, read_test_scores_checked

LIGHT_COLUMNS = ["pretrain_id", "label", "label_name", "umap_x", "umap_y"]
HEAVY_COLUMNS = ["text", "image_png"]


def _id_text(value) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _all_null(meta: pq.FileMetaData, column: str) -> bool | None:
    """Whether every value of `column` is null, from the footer statistics (None: unknown)."""
    names = [meta.schema.column(j).name for j in range(meta.num_columns)]
    if column not in names:
        return True
    j = names.index(column)
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        stats = group.column(j).statistics
        if stats is None or not stats.has_null_count:
            return None
        if stats.null_count < group.num_rows:
            return False
    return True


@dataclass(frozen=True)
class Pretrain:
    """pretrain.parquet without its text and images: those are read per example, on demand."""

    path: Path
    frame: pd.DataFrame  # LIGHT_COLUMNS, indexed by pretrain_id; label_name categorical
    group_starts: np.ndarray  # first row of each row group, then the number of rows
    has_text: bool
    has_images: bool
    _range_ids: bool = field(default=False, repr=False)  # ids are 0..n-1 in row order

    @property
    def ids(self) -> np.ndarray:
        return self.frame["pretrain_id"].to_numpy()

    def __len__(self) -> int:
        return len(self.frame)

    def positions(self, ids) -> np.ndarray:
        """Row positions of `ids` in pretrain.parquet (-1 for an id it does not hold)."""
        ids = np.asarray(ids, dtype=np.int64)
        if self._range_ids:
            return np.where((ids >= 0) & (ids < len(self)), ids, -1)
        return self.frame.index.get_indexer(ids)

    def rows(self, ids, columns=HEAVY_COLUMNS) -> pd.DataFrame:
        """The light columns and `columns` of the examples `ids`, in that order, indexed by
        pretrain_id; ids that the run does not hold are left out. Reads only the row groups
        holding them."""
        positions = self.positions(ids)
        positions = positions[positions >= 0]
        light = self.frame.iloc[positions]
        if len(positions) == 0 or not columns:
            return light.assign(**{c: pd.Series(dtype=object) for c in columns})
        groups = np.searchsorted(self.group_starts, positions, side="right") - 1
        parquet = pq.ParquetFile(self.path)
        absent = [c for c in columns if c not in parquet.schema_arrow.names]
        columns = [c for c in columns if c not in absent]
        parts, order = [], []
        for group in np.unique(groups):  # one row group at a time: memory stays one group's
            where = np.flatnonzero(groups == group)
            local = positions[where] - self.group_starts[group]
            table = parquet.read_row_group(int(group), columns=list(columns))
            parts.append(table.take(pa.array(local)))
            order.append(where)
        heavy = pa.concat_tables(parts).to_pandas()
        heavy = heavy.iloc[np.argsort(np.concatenate(order), kind="stable")]
        heavy.index = light.index
        return pd.concat([light, heavy], axis=1).assign(**{c: None for c in absent})


def load_pretrain(path: Path) -> Pretrain:
    """The light columns of pretrain.parquet (a few bytes per example) and its row groups."""
    parquet = pq.ParquetFile(path)
    meta = parquet.metadata
    present = set(parquet.schema_arrow.names)
    missing = [c for c in LIGHT_COLUMNS if c not in present]
    if missing:
        raise KeyError(f"pretrain.parquet has no column {missing[0]}")
    dictionary = (
        ["label_name"] if pa.types.is_string(parquet.schema_arrow.field("label_name").type) else []
    )
    frame = pq.read_table(path, columns=LIGHT_COLUMNS, read_dictionary=dictionary).to_pandas()
    frame = frame.set_index("pretrain_id", drop=False)
    sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
    starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
    flags = {}
    for column in HEAVY_COLUMNS:
        known = _all_null(meta, column)
        if known is None:  # no statistics: look at the column itself, one group at a time
            known = all(
                parquet.read_row_group(g, columns=[column]).column(0).null_count == size
                for g, size in enumerate(sizes)
            )
        flags[column] = not known
    ids = frame["pretrain_id"].to_numpy()
    range_ids = bool(
        ids.dtype.kind == "i"
        and len(ids)
        and ids[0] == 0
        and np.array_equal(ids, np.arange(len(ids)))
    )
    return Pretrain(
        path=Path(path),
        frame=frame,
        group_starts=starts,
        has_text=flags["text"],
        has_images=flags["image_png"],
        _range_ids=range_ids,
    )


# --- scores.parquet ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoresIndex:
    """Which row groups of scores.parquet may hold each (scenario, test_id), from the footer's
    statistics; `mixed` lists the groups that hold more than one (scenario, test)."""

    path: Path
    groups: dict[tuple[str, int], list[int]] | None  # None: the footer has no statistics
    mixed: frozenset[int] = frozenset()


def scores_index(path: Path, scenarios, test_ids) -> ScoresIndex:
    """The row groups of each (scenario, test) of the run, read from the file's footer only."""
    meta = pq.read_metadata(path)
    names = {meta.schema.column(j).name: j for j in range(meta.num_columns)}
    if "scenario" not in names or "test_id" not in names:
        return ScoresIndex(Path(path), None)
    scenarios = sorted(str(s) for s in scenarios)
    tests = np.sort(np.asarray(list(test_ids), dtype=np.int64))
    groups: dict[tuple[str, int], list[int]] = {}
    mixed = set()
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        if group.num_rows == 0:
            continue
        s_stats = group.column(names["scenario"]).statistics
        t_stats = group.column(names["test_id"]).statistics
        if not (s_stats and t_stats and s_stats.has_min_max and t_stats.has_min_max):
            return ScoresIndex(Path(path), None)
        s_low, s_high = str(s_stats.min), str(s_stats.max)
        inside = [s for s in scenarios if s_low <= s <= s_high]
        low = np.searchsorted(tests, t_stats.min, side="left")
        high = np.searchsorted(tests, t_stats.max, side="right")
        in_tests = tests[low:high]
        if len(inside) * len(in_tests) > 1 or s_low != s_high or t_stats.min != t_stats.max:
            mixed.add(g)
        for scenario in inside:
            for test in in_tests:
                groups.setdefault((scenario, int(test)), []).append(g)
    return ScoresIndex(Path(path), groups, frozenset(mixed))


def read_scores(
    index: ScoresIndex, pretrain: Pretrain, scenario: str, test_id: int
) -> np.ndarray | None:
    """Every score of one (scenario, test) as float32 in pretrain.parquet's row order (NaN for
    an example without a score), or None when the file holds none for it.

    RunError (one sentence) when those rows name a pretrain_id that pretrain.parquet does not
    hold, a null one, or one twice.
    """
    test_id = int(test_id)
    where = f"for test {test_id} of scenario {scenario!r}"
    if index.groups is None:  # no statistics: let pyarrow's filter find the rows
        frame = read_test_scores_checked(index.path.parent, scenario, test_id, pretrain.frame.index)
        if frame is None or frame.empty:
            return None
        ids, scores = frame["pretrain_id"].to_numpy(), frame["score"].to_numpy()
        return _aligned(pretrain, ids, scores, where)
    groups = index.groups.get((scenario, test_id), [])
    if not groups:
        return None
    mixed = any(g in index.mixed for g in groups)
    columns = ["scenario", "test_id", "pretrain_id", "score"] if mixed else ["pretrain_id", "score"]
    table = pq.ParquetFile(index.path).read_row_groups(groups, columns=columns)
    if mixed:
        keep = pc.and_(
            pc.equal(table.column("scenario"), scenario), pc.equal(table.column("test_id"), test_id)
        )
        table = table.filter(keep)
    if table.num_rows == 0:
        return None
    id_column = table.column("pretrain_id")
    if id_column.null_count:
        raise RunError(f"scores.parquet has a null pretrain_id {where}")
    ids = id_column.to_numpy()
    scores = table.column("score").to_numpy(zero_copy_only=False)
    return _aligned(pretrain, ids, scores, where)


def _aligned(pretrain: Pretrain, ids: np.ndarray, scores: np.ndarray, where: str) -> np.ndarray:
    """`scores` placed at the rows of `ids` in pretrain.parquet; RunError for an unknown or
    repeated id."""
    n = len(pretrain)
    scores = np.asarray(scores, dtype=np.float32)
    if len(ids) == n and np.array_equal(ids, pretrain.ids):  # the engine's order: no lookup
        values = scores.copy()
        values.flags.writeable = False
        return values
    positions = pretrain.positions(ids)
    unknown = positions < 0
    if unknown.any():
        raise RunError(
            f"scores.parquet names pretrain_id {_id_text(ids[unknown][0])} {where}, "
            "which pretrain.parquet does not hold"
        )
    counts = np.bincount(positions, minlength=n)
    if (counts > 1).any():
        repeated = pretrain.ids[np.argmax(counts > 1)]
        raise RunError(
            f"scores.parquet holds pretrain_id {_id_text(repeated)} more than once {where}"
        )
    values = np.full(n, np.nan, dtype=np.float32)
    values[positions] = scores
    values.flags.writeable = False
    return values


# --- search ----------------------------------------------------------------------------------


def search_text(path: Path, query: str, limit: int = 200) -> tuple[list[int], int]:
    """The ids of the first `limit` examples whose text contains `query` (any case), in row
    order, and how many match in all. One row group at a time, so memory stays small."""
    parquet = pq.ParquetFile(path)
    found: list[int] = []
    total = 0
    for g in range(parquet.metadata.num_row_groups):
        table = parquet.read_row_group(g, columns=["pretrain_id", "text"])
        text = table.column("text")
        if text.null_count == len(text):
            continue
        hits = pc.fill_null(pc.match_substring(text, query, ignore_case=True), False)
        count = pc.sum(hits).as_py() or 0
        if count:
            total += count
            if len(found) < limit:
                ids = table.column("pretrain_id").filter(hits).to_numpy()
                found.extend(int(i) for i in ids[: limit - len(found)])
    return found, total
