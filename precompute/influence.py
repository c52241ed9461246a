"""Test-side vectors of the multi-stage influence function (docs/design.md section 3).

For a test example t with loss l_t at the finetuned parameters of the scenario:
- FIXED:   u_t = grad_W l_t - M^T K^{-1} grad_T l_t, K = d2F/dT2, M = d2F/dT dW, where
           M^T v = grad_W <grad_T F, v> comes from one double-backward product on (W, T).
- UPDATED: u_t = a [K^{-1} grad_{W,T} l_t]_W, K over (W, T) with (lf + a) I on the W block.
Pretraining side, shared: s_t = H_G^{-1} [u_t ; 0_U], and
score(z, t) = (1/m) s_t . grad_{W,U} g(z) (see precompute.scoring).

Every inverse (K^{-1}, H_G^{-1}) is a solve with the curvature `config.curvature` names: the true
Hessian, or the Gauss-Newton matrix (precompute.objective) for models trained short of an
optimum; the regulariser and proximal terms are quadratic, so they enter both exactly. The mixed
term M^T v of the FIXED scenario is always the true second derivative: it is a product, not an
inverse, so an indefinite M does no harm, and the part the GGN would drop,
sum_j (dh/df)_j d2f_j/dT dW, is not small where the head reads the shared features (for a linear
head it is of the order of the residuals, like the GGN part itself).

Single-stage influence (Koh & Liang) is the FIXED scenario of a task whose every parameter is
shared (U and T empty) and whose finetuned model is the pretrained one: then u_t = grad l_t and
score(z, t) = (1/m) grad l_t . H_G^{-1} grad g(z).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from precompute.curvature import SolveConfig, solve
from precompute.gauss_newton import loss_split
from precompute.objective import (
    LossFn,
    Objective,
    ParamSpace,
    batches,
    functional_loss,
    per_example_grads,
)
from precompute.task import MultiStageTask, TaskError


@dataclass
class Spaces:
    """W (shared) and U (pretraining-only) parameters of the pretrained model."""

    shared: ParamSpace
    pretrain_only: ParamSpace


def trainable_names(
    model: torch.nn.Module, shared: list[str], loss_fn=None, batch=None
) -> list[str]:
    """Parameters with requires_grad that are not shared, in the model's order; given a loss
    and a batch, only those the loss depends on (a head the loss never uses is a constant)."""
    chosen = set(shared)
    names = [n for n, p in model.named_parameters() if p.requires_grad and n not in chosen]
    if loss_fn is None or not names:
        return names
    params = dict(model.named_parameters())
    with torch.enable_grad():
        loss = loss_fn(model, batch).sum()
    grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
    return [n for n, g in zip(names, grads, strict=True) if g is not None]


def curvature_objective(
    task: MultiStageTask,
    stage: str,
    model: torch.nn.Module,
    data: Dataset,
    space: ParamSpace,
    reg: torch.Tensor,
    config: SolveConfig,
    batch_size: int,
) -> Objective:
    """The objective of a `stage` ("pretrain" or "finetune") system whose inverse is solved, with
    the curvature of `config` and the task's loss split (precompute.gauss_newton), checked on a
    first batch of `data`. The GGN needs the split (a TaskError without one); for the Hessian it
    is optional and serves EK-FAC (`ekfac`, `pcg --preconditioner ekfac`), which then fits the
    Gauss-Newton matrix, the true Fisher for cross-entropy, rather than the empirical Fisher
    (see precompute.ekfac)."""
    loss_fn: LossFn = getattr(task, f"{stage}_loss")
    first = next(batches(data, min(8, len(data)), next(model.parameters()).device))
    try:
        split = loss_split(task, stage, model, first)
    except TaskError:
        if config.curvature == "ggn":
            raise
        split = None
    return Objective(
        model, loss_fn, data, space, reg, batch_size, curvature=config.curvature, split=split
    )


def scenario_vectors(
    task: MultiStageTask,
    scenario: str,
    model: torch.nn.Module,
    shared: ParamSpace,
    config: SolveConfig,
    batch_size: int = 512,
    test_data: Dataset | None = None,
) -> tuple[torch.Tensor, dict]:
    """u_t for every test example (of `test_data`, default the task's test set), [Q, |W|], and
    the solve's info, at the finetuned `model`."""
    train = task.finetune_train_data()
    first = next(batches(train, 2, next(model.parameters()).device))
    head = ParamSpace.of(
        model, trainable_names(model, list(shared.names), task.finetune_loss, first)
    )
    joint = shared + head
    test_loss = functional_loss(model, task.finetune_loss, joint)
    theta = joint.read(model)
    if test_data is None:
        test_data = task.finetune_test_data()
    grads = per_example_grads(test_loss, theta, test_data, batch_size)
    grad_w, grad_t = joint.split(grads, len(shared.names))
    lf = float(task.finetune_l2)
    if scenario == "fixed":
        if head.size == 0:
            return grad_w, {"solver": "none", "params": 0}
        reg = torch.full((head.size,), lf, dtype=torch.float64)
        k = curvature_objective(task, "finetune", model, train, head, reg, config, batch_size)
        y, info = solve(k, grad_t, config)
        # M^T y = [d2F/d(W,T)2 @ (0, y)]_W, the true Hessian's block whatever the curvature of
        # K (see the module docstring); the regulariser has no (W, T) cross term
        mixed = Objective(
            model,
            task.finetune_loss,
            train,
            joint,
            torch.zeros(joint.size, dtype=torch.float64),
            batch_size,
        )
        padded = torch.cat([torch.zeros_like(grad_w), y], dim=1)
        m_t_y, _ = joint.split(mixed.data_hvp(padded), len(shared.names))
        return grad_w - m_t_y, info
    if scenario == "updated":
        a = float(task.proximal_alpha)
        reg = torch.cat(
            [
                torch.full((shared.size,), lf + a, dtype=torch.float64),
                torch.full((head.size,), lf, dtype=torch.float64),
            ]
        )
        k = curvature_objective(task, "finetune", model, train, joint, reg, config, batch_size)
        r, info = solve(k, grads, config)
        r_w, _ = joint.split(r, len(shared.names))
        return a * r_w, info
    raise ValueError(f"unknown scenario {scenario!r}")


def pretrain_vectors(
    task: MultiStageTask,
    model: torch.nn.Module,
    spaces: Spaces,
    u: torch.Tensor,
    config: SolveConfig,
    batch_size: int = 512,
    sharded: Callable | None = None,
) -> tuple[torch.Tensor, dict]:
    """s_t = H_G^{-1} [u_t ; 0_U] for the stacked rows of u [Q, |W|]; returns [Q, |W| + |U|].
    `sharded(objective)`, if given, is a context manager that sums the solve's passes over the
    pretraining data on other workers (precompute.ray_engine.RayCurvature)."""
    space = spaces.shared + spaces.pretrain_only
    reg = torch.full((space.size,), float(task.pretrain_l2), dtype=torch.float64)
    data = task.pretrain_data()
    h_g = curvature_objective(task, "pretrain", model, data, space, reg, config, batch_size)
    rhs = torch.cat([u, u.new_zeros(len(u), spaces.pretrain_only.size)], dim=1)
    if sharded is None:
        return solve(h_g, rhs, config, stage="pretrain")
    with sharded(h_g) as engine:
        s, info = solve(h_g, rhs, config, stage="pretrain")
    return s, {**info, **engine.describe()}
