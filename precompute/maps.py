"""The embedding map: UMAP of the shared representation of the pretraining examples.

The map is fitted on the pretrained model's representation of the pretraining examples: on all
of them up to `FIT_MAX`, else on a sample of `FIT_MAX` (stratified by label where labels exist).
Pretraining examples outside the sample are placed by interpolation: the inverse-distance
weighted mean of the map positions of their `NEIGHBOURS` nearest sampled examples in the
representation space (found with pynndescent, umap-learn's own neighbour search). The test
examples are placed on the same map by UMAP's transform. How the map was made goes into the
manifest.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from precompute.objective import batches
from precompute.task import MultiStageTask, call

FIT_MAX = 50_000  # examples UMAP is fitted on; the rest are interpolated
NEIGHBOURS = 5


def represent_all(task: MultiStageTask, model, dataset: Dataset, batch_size: int, device):
    """The shared representation of every example, float32 [n, d]."""
    with torch.no_grad():
        rows = [
            call(task, "represent", model, b).float().cpu()
            for b in batches(dataset, batch_size, device)
        ]
    return torch.cat(rows).numpy()


def fit_sample(m: int, labels: np.ndarray | None, size: int, seed: int = 0) -> np.ndarray:
    """Sorted ids of `size` of m examples (all when m <= size), each label drawn in proportion
    to its share (at least one per label), the unlabelled as one more group."""
    if m <= size:
        return np.arange(m)
    rng = np.random.default_rng(seed)
    if labels is None:
        return np.sort(rng.choice(m, size=size, replace=False))
    groups = np.where(np.isnan(labels), -1, labels) if labels.dtype.kind == "f" else labels
    chosen = []
    values, counts = np.unique(groups, return_counts=True)
    quotas = np.maximum(1, np.floor(counts * size / m)).astype(int)
    for value, quota in zip(values, quotas, strict=True):
        members = np.flatnonzero(groups == value)
        chosen.append(rng.choice(members, size=min(quota, len(members)), replace=False))
    return np.sort(np.concatenate(chosen))  # a few over `size` when small labels get their one


def interpolate(fitted: np.ndarray, fitted_xy: np.ndarray, points: np.ndarray, k: int = NEIGHBOURS):
    """Map positions of `points`: the inverse-distance weighted mean of the positions of their
    k nearest `fitted` examples (an exact match takes that example's position)."""
    from pynndescent import NNDescent

    k = min(k, len(fitted))
    index = NNDescent(fitted, n_neighbors=max(k, 15), random_state=0, n_jobs=1)
    index.prepare()
    xy = np.empty((len(points), 2), dtype=np.float32)
    for start in range(0, len(points), 100_000):
        ids, dist = index.query(points[start : start + 100_000], k=k)
        weights = 1.0 / np.maximum(dist, 1e-12)
        weights /= weights.sum(1, keepdims=True)
        xy[start : start + len(ids)] = (fitted_xy[ids] * weights[..., None]).sum(1)
    return xy


def embedding_map(
    task: MultiStageTask,
    model,
    pretrain: Dataset,
    test: Dataset,
    batch_size: int,
    device,
    labels: np.ndarray | None = None,
    fit_max: int = FIT_MAX,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """(pretrain xy [m, 2], test xy [Q, 2], how the map was made) on one UMAP map."""
    import umap  # numba compiles on first use: imported only when a map is made

    pre = represent_all(task, model, pretrain, batch_size, device)
    test_rep = represent_all(task, model, test, batch_size, device)
    m = len(pre)
    if m < 5:  # too few points for a neighbour graph: the first two coordinates
        padded = np.zeros((m, 2), dtype=np.float32)
        padded[:, : min(2, pre.shape[1])] = pre[:, :2]
        test_padded = np.zeros((len(test_rep), 2), dtype=np.float32)
        test_padded[:, : min(2, pre.shape[1])] = test_rep[:, :2]
        return padded, test_padded, {"method": "first two coordinates (fewer than 5 examples)"}
    sample = fit_sample(m, labels, fit_max)
    reducer = umap.UMAP(
        n_neighbors=min(15, len(sample) - 1), min_dist=0.1, random_state=0, n_jobs=1
    )
    pre_xy = np.empty((m, 2), dtype=np.float32)
    pre_xy[sample] = reducer.fit_transform(pre[sample])
    info = {"method": "umap", "fitted_on": int(len(sample)), "tests": "umap transform"}
    if len(sample) < m:
        rest = np.setdiff1d(np.arange(m), sample, assume_unique=True)
        pre_xy[rest] = interpolate(pre[sample], pre_xy[sample], pre[rest])
        info["sample"] = "stratified by label" if labels is not None else "uniform"
        info["others"] = f"inverse-distance mean of the {NEIGHBOURS} nearest sampled examples"
    test_xy = reducer.transform(test_rep) if len(test_rep) else np.zeros((0, 2))
    return pre_xy, test_xy.astype(np.float32), info
