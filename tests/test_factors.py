"""The Gauss-Newton product from stored layer factors (precompute.factors) against the forward-
and reverse-mode product it replaces, on dense layers of every shape it takes; the cases it
leaves to forward and reverse mode; and solves that use it."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from precompute.curvature import SolveConfig, solve
from precompute.factors import GGNFactors
from precompute.gauss_newton import STANDARD_LOSSES, STANDARD_ROOTS
from precompute.objective import LossSplit, Objective, ParamSpace


class Mlp(nn.Module):
    def __init__(self, outputs: int = 3):
        super().__init__()
        self.hidden = nn.Linear(4, 6)
        self.out = nn.Linear(6, outputs)

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(x)))


class Mixed(nn.Module):
    """A grouped, padded, strided convolution; a Linear over positions; a Linear called twice;
    a Linear without bias."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, stride=2, padding=1, groups=2)
        self.per_position = nn.Linear(4, 5)
        self.twice = nn.Linear(5, 5)
        self.out = nn.Linear(5, 3, bias=False)

    def forward(self, x):
        h = torch.tanh(self.conv(x))  # [B, 4, 3, 3]
        h = h.flatten(2).transpose(1, 2)  # [B, 9 positions, 4]
        h = torch.tanh(self.per_position(h))
        h = torch.tanh(self.twice(torch.tanh(self.twice(h))))
        return self.out(h.mean(1))


class WithNorm(Mlp):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(6)

    def forward(self, x):
        return self.out(self.norm(torch.tanh(self.hidden(x))))


class Tied(Mlp):
    """A square weight shared by two Linear modules: no single layer owns it, so it (and the
    bias of the module it leaves) keeps its gradients as they are, beside the factors."""

    def __init__(self):
        super().__init__()
        self.again = nn.Linear(6, 6)
        self.again.weight = self.square = nn.Parameter(torch.randn(6, 6) / 3)
        self.first = nn.Linear(6, 6, bias=False)
        self.first.weight = self.square

    def forward(self, x):
        h = torch.tanh(self.first(torch.tanh(self.hidden(x))))
        return self.out(torch.tanh(self.again(h)))


class WithEmbedding(nn.Module):
    """An embedding with a padding token, called twice (repeated tokens within an example),
    under a Linear over positions."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(7, 4, padding_idx=0)
        self.mix = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.mix(self.embed(x))).mean(1) + self.embed(x[:, :2]).sum(1)
        return self.out(torch.tanh(h))


def outputs_of(model, batch):
    return model(batch[0])


def cross_entropy(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def squared(model, batch):
    return ((model(batch[0]) - batch[1]) ** 2).sum(1)


def objective_for(model, x, y, loss, name, names=None, batch_size=7, closed_root=True):
    """closed_root: the loss Hessian's root in closed form, as a recognised loss brings it
    (else by products and an eigendecomposition, as a task's hooks get it)."""
    model = model.double()
    names = names or [n for n, _ in model.named_parameters()]
    space = ParamSpace.of(model, names)
    reg = torch.full((space.size,), 0.01, dtype=torch.float64)
    root = STANDARD_ROOTS[name] if closed_root else None
    split = LossSplit(outputs_of, STANDARD_LOSSES[name], "test", root=root)
    data = TensorDataset(
        x.double() if x.is_floating_point() else x, y if y.dtype == torch.long else y.double()
    )
    return Objective(model, loss, data, space, reg, batch_size, curvature="ggn", split=split)


def mlp_objective(outputs: int = 3, n: int = 30, **kwargs):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=g)
    y = torch.randint(0, outputs, (n,), generator=g)
    return objective_for(Mlp(outputs), x, y, cross_entropy, "cross-entropy", **kwargs)


def mixed_objective(names=None):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(20, 2, 6, 6, generator=g), torch.randn(20, 3, generator=g)
    return objective_for(Mixed(), x, y, squared, "squared error (sum)", names)


