"""Pretraining data as parquet rows (precompute.parquet_data.ParquetRows)."""

from __future__ import annotations

import torch
from tiny_task import ParquetTinyTask, TinyTask
from torch.utils.data import DataLoader

from precompute.objective import batches
from precompute.pipeline import PrecomputeConfig, precompute
from precompute.rundir import read_table


def test_parquet_rows_batches_equal_the_tensor_batches():
    task = ParquetTinyTask()
    rows, tensors = task.pretrain_data(), TinyTask().pretrain_data()
    assert len(rows) == len(tensors) == 200
    for size in (1, 7, 64, 500):
        for a, b in zip(batches(rows, size, "cpu"), batches(tensors, size, "cpu"), strict=True):
            assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    picked = rows.batch_of([199, 3, 70, 70])  # across files and row groups, in any order
    assert torch.equal(picked[1], tensors.tensors[1][[199, 3, 70, 70]])
    # the DataLoader's item-by-item path gives the same
    first = next(iter(DataLoader(rows, batch_size=5)))
    assert torch.equal(first[0], tensors.tensors[0][:5])


def test_a_parquet_task_gives_the_run_of_the_tensor_task(tmp_path):
    config = dict(solver="exact", full_scores="on", maps=False, device="cpu", batch_size=16)
    a = precompute(TinyTask(), tmp_path / "a", PrecomputeConfig(**config), log=lambda m: None)
    b = precompute(ParquetTinyTask(), tmp_path / "b", PrecomputeConfig(**config),
                   log=lambda m: None)  # fmt: skip
    assert read_table(a, "scores").equals(read_table(b, "scores"))
