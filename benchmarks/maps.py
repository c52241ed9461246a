"""Benchmark: the maps stage alone (precompute.maps.embedding_map) at scale.

m synthetic representations (16 dimensions, 10 Gaussian clusters, labelled) and 50 tests.
Prints the time to import umap-learn (numba compiles part of it then), the fit on the sample,
the placement of the others, the whole stage, and the thread settings of torch and numba, so
that runs under different thread settings can be compared side by side:

    python benchmarks/maps.py --m 1000000
    python benchmarks/maps.py --m 1000000 --device cuda
    NUMBA_NUM_THREADS=1 OMP_NUM_THREADS=1 python benchmarks/maps.py --m 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
from torch.utils.data import TensorDataset

from precompute.maps import embedding_map

DIM, CLUSTERS = 16, 10


class Identity:
    """A task whose representation is the input itself."""

    def represent(self, model, batch):
        return batch[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, default=1_000_000)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(CLUSTERS, DIM)) * 4
    labels = rng.integers(0, CLUSTERS, size=args.m)
    points = (centres[labels] + rng.normal(size=(args.m, DIM))).astype(np.float32)
    data = TensorDataset(torch.from_numpy(points), torch.from_numpy(labels))
    test = TensorDataset(torch.from_numpy(points[:50].copy()), torch.from_numpy(labels[:50]))
    start = time.perf_counter()
    import numba
    import umap  # noqa: F401

    imported = time.perf_counter() - start
    print(
        f"cores {os.cpu_count()}, torch threads {torch.get_num_threads()}, numba threads "
        f"{numba.get_num_threads()} ({numba.config.THREADING_LAYER} layer), "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
        f"NUMBA_NUM_THREADS={os.environ.get('NUMBA_NUM_THREADS')}"
    )
    start = time.perf_counter()
    _, _, info = embedding_map(
        Identity(), None, data, test, 65536, torch.device(args.device), labels.astype(float)
    )
    stage = time.perf_counter() - start
    print(f"m={args.m:,} {args.device}: import umap {imported:.2f} s, maps stage {stage:.2f} s")
    print(json.dumps(info))


if __name__ == "__main__":
    main()
