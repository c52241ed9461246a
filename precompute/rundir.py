"""The run directory: the contract between precompute and explorer (docs/design.md section 5).

A run is written into a temporary sibling directory and renamed into place when whole; the
manifest is written last with "complete": true, so a crash never leaves a run that looks whole.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from precompute.outpath import (
    MARKER,
    Claim,
    abandoned,
    check_out,
    entries,
    remove_stale,
    temporary_name,
)

SCHEMA_VERSION = 1

TABLE_SCHEMAS: dict[str, pa.Schema] = {
    "pretrain": pa.schema(
        [
            ("pretrain_id", pa.int64()),
            ("label", pa.int64()),
            ("label_name", pa.string()),
            ("text", pa.string()),
            ("image_png", pa.binary()),
            ("umap_x", pa.float32()),
            ("umap_y", pa.float32()),
        ]
    ),
    "test": pa.schema(
        [
            ("test_id", pa.int64()),
            ("label", pa.int64()),
            ("label_name", pa.string()),
            ("text", pa.string()),
            ("image_png", pa.binary()),
            ("umap_x", pa.float32()),
            ("umap_y", pa.float32()),
        ]
    ),
    "predictions": pa.schema(
        [
            ("scenario", pa.string()),
            ("test_id", pa.int64()),
            ("pred", pa.int64()),
            ("pred_name", pa.string()),
            ("confidence", pa.float32()),
            ("loss", pa.float32()),
            ("correct", pa.bool_()),
        ]
    ),
    "top": pa.schema(
        [
            ("scenario", pa.string()),
            ("test_id", pa.int64()),
            ("kind", pa.string()),
            ("rank", pa.int32()),
            ("pretrain_id", pa.int64()),
            ("score", pa.float32()),
        ]
    ),
    "scores": pa.schema(
        [
            ("scenario", pa.string()),
            ("test_id", pa.int64()),
            ("pretrain_id", pa.int64()),
            ("score", pa.float32()),
        ]
    ),
    "validation": pa.schema(
        [
            ("scenario", pa.string()),
            ("test_id", pa.int64()),
            ("pretrain_id", pa.int64()),
            ("predicted", pa.float64()),
            ("actual", pa.float64()),
        ]
    ),
}


class RunError(ValueError):
    """A run directory is missing, incomplete or of an unknown format; one sentence."""


def to_table(name: str, frame: pd.DataFrame) -> pa.Table:
    """Cast a frame to the documented schema of `name`; extra columns are kept after them."""
    schema = TABLE_SCHEMAS[name]
    missing = [f.name for f in schema if f.name not in frame.columns]
    if missing:
        raise ValueError(f"{name}.parquet is missing columns {missing}")
    extra = [c for c in frame.columns if c not in schema.names]
    table = pa.Table.from_pandas(frame[schema.names + extra], preserve_index=False)
    fields = list(schema) + [table.schema.field(c) for c in extra]
    return table.cast(pa.schema(fields))


def is_complete(run_dir: Path) -> bool:
    try:
        return bool(read_manifest(run_dir).get("complete"))
    except RunError:
        return False


class RunWriter:
    """Writes one run atomically: tables into a temporary sibling, manifest last, then rename.

    `out` must pass `precompute.outpath.check_out` (checked here and again before the rename).
    Use as a context manager; if the body raises, the temporary directory is removed and
    nothing at `out` changes. msif's own stale temporaries beside `out` are removed when the
    writer starts and when it finishes.
    """

    def __init__(self, out: Path, overwrite: bool = False, resume: bool = False):
        self.out = Path(out).expanduser()
        self.overwrite, self.resume = overwrite, resume
        check_out(self.out, overwrite)
        self.tmp = temporary_name(self.out, "tmp", uuid.uuid4().hex[:8])
        self.resumed = False  # True when the temporary folder of an interrupted run is reused
        self.keep = False  # keep the temporary folder on failure (its checkpoints, for --resume)
        self._claim: Claim | None = None
        self._finished = False

    def __enter__(self) -> RunWriter:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        if self.resume:
            partial = [f for f in abandoned(self.out) if (f / "state" / "key.json").is_file()]
            if partial:
                self.tmp, self.resumed = partial[0], True
        remove_stale(self.out, keep=self.tmp if self.resumed else None)
        if not self.resumed:
            self.tmp.mkdir()
        try:
            self._claim = Claim(self.tmp, self.out)
        except BlockingIOError:
            raise RunError(f"another msif process is writing {self.tmp}; wait for it") from None
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._claim is not None:
            self._claim.release()
        if not self._finished and not self.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def path(self, name: str) -> Path:
        return self.tmp / name

    def write_table(self, name: str, frame: pd.DataFrame, **kwargs) -> None:
        pq.write_table(to_table(name, frame), self.tmp / f"{name}.parquet", **kwargs)

    def scores_writer(self) -> pq.ParquetWriter:
        """A ParquetWriter for scores.parquet; write row groups sorted by (scenario, test_id)."""
        return pq.ParquetWriter(self.tmp / "scores.parquet", TABLE_SCHEMAS["scores"])

    def finish(self, manifest: dict) -> Path:
        """Write the manifest (strict JSON, listing the run's files) and rename into place."""
        self._claim.release()
        (self.tmp / MARKER).unlink()
        files = entries(self.tmp)
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "generator": "msif",
            **manifest,
            "files": sorted([*files, "manifest.json"]),
            "complete": True,
        }
        (self.tmp / "manifest.json").write_text(manifest_json(manifest))
        check_out(self.out, self.overwrite)  # nothing of the user's appeared meanwhile
        if self.out.exists():  # --overwrite of an msif run
            trash = temporary_name(self.out, "old", uuid.uuid4().hex[:8])
            os.replace(self.out, trash)
            os.replace(self.tmp, self.out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(self.tmp, self.out)
        self._finished = True
        remove_stale(self.out)
        return self.out


def strict(value):
    """`value` with every non-finite float replaced by None, so it is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict(v) for v in value]
    return value


def manifest_json(manifest: dict) -> str:
    """The manifest as strict JSON text (no NaN or Infinity, which JSON does not have)."""
    return json.dumps(strict(manifest), indent=2, default=str, allow_nan=False)


def read_manifest(run_dir: Path) -> dict:
    """The manifest of a whole run, or RunError saying what is wrong with the directory."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"{run_dir} is not a directory")
    path = run_dir / "manifest.json"
    if not path.is_file():
        raise RunError(f"{run_dir} has no manifest.json: it is not a finished msif run")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RunError(f"{path} is not readable JSON ({exc})") from exc
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise RunError(
            f"{run_dir} has schema_version {manifest.get('schema_version')!r}; "
            f"this msif reads version {SCHEMA_VERSION}"
        )
    if manifest.get("complete") is not True:
        raise RunError(f"{run_dir} is incomplete: its manifest is not marked complete")
    return manifest


def read_table(run_dir: Path, name: str, columns: list[str] | None = None) -> pd.DataFrame:
    path = Path(run_dir) / f"{name}.parquet"
    if not path.is_file():
        raise RunError(f"{run_dir} has no {name}.parquet")
    return pq.read_table(path, columns=columns).to_pandas()


def read_test_scores(run_dir: Path, scenario: str, test_id: int) -> pd.DataFrame | None:
    """All pretraining scores of one (scenario, test), or None when the run has no full scores.

    scores.parquet is sorted by (scenario, test_id) in small row groups, so the filter reads
    only the row groups whose statistics can hold this test.
    """
    path = Path(run_dir) / "scores.parquet"
    if not path.is_file():
        return None
    table = pq.read_table(
        path,
        columns=["pretrain_id", "score"],
        filters=[("scenario", "=", scenario), ("test_id", "=", int(test_id))],
    )
    return table.to_pandas()


# --- Ids: every id a run names must be one of its examples (checked when a run is opened) ---

# Tables whose id columns must name rows of pretrain.parquet / test.parquet.
ID_REFERENCES: dict[str, tuple[str, ...]] = {
    "predictions": ("test_id",),
    "top": ("test_id", "pretrain_id"),
    "validation": ("test_id", "pretrain_id"),
}


def _id_text(value) -> str:
    """An id as a reader would type it: 3, not 3.0 or np.int64(3)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return repr(value) if isinstance(value, str) else str(value)


def _id_column(run_dir: Path, name: str, frame: pd.DataFrame | None, column: str) -> pd.Series:
    """One id column of a table, given or read alone from disk; RunError when absent."""
    if frame is None:
        try:
            frame = pq.read_table(Path(run_dir) / f"{name}.parquet", columns=[column]).to_pandas()
        except (OSError, pa.ArrowException) as exc:
            raise RunError(f"{name}.parquet has no readable {column} column ({exc})") from exc
    if column not in frame.columns:
        raise RunError(f"{name}.parquet has no {column} column")
    return frame[column].reset_index(drop=True)


def _whole_ids(name: str, column: str, values: pd.Series) -> pd.Series:
    """The ids as int64; RunError naming the first null, fractional or non-numeric one."""
    if values.isna().any():
        raise RunError(f"{name}.parquet has a null {column} (row {int(values.isna().argmax())})")
    if pd.api.types.is_integer_dtype(values):
        return values.astype("int64")
    if pd.api.types.is_float_dtype(values):
        fractional = values.mod(1) != 0  # also true for inf (inf mod 1 is nan)
        if not fractional.any():
            return values.astype("int64")
        bad = values[fractional].iloc[0]
    else:  # text, booleans, mixed objects: name the first value that is not an int
        odd = ~values.map(pd.api.types.is_integer).astype(bool)
        if not odd.any():
            return values.astype("int64")
        bad = values[odd].iloc[0]
    raise RunError(f"{name}.parquet holds {column} {_id_text(bad)}, which is not a whole number")


def check_ids(
    run_dir: Path, tables: dict | None = None, manifest: dict | None = None
) -> tuple[pd.Index, pd.Index]:
    """Check every id of a run; returns (pretrain ids, test ids) as int64 indexes.

    RunError, one sentence naming the table, the column and an offending id, when
    pretrain.parquet or test.parquet holds a null, fractional or repeated id; when
    predictions.parquet, top.parquet or validation.parquet names an id that they do not hold;
    when scores.parquet does (from its row-group statistics only, see `check_scores_ids`); and,
    given the manifest, when its unconverged_tests does. `tables` maps a table name to a frame
    already read (only its id columns are used) or to None to skip that table; tables not in it
    are read from disk (their id columns only) when their file exists.
    """
    run_dir = Path(run_dir)
    tables = dict(tables or {})
    own: dict[str, pd.Index] = {}
    for name in ("pretrain", "test"):
        column = f"{name}_id"
        ids = _whole_ids(name, column, _id_column(run_dir, name, tables.get(name), column))
        repeated = ids.duplicated()
        if repeated.any():
            raise RunError(f"{name}.parquet holds {column} {ids[repeated].iloc[0]} more than once")
        own[name] = pd.Index(ids)
    for name, columns in ID_REFERENCES.items():
        if name in tables and tables[name] is None:
            continue
        if name not in tables and not (run_dir / f"{name}.parquet").is_file():
            continue
        for column in columns:
            values = _id_column(run_dir, name, tables.get(name), column)
            values = _whole_ids(name, column, values)
            owner = column.removesuffix("_id")
            unknown = ~values.isin(own[owner])
            if unknown.any():
                raise RunError(
                    f"{name}.parquet names {column} {values[unknown].iloc[0]}, "
                    f"which {owner}.parquet does not hold"
                )
    check_scores_ids(run_dir, own["pretrain"], own["test"])
    if manifest is not None:
        unconverged_tests(manifest, own["test"])
    return own["pretrain"], own["test"]


def check_scores_ids(run_dir: Path, pretrain_ids: pd.Index, test_ids: pd.Index) -> None:
    """RunError when the row-group statistics of scores.parquet show a null id, or a smallest
    or largest test_id / pretrain_id that test.parquet / pretrain.parquet does not hold.

    Only the file's footer is read, however many rows it holds, so an id strictly between two
    valid ones is not seen here; `read_test_scores_checked` checks the rows it reads.
    """
    path = Path(run_dir) / "scores.parquet"
    if not path.is_file():
        return
    try:
        meta = pq.read_metadata(path)
        schema = meta.schema.to_arrow_schema()
    except (OSError, pa.ArrowException) as exc:
        raise RunError(f"scores.parquet cannot be read ({exc})") from exc
    leaves = {meta.schema.column(j).path: j for j in range(meta.num_columns)}
    known = {"test_id": test_ids, "pretrain_id": pretrain_ids}
    for column in known:
        if column not in leaves or schema.get_field_index(column) < 0:
            raise RunError(f"scores.parquet has no {column} column")
        kind = schema.field(column).type
        if not pa.types.is_integer(kind):
            raise RunError(f"scores.parquet holds {column} of type {kind}, not whole numbers")
    for group_index in range(meta.num_row_groups):
        group = meta.row_group(group_index)
        if group.num_rows == 0:
            continue
        for column, ids in known.items():
            stats = group.column(leaves[column]).statistics
            if stats is None:
                continue
            if stats.has_null_count and stats.null_count:
                raise RunError(f"scores.parquet has a null {column} (row group {group_index})")
            if not stats.has_min_max:
                continue
            for value in dict.fromkeys((stats.min, stats.max)):
                if value not in ids:
                    owner = column.removesuffix("_id")
                    raise RunError(
                        f"scores.parquet names {column} {value}, "
                        f"which {owner}.parquet does not hold"
                    )


def read_test_scores_checked(
    run_dir: Path, scenario: str, test_id: int, pretrain_ids: pd.Index
) -> pd.DataFrame | None:
    """`read_test_scores`, with RunError (one sentence) when those rows name a pretrain_id that
    `pretrain_ids` (pretrain.parquet's) does not hold, a null one, or one twice."""
    frame = read_test_scores(run_dir, scenario, test_id)
    if frame is None:
        return None
    where = f"for test {int(test_id)} of scenario {scenario!r}"
    ids = frame["pretrain_id"]
    if ids.isna().any():
        raise RunError(f"scores.parquet has a null pretrain_id {where}")
    unknown = ~ids.isin(pretrain_ids)
    if unknown.any():
        raise RunError(
            f"scores.parquet names pretrain_id {_id_text(ids[unknown].iloc[0])} {where}, "
            "which pretrain.parquet does not hold"
        )
    repeated = ids.duplicated()
    if repeated.any():
        raise RunError(
            f"scores.parquet holds pretrain_id {_id_text(ids[repeated].iloc[0])} more than "
            f"once {where}"
        )
    return frame


def unconverged_tests(manifest: dict, test_ids: pd.Index | None = None) -> dict[str, list[int]]:
    """The manifest's "unconverged_tests", {scenario: [test_id, ...]} (runs made with
    --allow-unconverged where a solve missed its tolerance); {} when absent or empty.

    RunError when it is not such a map or, given the run's `test_ids`, names a test that
    test.parquet does not hold.
    """
    value = manifest.get("unconverged_tests") or {}
    if not isinstance(value, dict):
        raise RunError("manifest.json's unconverged_tests is not a map from scenario to test ids")
    found: dict[str, list[int]] = {}
    for scenario, ids in value.items():
        if not isinstance(ids, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in ids
        ):
            raise RunError(
                f"manifest.json's unconverged_tests for scenario {scenario!r} is not a list of "
                "test ids"
            )
        unknown = [i for i in ids if test_ids is not None and i not in test_ids]
        if unknown:
            raise RunError(
                f"manifest.json's unconverged_tests names test_id {unknown[0]} (scenario "
                f"{scenario!r}), which test.parquet does not hold"
            )
        found[str(scenario)] = ids
    return found
