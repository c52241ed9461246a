"""Block preconditioned CG (`--solver pcg`): against dense solves, against `exact` and explicit
Hessians on the tiny float64 task, its convergence report, and the one table of solvers."""

from __future__ import annotations

import pytest
import torch
from tiny_task import TinyTask

from precompute import curvature
from precompute.curvature import (
    HISTORY_SHARE,
    PRECONDITIONERS,
    SOLVER_TABLE,
    SOLVERS,
    SolveConfig,
    _orthonormal_rows,
    block_pcg,
    history_blocks,
    regulariser_preconditioner,
    resolve,
    solve,
    solve_pcg_hvp,
)
from precompute.influence import Spaces, pretrain_vectors
from precompute.objective import CURVATURES, Objective, ParamSpace


def spd(size: int, condition: float, seed: int = 0) -> torch.Tensor:
    """A symmetric positive definite matrix with eigenvalues spread over [1, condition]."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(size, size, generator=g, dtype=torch.float64))
    eigenvalues = torch.logspace(0, torch.log10(torch.tensor(condition)), size, dtype=torch.float64)
    return (q * eigenvalues) @ q.T


def rows(count: int, size: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(count, size, generator=g, dtype=torch.float64)


def test_block_pcg_solves_an_spd_system_for_every_row():
    a = spd(60, 1e4)
    b = rows(5, 60)
    x, info = block_pcg(lambda v: v @ a, b, lambda r: r, tol=1e-10, max_iter=200)
    expected = torch.linalg.solve(a, b.T).T
    assert ((x - expected).norm(dim=1) / expected.norm(dim=1)).max() < 1e-7
    assert info["unconverged_rows"] == [] and info["max_relative_residual"] <= 1e-10
    assert info["negative_curvature_rows"] == 0 and info["min_curvature"] > 0


def test_a_shared_krylov_space_needs_fewer_steps_than_one_per_row():
    """With 5 right-hand sides the block space grows 5 directions a step: on this
    ill-conditioned matrix (condition 1e4) block CG converged in 12 steps, CG on one of the rows
    alone in 60, the dimension (18 and 191 conjugating against the last block alone)."""
    a = spd(60, 1e4)
    b = rows(5, 60)
    _, block = block_pcg(lambda v: v @ a, b, lambda r: r, tol=1e-8, max_iter=500)
    _, single = block_pcg(lambda v: v @ a, b[:1], lambda r: r, tol=1e-8, max_iter=500)
    assert block["iterations"] <= 40
    assert single["iterations"] > 3 * block["iterations"]


def test_a_good_preconditioner_cuts_the_iterations():
    """M = A with its eigenvalues off by up to 50%: M^{-1} A within [2/3, 1]."""
    a = spd(300, 1e6)
    values, vectors = torch.linalg.eigh(a)
    off = 1 + 0.5 * torch.rand(300, generator=torch.Generator().manual_seed(5), dtype=a.dtype)
    inverse = (vectors / (values * off)) @ vectors.T
    b = rows(3, 300)
    _, plain = block_pcg(lambda v: v @ a, b, lambda r: r, tol=1e-8, max_iter=500)
    x, pre = block_pcg(lambda v: v @ a, b, lambda r: r @ inverse, tol=1e-8, max_iter=500)
    assert pre["iterations"] < plain["iterations"] / 4
    torch.testing.assert_close(x, torch.linalg.solve(a, b.T).T, rtol=1e-6, atol=1e-9)


def test_conjugating_against_every_kept_block_recovers_what_rounding_loses():
    """In float32 on a condition number of 1e4, block CG conjugating against the last block
    alone took 306 steps to 1e-4 (rounding undoes conjugacy to the earlier ones); against
    every block, 98, near the 75 after which the 4 rows' space spans all 300 dimensions."""
    a = spd(300, 1e4).float()
    b = rows(4, 300).float()
    _, last = block_pcg(lambda v: v @ a, b, lambda r: r, tol=1e-4, max_iter=2000, keep=1)
    x, every = block_pcg(lambda v: v @ a, b, lambda r: r, tol=1e-4, max_iter=2000)
    assert every["conjugated_blocks"] > every["iterations"] and last["conjugated_blocks"] == 1
    assert every["corrections"] > 0 and last["corrections"] == 0
    assert every["unconverged_rows"] == [] and last["unconverged_rows"] == []
    assert every["iterations"] < last["iterations"] / 2
    expected = torch.linalg.solve(a.double(), b.double().T).T
    assert ((x.double() - expected).norm(dim=1) / expected.norm(dim=1)).max() < 1e-3