def assert_products_agree(objective, rows: int = 5, constant: dict | None = None):
    """`constant`: {parameter: index} of entries that no example's gradient reaches (an
    embedding's padding row), zero in the rows: forward mode's J v would see them where reverse
    mode's J^T does not."""
    factors, how = GGNFactors.record(objective)
    assert how == "stored layer factors"
    v = torch.randn(rows, objective.size, generator=torch.Generator().manual_seed(3)).double()
    for name, index in (constant or {}).items():
        objective.space.unflatten(v)[name][:, index] = 0  # views of v
    torch.testing.assert_close(factors.product(v), objective.data_ggn(v), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("closed_root", [True, False])
def test_an_mlp_with_biases_under_cross_entropy(closed_root):
    assert_products_agree(mlp_objective(closed_root=closed_root))


def test_convolutions_positions_repeated_calls_and_a_layer_without_bias():
    assert_products_agree(mixed_objective())


def classifier_objective(model: type[nn.Module], seed: int, tokens: bool = False):
    """12 examples of 3 classes under cross-entropy: 4 features, or 5 tokens of 7."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 7, (12, 5), generator=g) if tokens else torch.randn(12, 4, generator=g)
    y = torch.randint(0, 3, (12,), generator=g)
    torch.manual_seed(0)
    return objective_for(model(), x, y, cross_entropy, "cross-entropy")


def norm_objective():
    return classifier_objective(WithNorm, 5)


def tied_objective():
    return classifier_objective(Tied, 6)


def test_parameters_outside_dense_layers_keep_their_gradients():
    """LayerNorm's weight and bias: their per-example gradients of every output column are
    stored as they are, beside the dense layers' factors."""
    objective = norm_objective()
    assert_products_agree(objective)
    assert GGNFactors.record(objective)[0].outside.names == ("norm.weight", "norm.bias")


def test_a_tied_weight_keeps_its_gradients_and_the_layers_their_factors(monkeypatch):
    import precompute.factors

    monkeypatch.setattr(precompute.factors, "CHUNK_BUDGET", 1)  # one example at a time
    objective = tied_objective()
    assert_products_agree(objective)
    assert GGNFactors.record(objective)[0].outside.names == ("square", "again.bias")


def embedding_objective():
    return classifier_objective(WithEmbedding, 7, tokens=True)


def test_an_embedding_keeps_its_tokens_and_output_gradients(monkeypatch):
    """Row t of its part of phi_ik gathers the output gradients at the positions holding t
    (padding left out), over both calls."""
    import precompute.factors

    padding = {"embed.weight": 0}
    assert_products_agree(embedding_objective(), constant=padding)
    monkeypatch.setattr(precompute.factors, "CHUNK_BUDGET", 1)  # one example at a time
    assert_products_agree(embedding_objective(), constant=padding)


def test_a_space_of_some_layers_with_a_bias_left_out():
    """The space's parameters only: a bias outside it is a constant, not a column of ones."""
    names = ["conv.weight", "conv.bias", "twice.weight", "out.weight"]
    assert_products_agree(mixed_objective(names))


def test_products_in_chunks_of_examples_add_up_to_the_whole(monkeypatch):
    import precompute.factors

    objective = mlp_objective()
    monkeypatch.setattr(precompute.factors, "CHUNK_BUDGET", 1)  # one example at a time
    assert_products_agree(objective)


@pytest.mark.parametrize(
    "make", [mlp_objective, mixed_objective, norm_objective, embedding_objective]
)
def test_the_trace_is_the_sum_of_the_diagonal(make, monkeypatch):
    """Against the diagonal read off products with the unit vectors; the convolution's and the
    Linear over positions' groups and positions go through their Gram matrices, a few examples
    at a time."""
    import precompute.factors

    objective = make()
    diagonal = objective.data_ggn(torch.eye(objective.size, dtype=torch.float64)).diagonal()
    monkeypatch.setattr(precompute.factors, "CHUNK_BUDGET", 1)  # one example at a time
    factors, _ = GGNFactors.record(objective)
    assert factors.trace() == pytest.approx(diagonal.sum().item(), rel=1e-12)
    objective.factors = factors
    mean = (diagonal.sum() + objective.reg.sum()).item() / objective.size
    assert objective.mean_eigenvalue() == pytest.approx(mean, rel=1e-12)


@pytest.mark.parametrize("solver", ["pcg", "cg"])
def test_auto_damping_takes_the_exact_mean_eigenvalue_from_the_factors(solver):
    """The exact solver's mean of the eigenvalues, where a Hutchinson estimate differed."""
    rhs = torch.randn(3, mlp_objective().size, generator=torch.Generator().manual_seed(4)).double()
    _, exact = solve(mlp_objective(), rhs, SolveConfig("exact", "auto"))
    _, info = solve(mlp_objective(), rhs, SolveConfig(solver, "auto", cg_tol=1e-10))
    assert info["mean_eigenvalue"] == pytest.approx(exact["mean_eigenvalue"], rel=1e-10)
    assert info["damping"] == pytest.approx(exact["damping"], rel=1e-10)


@pytest.mark.parametrize(
    ("objective", "reason"),
    [
        (lambda: mlp_objective(outputs=17), "17 outputs per example"),
    ],
)  # fmt: skip
def test_what_factors_cannot_hold_goes_by_forward_and_reverse_mode(objective, reason):
    factors, how = GGNFactors.record(objective())
    assert factors is None and how == f"forward and reverse mode: {reason}"


def test_factors_past_the_budget_are_not_stored():
    """30 examples of inputs 5 + 7 and output gradients 2 x (6 + 3), 2 = the 3 classes' root's
    columns: 30 x 30 entries."""
    factors, how = GGNFactors.record(mlp_objective(), budget=899)
    assert factors is None
    assert how == "forward and reverse mode: 900 factor entries, over the budget of 899"
    assert GGNFactors.record(mlp_objective(), budget=900)[0] is not None


def test_the_default_budget_is_a_share_of_the_memory(monkeypatch):
    import precompute.factors

    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert precompute.factors.device_memory(torch.device("cpu")) == physical
    # 900 entries of 8 bytes: stored within 7,200 bytes, not within 7,199
    share = precompute.factors.FACTOR_SHARE
    monkeypatch.setattr(precompute.factors, "device_memory", lambda device: 7200 * share)
    assert GGNFactors.record(mlp_objective())[0] is not None
    monkeypatch.setattr(precompute.factors, "device_memory", lambda device: 7199 * share)
    assert GGNFactors.record(mlp_objective())[0] is None


@pytest.mark.parametrize("solver", ["pcg", "cg", "exact"])
def test_a_gauss_newton_solve_records_the_factors_and_solves_the_same_system(solver, monkeypatch):
    rhs = torch.randn(3, mlp_objective().size, generator=torch.Generator().manual_seed(4)).double()
    config = SolveConfig(solver, 0.01, cg_tol=1e-12)
    with_factors = mlp_objective()
    x, info = solve(with_factors, rhs, config)
    assert info["products"] == "stored layer factors" and with_factors.factors is not None
    monkeypatch.setattr(GGNFactors, "record", classmethod(lambda cls, o: (None, "switched off")))
    without = mlp_objective()
    y, other = solve(without, rhs, config)
    assert other["products"] == "switched off" and without.factors is None
    torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)


def test_a_hessian_solve_keeps_double_backward():
    objective = mlp_objective()
    hessian = Objective(
        objective.model, objective.loss_fn, objective.dataset, objective.space, objective.reg,
        curvature="hessian",
    )  # fmt: skip
    _, info = solve(hessian, torch.ones(1, hessian.size).double(), SolveConfig("cg", 0.01))
    assert info["products"] == "double backward" and hessian.factors is None
