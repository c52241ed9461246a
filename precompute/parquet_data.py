"""Pretraining examples stored as rows of parquet files.

A task may return a `ParquetRows` from `pretrain_data()`: the examples are the rows of its
parquet files, in order, and `to_inputs(table)` turns a pyarrow Table of consecutive rows into
one collated batch of model inputs (a tuple, list or dict of tensors with the rows as the first
dimension). Batches are read by row ranges (one read of the row groups they span, the last one
kept), never example by example; with `--engine ray` each worker reads its own shards from the
files (which must then be where the workers can read them: a shared or object-store path that
pyarrow opens), so the driver ships no data.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils._pytree import tree_map
from torch.utils.data import Dataset


class ParquetRows(Dataset):
    """Rows of `paths` (in order) as a map-style dataset; see the module docstring."""

    read_on_workers = True  # the Ray engine lets workers read their shards themselves

    def __init__(self, paths: Sequence[str], to_inputs: Callable[[pa.Table], Any]):
        self.paths = [str(p) for p in paths]
        self.to_inputs = to_inputs
        self._files: list[pq.ParquetFile] | None = None
        counts = [pq.ParquetFile(p).metadata.num_rows for p in self.paths]
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64).tolist()
        self._cached: tuple[int, int, pa.Table] | None = None  # (file, row group, its rows)

    def __getstate__(self):  # open files and the cached group stay behind
        return {**self.__dict__, "_files": None, "_cached": None}

    def __len__(self) -> int:
        return self.starts[-1]

    def files(self) -> list[pq.ParquetFile]:
        if self._files is None:
            self._files = [pq.ParquetFile(p) for p in self.paths]
        return self._files

    def rows(self, start: int, stop: int) -> pa.Table:
        """Rows start..stop-1 (global numbering) as one Table."""
        parts = []
        position = start
        while position < stop:
            f = bisect.bisect_right(self.starts, position) - 1
            local = position - self.starts[f]
            meta = self.files()[f].metadata
            group, first = 0, 0
            while first + meta.row_group(group).num_rows <= local:
                first += meta.row_group(group).num_rows
                group += 1
            table = self._group(f, group)
            take = min(stop - position, first + table.num_rows - local)
            parts.append(table.slice(local - first, take))
            position += take
        return pa.concat_tables(parts) if len(parts) != 1 else parts[0]

    def _group(self, f: int, group: int) -> pa.Table:
        if self._cached is None or self._cached[:2] != (f, group):
            self._cached = (f, group, self.files()[f].read_row_group(group))
        return self._cached[2]

    def batch_of(self, indices: range | list[int]) -> Any:
        """The collated batch of the examples at `indices` (msif's batched-fetch protocol)."""
        if isinstance(indices, range) and indices.step == 1:
            return self.to_inputs(self.rows(indices.start, indices.stop))
        tables = [self.rows(int(i), int(i) + 1) for i in indices]
        return self.to_inputs(pa.concat_tables(tables))

    def __getitem__(self, index: int) -> Any:
        batch = self.to_inputs(self.rows(int(index), int(index) + 1))
        return tree_map(lambda x: x[0] if isinstance(x, torch.Tensor) else x, batch)