def test_the_kept_blocks_are_a_share_of_the_memory(monkeypatch):
    b = rows(4, 300)  # 9,600 bytes; a kept block holds P and A P
    monkeypatch.setattr(curvature, "device_memory", lambda device: 3 * 2 * 9600 * HISTORY_SHARE)
    assert history_blocks(b) == 3
    monkeypatch.setattr(curvature, "device_memory", lambda device: 1)
    assert history_blocks(b) == 1


def test_converged_rows_stay_in_the_block():
    """A row that has converged keeps adding its residual's directions to the shared space.
    On this ill-conditioned matrix with 16 rows block CG converged in 13 steps (96 conjugating
    against the last block alone); when written, with the last block alone, freezing the
    converged rows (the block shrinking to the last row) took 432, and so did keeping a
    quarter of the rows."""
    a = spd(200, 1e6)
    b = rows(16, 200)
    x, info = block_pcg(lambda v: v @ a, b, lambda r: r, tol=1e-8, max_iter=1000)
    assert info["iterations"] <= 100 and info["unconverged_rows"] == []
    assert len(info["block_sizes"]) == info["iterations"]
    torch.testing.assert_close(x, torch.linalg.solve(a, b.T).T, rtol=1e-5, atol=1e-9)


def test_dependent_and_zero_rows_are_deflated_not_a_breakdown():
    a = spd(40, 1e3)
    b = rows(3, 40)
    b = torch.cat([b, b[:1] * 2, b[1:2] + b[2:3], torch.zeros(1, 40, dtype=b.dtype)])
    x, info = block_pcg(lambda v: v @ a, b, lambda r: r, tol=1e-10, max_iter=200)
    assert info["block_sizes"][0] == 3  # six rows, three independent directions
    torch.testing.assert_close(x, torch.linalg.solve(a, b.T).T, rtol=1e-7, atol=1e-12)
    assert info["unconverged_rows"] == []


@pytest.mark.parametrize("part", [2**24, 64])  # z in one part, and in parts of 8 columns
def test_orthonormal_rows_span_the_svd_basis_and_drop_what_rounding_makes(monkeypatch, part):
    monkeypatch.setattr(curvature, "GRAM_PART", part)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 500, generator=g)
    near = z[:2] * 3 + 1e-6 * torch.randn(2, 500, generator=g)  # copies up to float32 noise
    basis = _orthonormal_rows(torch.cat([z, near]))
    assert basis.dtype == torch.float32 and len(basis) == 6
    torch.testing.assert_close(basis @ basis.T, torch.eye(6), atol=1e-6, rtol=0)
    top = torch.linalg.svd(z.double(), full_matrices=False)[2]  # [6, 500]
    projected = top @ basis.double().T @ basis.double()
    torch.testing.assert_close(projected, top, atol=1e-6, rtol=0)
    assert len(_orthonormal_rows(torch.zeros(3, 10))) == 0


def test_negative_curvature_stops_and_names_every_active_row():
    a = spd(30, 10.0) - 5.0 * torch.eye(30, dtype=torch.float64)  # eigenvalues in [-4, 5]
    b = rows(4, 30)
    _, info = block_pcg(lambda v: v @ a, b, lambda r: r, tol=1e-8, max_iter=100)
    assert info["negative_curvature_rows"] == 4
    assert info["unconverged_rows"] == [0, 1, 2, 3]
    assert info["min_curvature"] < 0


def test_pcg_info_has_what_the_health_checks_read():
    a = spd(20, 10.0)
    x, info = solve_pcg_hvp(
        lambda v: v @ a, rows(2, 20), 0.5, lambda r, d: r, tol=1e-9, max_iter=50
    )
    for key in ("unconverged_rows", "min_curvature", "negative_curvature_rows", "tolerance",
                "iterations", "max_relative_residual", "damping", "mean_eigenvalue"):  # fmt: skip
        assert key in info, key
    # the Hutchinson probes rode along in the first step: the mean eigenvalue is trace / p
    assert abs(info["mean_eigenvalue"] - torch.trace(a).item() / 20) < 0.3 * torch.trace(a) / 20
    torch.testing.assert_close(
        x, torch.linalg.solve(a + 0.5 * torch.eye(20).double(), rows(2, 20).T).T
    )


# ---- on the tiny float64 task ---------------------------------------------------------------


@pytest.fixture(scope="module")
def task():
    task = TinyTask()
    task.pretrained_model()
    for s in task.scenarios:
        task.finetuned_model(s)
    return task


