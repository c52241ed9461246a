"""Test-side vectors of the multi-stage influence function (DESIGN.md section 3).

For a test example t with loss l_t at the finetuned parameters of the scenario:
- FIXED:   u_t = grad_W l_t - M^T K^{-1} grad_T l_t, K = d2F/dT2, M = d2F/dT dW, where
           M^T v = grad_W <grad_T F, v> comes from one double-backward product on (W, T).
- UPDATED: u_t = a [K^{-1} grad_{W,T} l_t]_W, K over (W, T) with (lf + a) I on the W block.
Pretraining side, shared: s_t = H_G^{-1} [u_t ; 0_U], and
score(z, t) = (1/m) s_t . grad_{W,U} g(z) (see precompute.scoring).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from precompute.curvature import SolveConfig, solve
from precompute.objective import (
    Objective,
    ParamSpace,
    batches,
    functional_loss,
    per_example_grads,
)
from precompute.task import MultiStageTask


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
        k = Objective(
            model,
            task.finetune_loss,
            train,
            head,
            torch.full((head.size,), lf, dtype=torch.float64),
            batch_size,
        )
        y, info = solve(k, grad_t, config)
        # M^T y = [d2F/d(W,T)2 @ (0, y)]_W; the regulariser has no (W, T) cross term
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
        k = Objective(model, task.finetune_loss, train, joint, reg, batch_size)
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
) -> tuple[torch.Tensor, dict]:
    """s_t = H_G^{-1} [u_t ; 0_U] for the stacked rows of u [Q, |W|]; returns [Q, |W| + |U|]."""
    space = spaces.shared + spaces.pretrain_only
    reg = torch.full((space.size,), float(task.pretrain_l2), dtype=torch.float64)
    h_g = Objective(model, task.pretrain_loss, task.pretrain_data(), space, reg, batch_size)
    rhs = torch.cat([u, u.new_zeros(len(u), spaces.pretrain_only.size)], dim=1)
    return solve(h_g, rhs, config, stage="pretrain")
