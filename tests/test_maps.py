"""Maps at scale (precompute.maps): UMAP fitted on a stratified sample, the other examples
placed near their neighbours."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from precompute import maps
from precompute.maps import Neighbours, embedding_map, fit_sample, fit_umap, nearest


def test_fit_sample_keeps_every_label_in_proportion():
    rng = np.random.default_rng(0)
    labels = rng.choice(4, size=10_000, p=[0.7, 0.2, 0.0995, 0.0005]).astype(np.float64)
    labels[:300] = np.nan  # unlabelled examples are a group of their own
    sample = fit_sample(len(labels), labels, 1000)
    assert len(np.unique(sample)) == len(sample) and 990 <= len(sample) <= 1010
    assert np.all(np.diff(sample) > 0)
    for value in (0, 1, 2):
        share = np.mean(labels[sample] == value)
        assert abs(share - np.mean(labels == value)) < 0.01, value
    assert np.sum(labels[sample] == 3) >= 1  # a rare label is still on the map
    assert np.isnan(labels[sample]).sum() == 30
    assert np.array_equal(sample, fit_sample(len(labels), labels, 1000))  # seeded
    assert np.array_equal(fit_sample(500, labels[:500], 1000), np.arange(500))


class Identity:
    """A task whose representation is the input itself."""

    def represent(self, model, batch):
        return batch[0]


@pytest.mark.slow
@pytest.mark.parametrize(
    "exact_max, layout", [(maps.EXACT_MAX, "seeded"), (100, "parallel")]
)  # exact neighbours and one thread, then pynndescent and numba's threads
def test_examples_outside_the_sample_are_placed_near_their_neighbours(
    monkeypatch, exact_max, layout
):
    monkeypatch.setattr(maps, "EXACT_MAX", exact_max)
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(4, 8)) * 6
    labels = rng.integers(0, 4, size=3000)
    points = centres[labels] + rng.normal(size=(3000, 8))
    data = TensorDataset(torch.tensor(points, dtype=torch.float32), torch.tensor(labels))
    test = TensorDataset(torch.tensor(centres, dtype=torch.float32), torch.arange(4))
    xy, test_xy, info = embedding_map(
        Identity(), None, data, test, 512, torch.device("cpu"), labels.astype(float), fit_max=600,
        layout=layout,
    )  # fmt: skip
    assert info["fitted_on"] <= 610 and "nearest fitted" in info["others"]
    assert info["neighbours"] == ("exact" if exact_max > 610 else "pynndescent")
    assert info["layout"].startswith(layout) and info["tests"] == "UMAP's transform"
    sample = fit_sample(3000, labels.astype(float), 600)
    placed = np.setdiff1d(np.arange(3000), sample)
    centroids = np.stack([xy[sample][labels[sample] == c].mean(0) for c in range(4)])
    nearest = np.argmin(((xy[placed, None, :] - centroids[None]) ** 2).sum(-1), 1)
    assert np.mean(nearest == labels[placed]) > 0.99  # each lands among its own cluster
    assert np.array_equal(np.argmin(((test_xy[:, None] - centroids[None]) ** 2).sum(-1), 1),
                          np.arange(4))  # fmt: skip


def test_exact_neighbours_in_blocks_equal_the_obvious_ones():
    rng = np.random.default_rng(2)
    fitted = rng.normal(size=(700, 6)).astype(np.float32)
    points = rng.normal(size=(300, 6)).astype(np.float32)
    points[:3] = fitted[[5, 50, 500]]  # exact matches: distance 0, themselves first
    ids, dist = nearest(fitted, points, 5, "cpu", block=64)
    obvious = np.sqrt(((points[:, None] - fitted[None]) ** 2).sum(-1))
    order = np.argsort(obvious, 1)[:, :5]
    assert np.array_equal(ids, order)
    np.testing.assert_allclose(dist, np.take_along_axis(obvious, order, 1), atol=1e-3)
    assert ids[:3, 0].tolist() == [5, 50, 500]


def test_cuml_fits_the_map_on_a_gpu_only_where_it_is_installed(monkeypatch):
    import sys
    import types

    class FakeUMAP:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

        def fit_transform(self, x):
            return x[:, :2] * self.kwargs["n_neighbors"]

    module = types.ModuleType("cuml.manifold")
    module.UMAP = FakeUMAP
    monkeypatch.setitem(sys.modules, "cuml", types.ModuleType("cuml"))
    monkeypatch.setitem(sys.modules, "cuml.manifold", module)
    assert maps.cuml_umap("cuda") is FakeUMAP and maps.cuml_umap("cpu") is None
    fitted = np.arange(12.0).reshape(6, 2)
    xy, library, reducer = fit_umap(Neighbours(fitted, 3, "cuda"), "cuda")
    assert library == "cuml" and np.array_equal(xy, fitted * 3) and isinstance(reducer, FakeUMAP)
    monkeypatch.setitem(sys.modules, "cuml.manifold", None)  # not installed: umap-learn
    assert maps.cuml_umap("cuda") is None


def test_layout_is_seeded_on_few_cores_and_parallel_on_many(monkeypatch):
    monkeypatch.setattr(maps, "numba_threads", lambda: 16)
    assert maps.layout_threads("seeded") == 1 and maps.layout_threads("parallel") == 16
    monkeypatch.setattr(maps.os, "cpu_count", lambda: 2)
    assert maps.layout_threads("auto") == 1
    monkeypatch.setattr(maps.os, "cpu_count", lambda: 16)
    assert maps.layout_threads("auto") == 16