@pytest.mark.parametrize("preconditioner", PRECONDITIONERS)
@pytest.mark.parametrize("scenario", ["fixed", "updated"])
def test_pcg_with_no_damping_equals_exact_and_explicit_hessians(task, scenario, preconditioner):
    from test_ground_truth import dense_scores, engine_scores

    dense = dense_scores(task, scenario)
    exact = engine_scores(task, scenario, "exact")
    pcg = engine_scores(task, scenario, "pcg", preconditioner=preconditioner)
    scale = exact.abs().max()
    assert ((pcg - exact).abs().max() / scale).item() <= 1e-6
    assert ((pcg - dense).abs().max() / dense.abs().max()).item() <= 1e-6


def pretrain_solve(task, solver, preconditioner="regulariser"):
    pretrained = task.pretrained_model()
    spaces = Spaces(
        ParamSpace.of(pretrained, task.shared_parameters()),
        ParamSpace.of(pretrained, ["head.weight", "head.bias"]),
    )
    u = rows(6, spaces.shared.size)
    config = SolveConfig(solver, 0.0, cg_tol=1e-10, cg_max_iter=500, preconditioner=preconditioner)
    return pretrain_vectors(task, pretrained, spaces, u, config)


@pytest.mark.parametrize(
    ("preconditioner", "name"),
    [("regulariser", "regulariser"), ("ekfac", "ekfac (empirical Fisher)")],
)
def test_pcg_takes_fewer_passes_than_cg(task, preconditioner, name):
    x_cg, cg = pretrain_solve(task, "cg")
    x_pcg, pcg = pretrain_solve(task, "pcg", preconditioner)
    torch.testing.assert_close(x_pcg, x_cg, rtol=1e-7, atol=1e-9)
    assert pcg["iterations"] < cg["iterations"]
    assert pcg["preconditioner"] == name and pcg["curvature"] == "hessian"


def test_the_regulariser_preconditioner_divides_by_reg_plus_damping_and_fills_its_zeros():
    reg = torch.tensor([0.0, 1.0, 3.0], dtype=torch.float64)
    r = torch.tensor([[2.0, 2.0, 8.0]], dtype=torch.float64)
    precondition = regulariser_preconditioner(reg)
    torch.testing.assert_close(precondition(r, 1.0), torch.tensor([[2.0, 1.0, 2.0]]).double())
    # no damping: the zero takes the mean of the positive entries, (1 + 3) / 2
    torch.testing.assert_close(precondition(r, 0.0), torch.tensor([[1.0, 2.0, 8 / 3]]).double())
    assert torch.equal(regulariser_preconditioner(torch.zeros(3).double())(r, 0.0), r)


# ---- the table ------------------------------------------------------------------------------


def test_one_table_of_solvers_builds_the_choices():
    from precompute.cli import parser

    assert SOLVERS == ("auto", *SOLVER_TABLE)
    sub = parser()._subparsers._group_actions[0].choices["precompute"]
    choices = {a.dest: a.choices for a in sub._actions}
    assert tuple(choices["solver"]) == SOLVERS
    assert tuple(choices["curvature"]) == CURVATURES
    assert tuple(choices["preconditioner"]) == PRECONDITIONERS


def test_auto_picks_pcg_for_finetuning_systems_past_exact():
    assert resolve("auto", 10**5, "finetune", 300) == "pcg"
    assert resolve("auto", 10**5, "pretrain", 10**4) == "ekfac"
    assert resolve("auto", 100, "finetune", 300) == "exact"


def test_every_solver_takes_objective_rhs_config(task):
    model = task.pretrained_model()
    space = ParamSpace.of(model, ["head.weight", "head.bias"])
    reg = torch.full((space.size,), 0.05, dtype=torch.float64)
    objective = Objective(model, task.pretrain_loss, task.pretrain_data(), space, reg)
    rhs = rows(2, space.size)
    exact, _ = solve(objective, rhs, SolveConfig("exact", 0.01))
    for name in SOLVER_TABLE:
        x, info = solve(objective, rhs, SolveConfig(name, 0.01, cg_tol=1e-10))
        assert info["solver"] == name and info["damping"] == 0.01
        if name != "ekfac":  # the approximation; the others solve the same system
            torch.testing.assert_close(x, exact, rtol=1e-7, atol=1e-10)


def test_config_refuses_an_unknown_curvature():
    from precompute.config import PrecomputeConfig

    with pytest.raises(ValueError, match="--curvature 'fisher' is unknown: use hessian, ggn"):
        PrecomputeConfig(curvature="fisher").check()
    PrecomputeConfig(curvature="ggn", solver="pcg").check()
