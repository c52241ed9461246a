"""Maps at scale (precompute.maps): UMAP fitted on a stratified sample, the other examples
placed near their neighbours."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from precompute.maps import embedding_map, fit_sample


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
def test_examples_outside_the_sample_are_placed_near_their_neighbours():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(4, 8)) * 6
    labels = rng.integers(0, 4, size=3000)
    points = centres[labels] + rng.normal(size=(3000, 8))
    data = TensorDataset(torch.tensor(points, dtype=torch.float32), torch.tensor(labels))
    test = TensorDataset(torch.tensor(centres, dtype=torch.float32), torch.arange(4))
    xy, test_xy, info = embedding_map(
        Identity(), None, data, test, 512, torch.device("cpu"), labels.astype(float), fit_max=600
    )
    assert info["fitted_on"] <= 610 and "nearest sampled" in info["others"]
    sample = fit_sample(3000, labels.astype(float), 600)
    placed = np.setdiff1d(np.arange(3000), sample)
    centroids = np.stack([xy[sample][labels[sample] == c].mean(0) for c in range(4)])
    nearest = np.argmin(((xy[placed, None, :] - centroids[None]) ** 2).sum(-1), 1)
    assert np.mean(nearest == labels[placed]) > 0.99  # each lands among its own cluster
    assert np.array_equal(np.argmin(((test_xy[:, None] - centroids[None]) ** 2).sum(-1), 1),
                          np.arange(4))  # fmt: skip
