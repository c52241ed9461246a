"""Batched loading (precompute.objective.batches) equals the DataLoader's item-by-item loading."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset, TensorDataset

from precompute.objective import batches


class Dicts(Dataset):
    def __init__(self, n=23):
        self.x = torch.arange(n * 3, dtype=torch.float64).reshape(n, 3)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": int(i) % 4, "name": f"item {i}"}


class Batched(Dicts):
    """Implements the DataLoader's batched-fetch protocol."""

    calls = 0

    def __getitems__(self, indices):
        Batched.calls += 1
        return [self[i] for i in indices]


class Doubled(TensorDataset):
    """A TensorDataset subclass that transforms its items: it must not be sliced directly."""

    def __getitem__(self, i):
        x, y = super().__getitem__(i)
        return x * 2, y


def tensors(n=23):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


DATASETS = {
    "tensor": lambda: TensorDataset(*tensors()),
    "subset": lambda: Subset(TensorDataset(*tensors()), [5, 1, 7, 7, 0, 22, 3, 9, 11, 2]),
    "subset_of_subset": lambda: Subset(Subset(TensorDataset(*tensors()), range(3, 20)), [4, 0, 9]),
    "dicts": Dicts,
    "getitems": Batched,
    "concat": lambda: ConcatDataset([TensorDataset(*tensors(5)), TensorDataset(*tensors(8))]),
    "subclass": lambda: Doubled(*tensors()),
}


def same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@pytest.mark.parametrize("name", sorted(DATASETS))
@pytest.mark.parametrize("batch_size", [1, 4, 10, 64])
def test_batched_loading_equals_item_by_item_loading(name, batch_size):
    dataset = DATASETS[name]()
    expected = list(DataLoader(dataset, batch_size=batch_size, shuffle=False))
    got = list(batches(dataset, batch_size, torch.device("cpu")))
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert same(a, b), (a, b)


def test_tensor_datasets_are_sliced_not_read_item_by_item(monkeypatch):
    dataset = TensorDataset(*tensors(1000))
    monkeypatch.setattr(TensorDataset, "__getitem__", lambda *a: pytest.fail("read item by item"))
    assert sum(len(b[0]) for b in batches(dataset, 128, torch.device("cpu"))) == 1000


def test_getitems_is_called_once_per_batch():
    Batched.calls = 0
    list(batches(Batched(23), 10, torch.device("cpu")))
    assert Batched.calls == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batches_are_the_cpu_batches():
    dataset = TensorDataset(*tensors(300))
    for a, b in zip(
        batches(dataset, 64, torch.device("cuda")),
        batches(dataset, 64, torch.device("cpu")),
        strict=True,
    ):
        assert same([t.cpu() for t in a], b)
