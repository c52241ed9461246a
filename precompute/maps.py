"""The embedding map: UMAP of the shared representation of the pretraining examples.

The map is fitted on the pretrained model's representation of the pretraining examples: on all
of them up to `FIT_MAX`, else on a sample of `FIT_MAX` (stratified by label where labels exist).
Pretraining examples outside the sample are placed by interpolation: the mean of the map
positions of their `NEIGHBOURS` nearest fitted examples in the representation space, weighted by
UMAP's membership strengths (as umap-learn's transform starts). The test examples are placed by
UMAP's transform itself (that start, then a few epochs of its optimisation). One neighbour
search (`Neighbours`) serves UMAP's graph, its transform (as its search index) and the
placement: exact on a GPU or for a small sample, else pynndescent (umap-learn's own). On a GPU
with cuML installed, cuML's UMAP fits the map. How the map was made, and how long each part
took, goes into the manifest."""

from __future__ import annotations

import os
import time

import numpy as np
import torch
from torch.utils.data import Dataset

from precompute.objective import batches
from precompute.task import MultiStageTask, call

FIT_MAX = 50_000  # examples UMAP is fitted on; the rest are interpolated
NEIGHBOURS = 5
PLACED = f"mean of the {NEIGHBOURS} nearest fitted examples, weighted as UMAP weighs neighbours"


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


EXACT_MAX = 8192  # fitted examples up to which neighbours are found exactly on a CPU


class Neighbours:
    """The k nearest fitted examples of any point, found one way for the whole map.

    Exactly (`nearest`: all distances, in blocks) on a GPU or when few examples are fitted;
    else with pynndescent, umap-learn's own approximate search, seeded (the same map each run).
    """

    def __init__(self, fitted: np.ndarray, k: int, device):
        self.fitted, self.k, self.device = fitted, k, device
        self.exact = torch.device(device).type == "cuda" or len(fitted) <= EXACT_MAX
        self.index, self.prepared = None, False
        if not self.exact:
            from pynndescent import NNDescent

            self.index = NNDescent(fitted, n_neighbors=k, random_state=0, n_jobs=1)

    def graph(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, distances) [n, k] of each fitted example's k nearest (itself first)."""
        if self.exact:
            return nearest(self.fitted, self.fitted, self.k, self.device)
        return self.index.neighbor_graph

    _angular_trees = False  # read by umap-learn's transform, which takes this as its index

    def query(self, points: np.ndarray, k: int, epsilon=None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, distances) [n, k] of each point's k nearest fitted examples; the signature of
        umap-learn's search index (`epsilon`, its search breadth, unused)."""
        points = np.asarray(points, dtype=np.float32)
        if self.exact:
            return nearest(self.fitted, points, k, self.device)
        if not self.prepared:  # the search structure, built on first query
            self.index.prepare()
            self.prepared = True
        return self.index.query(points, k=k)


def interpolate(
    neighbours: Neighbours, fitted_xy: np.ndarray, points: np.ndarray, k: int = NEIGHBOURS
) -> np.ndarray:
    """Map positions of `points`: the mean of the positions of their k nearest fitted examples
    weighted by UMAP's membership strengths, w_j = exp(-(d_j - d_1) / sigma) with sigma such
    that sum_j w_j = log2(k) (umap-learn's smooth_knn_dist): the nearest weighs most, and the
    others by how much farther they are. An exact match takes that example's position."""
    from umap.umap_ import smooth_knn_dist

    k = min(k, len(fitted_xy))
    xy = np.empty((len(points), 2), dtype=np.float32)
    for start in range(0, len(points), 100_000):
        ids, dist = neighbours.query(points[start : start + 100_000], k)
        dist = np.ascontiguousarray(dist, dtype=np.float32)
        sigmas, rhos = smooth_knn_dist(dist, float(k), local_connectivity=1.0)
        weights = np.exp(-np.maximum(dist - rhos[:, None], 0.0) / sigmas[:, None])
        weights[dist[:, 0] == 0] = np.eye(1, k)[0]  # on a fitted example: its own position
        weights /= weights.sum(1, keepdims=True)
        xy[start : start + len(ids)] = (fitted_xy[ids] * weights[..., None]).sum(1)
    return xy


