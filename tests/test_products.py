"""The shape of a curvature product (precompute.objective.Objective.product_shape): vectors per
vmapped product and examples per batch within the activation budget, and products that do not
depend on it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import precompute.objective as objective_module
from precompute.gauss_newton import STANDARD_LOSSES
from precompute.objective import LossSplit, Objective, ParamSpace


def loss_fn(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def objective(hidden: int, n: int = 60, batch_size: int = 8, curvature: str = "hessian"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, hidden), nn.Tanh(), nn.Linear(hidden, 3)).double()
    data = TensorDataset(torch.randn(n, 5, dtype=torch.float64), torch.randint(0, 3, (n,)))
    space = ParamSpace.of(model, [name for name, _ in model.named_parameters()])
    split = LossSplit(lambda m, b: m(b[0]), STANDARD_LOSSES["cross-entropy"], "test")
    reg = torch.full((space.size,), 1e-3, dtype=torch.float64)
    return Objective(model, loss_fn, data, space, reg, batch_size, curvature=curvature, split=split)


def test_large_activations_take_fewer_vectors_not_smaller_batches(monkeypatch):
    monkeypatch.setattr(objective_module, "PRODUCT_BUDGET", 2**14)
    wide = objective(hidden=200)  # 200 + 200 + 3 activations per example
    vectors, examples = wide.product_shape(30)
    assert examples >= wide.batch_size
    assert vectors * examples * wide._activations <= 2**14
    parts = -(-30 // vectors)
    assert vectors == -(-30 // parts)  # equal parts, the last not a remainder
    assert vectors < 30
    narrow = objective(hidden=4)  # 4 + 4 + 3 activations: every vector at once
    vectors, examples = narrow.product_shape(30)
    assert vectors == 30 and examples * 30 * narrow._activations <= 2**14
    assert examples > narrow.batch_size


def test_one_vector_at_a_time_when_even_one_outgrows_the_budget(monkeypatch):
    monkeypatch.setattr(objective_module, "PRODUCT_BUDGET", 16)
    wide = objective(hidden=200)
    assert wide.product_shape(30) == (1, wide.batch_size)


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_products_do_not_depend_on_the_shape(monkeypatch, curvature):
    chosen = objective(hidden=40, curvature=curvature)
    rows = torch.randn(12, chosen.size, dtype=torch.float64)
    monkeypatch.setattr(objective_module, "PRODUCT_BUDGET", 2**12)
    assert chosen.product_shape(12)[0] < 12
    small_budget = chosen.hvp(rows)
    one_at_a_time = objective(hidden=40, batch_size=60, curvature=curvature)
    one_at_a_time.rhs_chunk = 1
    torch.testing.assert_close(small_budget, one_at_a_time.hvp(rows), rtol=1e-12, atol=1e-14)
