"""The run's tables, built from the task's descriptions and the computed results
(schemas in precompute.rundir)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from precompute.objective import batches
from precompute.rundir import TABLE_SCHEMAS, RunWriter, to_table
from precompute.task import MultiStageTask, TaskError, call

SCORES_ROWS_PER_GROUP = 2**17  # row groups of about this many rows: one test reads one group


def png_bytes(image) -> bytes | None:
    """An HxW or HxWxC uint8 array as PNG bytes (None stays None)."""
    if image is None:
        return None
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def described(task: MultiStageTask, split: str, indices: range, id_column: str) -> pd.DataFrame:
    """The rows of pretrain.parquet or test.parquet (without the map columns) for `indices`,
    from the task's `describe_many` (a list of describe() dicts, or a dict of columns) when it
    has one, else describe() per example."""
    many = getattr(task, "describe_many", None)
    if many is not None:
        infos = call(task, "describe_many", split, indices)
    else:
        infos = [call(task, "describe", split, i) for i in indices]
    if isinstance(infos, dict | pd.DataFrame):  # columns
        columns = {k: list(infos[k]) if k in infos else [None] * len(indices) for k in FIELDS}
    else:
        infos = list(infos)
        for i, info in zip(indices, infos, strict=False):
            if not isinstance(info, dict):
                raise TaskError(f"task {task.name!r}: describe({split!r}, {i}) must return a dict")
        columns = {k: [info.get(k) for info in infos] for k in FIELDS}
    if any(len(v) != len(indices) for v in columns.values()):
        raise TaskError(
            f"task {task.name!r}: describe_many({split!r}, ...) gave a number of rows other than "
            f"the {len(indices)} asked for"
        )
    frame = pd.DataFrame(
        {
            id_column: np.asarray(indices, dtype=np.int64),
            "label": pd.array(
                [None if v is None or v is pd.NA else int(v) for v in columns["label"]],
                dtype="Int64",
            ),
            "label_name": [None if v is None else str(v) for v in columns["label_name"]],
            "text": [None if v is None else str(v) for v in columns["text"]],
            "image_png": [png_bytes(v) for v in columns["image"]],
        }
    )
    return frame


FIELDS = ("label", "label_name", "text", "image")
DESCRIBE_CHUNK = 20_000  # rows described and written at a time: memory stays bounded


def describe_to(task, split: str, count: int, id_column: str, path: Path) -> None:
    """Describe every example of `split` into a parquet file at `path`, in row groups of
    DESCRIBE_CHUNK rows (never all rows in memory at once)."""
    schema = described_schema(id_column)
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, count, DESCRIBE_CHUNK):
            frame = described(
                task, split, range(start, min(start + DESCRIBE_CHUNK, count)), id_column
            )
            writer.write_table(pa.Table.from_pandas(frame, preserve_index=False).cast(schema))


def described_schema(id_column: str) -> pa.Schema:
    name = "pretrain" if id_column == "pretrain_id" else "test"
    return pa.schema([f for f in TABLE_SCHEMAS[name] if not f.name.startswith("umap_")])


def with_map(writer: RunWriter, name: str, source: Path, xy: np.ndarray) -> None:
    """Write `name`.parquet from the described rows at `source` plus the map columns, one row
    group at a time."""
    schema = TABLE_SCHEMAS[name]
    with pq.ParquetWriter(writer.path(f"{name}.parquet"), schema) as out:
        start = 0
        for batch in pq.ParquetFile(source).iter_batches(batch_size=DESCRIBE_CHUNK):
            stop = start + batch.num_rows
            table = pa.Table.from_batches([batch])
            table = table.append_column("umap_x", pa.array(xy[start:stop, 0], pa.float32()))
            table = table.append_column("umap_y", pa.array(xy[start:stop, 1], pa.float32()))
            out.write_table(table.cast(schema))
            start = stop


def predictions_table(
    task, scenario, model, test_data, batch_size, device, class_names
) -> pd.DataFrame:
    logits, losses = [], []
    with torch.no_grad():
        for batch in batches(test_data, batch_size, device):
            logits.append(call(task, "finetune_logits", model, batch).float().cpu())
            losses.append(call(task, "finetune_loss", model, batch).float().cpu())
    logits, losses = torch.cat(logits), torch.cat(losses)
    probs = logits.softmax(1)
    confidence, pred = probs.max(1)
    frame = pd.DataFrame(
        {
            "scenario": scenario,
            "test_id": np.arange(len(pred)),
            "pred": pred.numpy().astype(np.int64),
            "pred_name": [class_names.get(int(p), str(int(p))) for p in pred],
            "confidence": confidence.numpy(),
            "loss": losses.numpy(),
        }
    )
    return frame


def top_table(scenarios: list[str], q: int, top) -> pd.DataFrame:
    """Rows of the top-k per (scenario, test): helpful (score > 0) and harmful (score < 0)."""
    frames = []
    for kind, sign in (("helpful", 1.0), ("harmful", -1.0)):
        scores = getattr(top, f"{kind}_scores").float().cpu().numpy()
        ids = getattr(top, f"{kind}_ids").cpu().numpy()
        rows, ranks = np.nonzero(scores * sign > 0)
        frames.append(
            pd.DataFrame(
                {
                    "scenario": [scenarios[r // q] for r in rows],
                    "test_id": rows % q,
                    "kind": kind,
                    "rank": ranks + 1,
                    "pretrain_id": ids[rows, ranks],
                    "score": scores[rows, ranks],
                }
            )
        )
    return pd.concat(frames).sort_values(["scenario", "test_id", "kind", "rank"])


def write_scores(writer: RunWriter, store: np.ndarray, scenarios: list[str], q: int, m: int):
    """scores.parquet sorted by (scenario, test_id), a few tests per row group."""
    per_group = max(1, SCORES_ROWS_PER_GROUP // m)
    pretrain_ids = np.arange(m, dtype=np.int64)
    with writer.scores_writer() as parquet:
        for number, scenario in enumerate(scenarios):
            for first in range(0, q, per_group):
                last = min(first + per_group, q)
                block = np.asarray(store[number * q + first : number * q + last])
                frame = pd.DataFrame(
                    {
                        "scenario": scenario,
                        "test_id": np.repeat(np.arange(first, last, dtype=np.int64), m),
                        "pretrain_id": np.tile(pretrain_ids, last - first),
                        "score": block.reshape(-1),
                    }
                )
                parquet.write_table(to_table("scores", frame))
