"""The loss of a task split as h(f(x; theta), x), for the Gauss-Newton curvature (--curvature ggn).

The GGN matrix (1/n) sum_i J_i^T H_i J_i (precompute.objective) needs the network function f
(the outputs the loss sees, e.g. logits) apart from the loss h of those outputs, convex in them.
A task's losses are per-example functions of (model, batch), so the split comes from:

1. optional task hooks, per stage (`pretrain` / `finetune`):
       {stage}_outputs(model, batch) -> Tensor [B, ...]     the network function f
       {stage}_loss_from_outputs(outputs, batch) -> [B]     h, convex in the outputs
   with {stage}_loss(model, batch) == {stage}_loss_from_outputs({stage}_outputs(model, batch),
   batch); or
2. the standard case, recognised without hooks: the loss is cross-entropy (integer labels) or
   squared error (float targets shaped like the outputs; sum or mean over the output entries,
   halved or not) of the outputs against batch[1], where the outputs are `finetune_logits`
   (finetuning) or `model(batch[0])` (pretraining).

Either way the split is checked against the task's own loss on a first batch; a task that gives
neither gets one TaskError sentence saying which hooks to add.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from precompute.objective import LossSplit
from precompute.task import MultiStageTask, TaskError, has_hook


def _cross_entropy(outputs: torch.Tensor, batch: Any) -> torch.Tensor:
    return F.cross_entropy(outputs, batch[1], reduction="none")


def _squared(reduce: str, half: bool) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    def loss(outputs: torch.Tensor, batch: Any) -> torch.Tensor:
        error = (outputs - batch[1]).pow(2).reshape(len(outputs), -1)
        value = error.sum(1) if reduce == "sum" else error.mean(1)
        return value / 2 if half else value

    loss.__name__ = f"{'half ' if half else ''}squared error ({reduce})"
    return loss


def _cross_entropy_sample(outputs: torch.Tensor, batch: Any, generator) -> torch.Tensor:
    """w = p - e_y, y ~ softmax(f): E[w w^T] = diag(p) - p p^T, the Hessian of cross-entropy in
    the logits (a label drawn from the model: the true Fisher, as Kronfluence samples it)."""
    p = outputs.softmax(-1)
    drawn = torch.multinomial(p, 1, generator=generator)
    return p - torch.zeros_like(p).scatter_(1, drawn, 1.0)


def _squared_curvature(reduce: str, half: bool, outputs: int) -> float:
    """c with c I the Hessian of the squared error in the outputs: (1 if half else 2) / (the
    outputs per example if the mean else 1)."""
    return (1.0 if half else 2.0) / (outputs if reduce == "mean" else 1)


def _squared_sample(reduce: str, half: bool):
    """w = sqrt(c) e, e ~ N(0, I): E[w w^T] = c I, the Hessian of the squared error
    (`_squared_curvature`)."""

    def sample(outputs: torch.Tensor, batch: Any, generator) -> torch.Tensor:
        flat = outputs.reshape(len(outputs), -1)
        c = _squared_curvature(reduce, half, flat.shape[1])
        noise = torch.randn(flat.shape, generator=generator, device=flat.device, dtype=flat.dtype)
        return c**0.5 * noise

    return sample


def _cross_entropy_root(outputs: torch.Tensor, batch: Any) -> torch.Tensor:
    """L = diag(s) V [batch, K, K - 1], s = sqrt(p), V [K, K - 1] an orthonormal basis of the
    complement of s: L L^T = diag(s) (I - s s^T) diag(s) = diag(p) - p p^T, the Hessian of
    cross-entropy in the logits, whose rank is K - 1 (its rows sum to zero), so K - 1 columns
    carry all of it: one backward pass per batch fewer in every fit that takes each column
    (half of them for two classes). V is the first K - 1 columns of the Householder reflection
    I - w w^T / (1 + s_K), w = s + e_K, which takes s to -e_K (|w|^2 = 2 (1 + s_K) >= 2: no
    cancellation)."""
    p = outputs.softmax(-1)
    s = p.sqrt()
    if s.shape[1] == 1:  # one class: a zero Hessian, kept as one column
        return torch.zeros_like(s)[:, :, None]
    w = s.clone()
    w[:, -1] += 1
    eye = torch.eye(s.shape[1], dtype=s.dtype, device=s.device)[:, :-1]
    basis = eye - w[:, :, None] * w[:, None, :-1] / (1 + s[:, -1, None, None])
    return s[:, :, None] * basis


def _squared_root(reduce: str, half: bool):
    """L = sqrt(c) I [B, K, K]: L L^T = c I, the Hessian of the squared error
    (`_squared_curvature`)."""

    def root(outputs: torch.Tensor, batch: Any) -> torch.Tensor:
        flat = outputs.reshape(len(outputs), -1)
        c = _squared_curvature(reduce, half, flat.shape[1])
        return torch.diag_embed(torch.full_like(flat, c**0.5))

    return root


_SQUARED = [(reduce, half) for reduce in ("sum", "mean") for half in (False, True)]
STANDARD_LOSSES = {
    "cross-entropy": _cross_entropy,
    **{f"{'half ' if h else ''}squared error ({r})": _squared(r, h) for r, h in _SQUARED},
}
# per standard loss: draws with the loss Hessian in the outputs as second moment
STANDARD_SAMPLES = {
    "cross-entropy": _cross_entropy_sample,
    **{f"{'half ' if h else ''}squared error ({r})": _squared_sample(r, h) for r, h in _SQUARED},
}
# per standard loss: a root L_i of the loss Hessian in the outputs (L_i L_i^T = H_i), [B, K, C]
STANDARD_ROOTS = {
    "cross-entropy": _cross_entropy_root,
    **{f"{'half ' if h else ''}squared error ({r})": _squared_root(r, h) for r, h in _SQUARED},
}


def _standard_outputs(task: MultiStageTask, stage: str):
    if stage == "finetune":
        return lambda model, batch: task.finetune_logits(model, batch), "finetune_logits"
    return lambda model, batch: model(batch[0]), "model(batch[0])"


def loss_split(task: MultiStageTask, stage: str, model: torch.nn.Module, batch: Any) -> LossSplit:
    """The task's {stage} loss as h(f): from its hooks, or recognised as a standard loss; checked
    on `batch` against {stage}_loss. TaskError (one sentence) when neither holds."""
    loss_fn = getattr(task, f"{stage}_loss")
    outputs_name, loss_name = f"{stage}_outputs", f"{stage}_loss_from_outputs"
    with torch.no_grad():
        expected = loss_fn(model, batch)
    if has_hook(task, outputs_name) != has_hook(task, loss_name):
        given, missing = (
            (outputs_name, loss_name) if has_hook(task, outputs_name) else (loss_name, outputs_name)
        )
        raise TaskError(
            f"task {task.name!r} provides {given}() but not {missing}(): the Gauss-Newton "
            "curvature (--curvature ggn) needs both"
        )
    if has_hook(task, outputs_name):
        split = LossSplit(getattr(task, outputs_name), getattr(task, loss_name), "hooks")
        if not _agrees(split, model, batch, expected):
            raise TaskError(
                f"task {task.name!r}: {stage}_loss_from_outputs({stage}_outputs(model, batch), "
                f"batch) differs from {stage}_loss(model, batch) on the first batch of the "
                f"{stage} data; the Gauss-Newton curvature (--curvature ggn) needs them equal"
            )
        return split
    outputs, where = _standard_outputs(task, stage)
    if isinstance(batch, list | tuple) and len(batch) >= 2:
        for name, h in STANDARD_LOSSES.items():
            split = LossSplit(
                outputs, h, f"{name} of {where}", STANDARD_SAMPLES[name], STANDARD_ROOTS[name]
            )
            if _agrees(split, model, batch, expected):
                return split
    raise TaskError(
        f"task {task.name!r}: --curvature ggn needs the {stage} loss split as a convex loss of "
        f"the network outputs, and {stage}_loss is not cross-entropy or squared error of "
        f"{where} against batch[1]: add the hooks {stage}_outputs(model, batch) and "
        f"{stage}_loss_from_outputs(outputs, batch), or use --curvature hessian"
    )


def _agrees(split: LossSplit, model, batch, expected: torch.Tensor) -> bool:
    """Whether split gives the task's per-example losses on batch (to rounding of the dtype)."""
    try:
        with torch.no_grad():
            value = split.loss_of_outputs(split.outputs(model, batch), batch)
    except Exception:  # a candidate that does not fit the batch's shapes or types
        return False
    if not isinstance(value, torch.Tensor) or value.shape != expected.shape:
        return False
    tol = torch.finfo(expected.dtype).eps ** 0.5 if expected.is_floating_point() else 0.0
    return bool(torch.allclose(value.to(expected), expected, rtol=tol, atol=tol))