def nearest(
    fitted: np.ndarray, points: np.ndarray, k: int, device, block: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(ids [n, k], Euclidean distances [n, k]) of the k nearest `fitted` rows of each point,
    exactly: |x - y|^2 = |x|^2 - 2 x.y + |y|^2 for a block of points against all fitted rows,
    then the k smallest."""
    f = torch.as_tensor(fitted, dtype=torch.float32, device=device)
    block = block or max(1, 2**26 // max(1, len(fitted)))  # a [block, fitted] matrix <= 256 MB
    f_sq = (f * f).sum(1)
    ids, dist = [], []
    for start in range(0, len(points), block):
        x = torch.as_tensor(points[start : start + block], dtype=torch.float32, device=device)
        sq = ((x * x).sum(1, keepdim=True) - 2 * x @ f.T + f_sq).clamp_min_(0.0)
        top = torch.topk(sq, k, dim=1, largest=False)
        ids.append(top.indices.cpu())
        dist.append(top.values.sqrt().cpu())
    return torch.cat(ids).numpy(), torch.cat(dist).numpy()


def cuml_umap(device):
    """cuML's UMAP class on a GPU where cuML is installed (an optional extra), else None."""
    if torch.device(device).type != "cuda":
        return None
    try:
        from cuml.manifold import UMAP
    except ImportError:
        return None
    return UMAP


def layout_threads(layout: str) -> int:
    """Threads of umap-learn's layout optimisation for a --map-layout setting: `seeded` one
    (random_state fixed: the same map every run), `parallel` every core (numba's threads race,
    so the map differs a little between runs), `auto` seeded on machines of up to 4 cores,
    where parallel gains under 2x, else parallel (34 s against 5 s for 50,000 examples on 16)."""
    if layout == "seeded" or (layout == "auto" and (os.cpu_count() or 1) <= 4):
        return 1
    return numba_threads()


def numba_threads() -> int:
    import numba

    return int(numba.get_num_threads())


def fit_umap(neighbours: Neighbours, device, threads: int = 1) -> tuple[np.ndarray, str, object]:
    """(map positions [n, 2] of the fitted examples, which library fitted them, the fitted
    reducer for placing new points by its transform): cuML's UMAP on a GPU where cuML is
    installed, else umap-learn's on the neighbour graph given, seeded when `threads` is 1, else
    on that many threads."""
    cuml = cuml_umap(device)
    if cuml is not None:
        reducer = cuml(n_neighbors=neighbours.k, min_dist=0.1, random_state=0)
        return np.asarray(reducer.fit_transform(neighbours.fitted)), "cuml", reducer
    import umap  # numba compiles on first use: imported only when a map is made

    ids, dist = neighbours.graph()
    seed = dict(random_state=0) if threads == 1 else {}
    reducer = umap.UMAP(n_neighbors=neighbours.k, min_dist=0.1, n_jobs=threads,
                        precomputed_knn=(ids, dist, neighbours), **seed)  # fmt: skip
    return reducer.fit_transform(neighbours.fitted), "umap-learn", reducer


def embedding_map(
    task: MultiStageTask,
    model,
    pretrain: Dataset,
    test: Dataset,
    batch_size: int,
    device,
    labels: np.ndarray | None = None,
    fit_max: int = FIT_MAX,
    layout: str = "auto",
) -> tuple[np.ndarray, np.ndarray, dict]:
    """(pretrain xy [m, 2], test xy [Q, 2], how the map was made) on one UMAP map; `layout`
    (auto | seeded | parallel) as in `layout_threads`."""
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
    start = time.perf_counter()
    neighbours = Neighbours(pre[sample], min(15, len(sample) - 1), device)
    pre_xy = np.empty((m, 2), dtype=np.float32)
    threads = layout_threads(layout)
    pre_xy[sample], library, reducer = fit_umap(neighbours, device, threads)
    if library == "cuml":
        made = "cuml"
    elif threads == 1:
        made = "seeded (one thread; the same map every run)"
    else:
        made = f"parallel ({threads} threads; not reproducible)"
    info = {"method": "umap", "library": library, "fitted_on": int(len(sample)),
            "neighbours": "exact" if neighbours.exact else "pynndescent", "layout": made,
            "fit_s": round(time.perf_counter() - start, 2)}  # fmt: skip
    start = time.perf_counter()
    if len(sample) < m:
        rest = np.setdiff1d(np.arange(m), sample, assume_unique=True)
        pre_xy[rest] = interpolate(neighbours, pre_xy[sample], pre[rest])
        info["sample"] = "stratified by label" if labels is not None else "uniform"
        info["others"] = PLACED
    test_xy = np.asarray(reducer.transform(test_rep)) if len(test_rep) else np.zeros((0, 2))
    info["tests"] = "UMAP's transform"
    info["placed_s"] = round(time.perf_counter() - start, 2)
    return pre_xy, test_xy.astype(np.float32), info
