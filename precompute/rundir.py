"""The run directory: the contract between precompute and explorer (DESIGN.md section 5).

A run is written into a temporary sibling directory and renamed into place when whole; the
manifest is written last with "complete": true, so a crash never leaves a run that looks whole.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

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

    Use as a context manager; if the body raises, the temporary directory is removed and
    nothing at `out` changes.
    """

    def __init__(self, out: Path, overwrite: bool = False):
        self.out = Path(out)
        if self.out.exists():
            if is_complete(self.out) and not overwrite:
                raise RunError(f"{self.out} already holds a complete run; pass --overwrite")
            if not self.out.is_dir():
                raise RunError(f"{self.out} exists and is not a directory")
        self.tmp = self.out.parent / f".{self.out.name}.tmp-{uuid.uuid4().hex[:8]}"
        self._finished = False

    def __enter__(self) -> RunWriter:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._finished:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def path(self, name: str) -> Path:
        return self.tmp / name

    def write_table(self, name: str, frame: pd.DataFrame, **kwargs) -> None:
        pq.write_table(to_table(name, frame), self.tmp / f"{name}.parquet", **kwargs)

    def scores_writer(self) -> pq.ParquetWriter:
        """A ParquetWriter for scores.parquet; write row groups sorted by (scenario, test_id)."""
        return pq.ParquetWriter(self.tmp / "scores.parquet", TABLE_SCHEMAS["scores"])

    def finish(self, manifest: dict) -> Path:
        manifest = {"schema_version": SCHEMA_VERSION, **manifest, "complete": True}
        (self.tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
        if self.out.exists():  # incomplete leftovers, or --overwrite
            trash = self.out.parent / f".{self.out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(self.out, trash)
            os.replace(self.tmp, self.out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(self.tmp, self.out)
        self._finished = True
        return self.out


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
