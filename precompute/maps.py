"""The embedding map: UMAP of the shared representation of the pretraining examples.

The map is fitted on the pretrained model's representation of the pretraining examples; the test
examples are placed on the same map by UMAP's transform.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from precompute.objective import batches
from precompute.task import MultiStageTask, call


def represent_all(task: MultiStageTask, model, dataset: Dataset, batch_size: int, device):
    with torch.no_grad():
        rows = [
            call(task, "represent", model, b).float().cpu()
            for b in batches(dataset, batch_size, device)
        ]
    return torch.cat(rows).numpy()


def embedding_map(
    task: MultiStageTask, model, pretrain: Dataset, test: Dataset, batch_size: int, device
) -> tuple[np.ndarray, np.ndarray]:
    """(pretrain xy [m, 2], test xy [Q, 2]) on one UMAP map fitted to the pretraining set."""
    import umap  # numba compiles on first use: imported only when a map is made

    pre = represent_all(task, model, pretrain, batch_size, device)
    test_rep = represent_all(task, model, test, batch_size, device)
    if len(pre) < 5:  # too few points for a neighbour graph: the first two coordinates
        padded = np.zeros((len(pre), 2), dtype=np.float32)
        padded[:, : min(2, pre.shape[1])] = pre[:, :2]
        test_padded = np.zeros((len(test_rep), 2), dtype=np.float32)
        test_padded[:, : min(2, pre.shape[1])] = test_rep[:, :2]
        return padded, test_padded
    reducer = umap.UMAP(n_neighbors=min(15, len(pre) - 1), min_dist=0.1, random_state=0, n_jobs=1)
    pre_xy = reducer.fit_transform(pre)
    test_xy = reducer.transform(test_rep)
    return pre_xy.astype(np.float32), test_xy.astype(np.float32)
