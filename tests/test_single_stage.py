"""The single-stage configuration: every parameter shared (U and T empty), the finetuned model is
the pretrained one, the FIXED scenario. msif then answers Koh & Liang's one-stage question,
score(z, t) = (1/m) grad l_t . H^{-1} grad l(z), checked against an explicit Hessian."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_task import TinyTask
from torch.utils.data import TensorDataset

from precompute.pipeline import PrecomputeConfig, precompute
from precompute.rundir import read_manifest, read_table


class SingleStageTask(TinyTask):
    """TinyTask's pretraining problem alone: one model, one loss, every parameter shared."""

    name = "tiny-single-stage"
    scenarios = ("fixed",)

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        x = torch.randn(self.q, 4, generator=g, dtype=torch.float64)
        self.test = TensorDataset(x, torch.randint(0, 3, (self.q,), generator=g))

    def finetune_train_data(self):
        return self.pre  # nothing is finetuned: T is empty

    def finetuned_model(self, scenario):
        return self.pretrained_model()

    def shared_parameters(self):
        return ["encoder.0.weight", "encoder.0.bias", "head.weight", "head.bias"]


def koh_liang(task) -> np.ndarray:
    """(1/m) grad l_t . H^{-1} grad g(z) with H the explicit Hessian of the training objective."""
    model = task.pretrained_model()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def losses(t, x, y):
        params, offset = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            params[name] = t[offset : offset + shape.numel()].reshape(shape)
            offset += shape.numel()
        out = torch.func.functional_call(model, params, (x,))
        return F.cross_entropy(out, y, reduction="none")

    (xp, yp), (xt, yt) = task.pre.tensors, task.test.tensors
    objective = lambda t: losses(t, xp, yp).mean() + task.pretrain_l2 / 2 * t @ t  # noqa: E731
    hessian = torch.autograd.functional.hessian(objective, theta)
    grads_t = torch.autograd.functional.jacobian(lambda t: losses(t, xt, yt), theta)
    grads_z = torch.autograd.functional.jacobian(lambda t: losses(t, xp, yp), theta)
    return (torch.linalg.solve(hessian, grads_t.T).T @ grads_z.T / len(xp)).numpy()


def scores_of(run) -> np.ndarray:
    frame = read_table(run, "scores").sort_values(["test_id", "pretrain_id"])
    return frame["score"].to_numpy().reshape(SingleStageTask.q, SingleStageTask.m)


@pytest.mark.parametrize("solver", ["exact", "pcg"])
def test_single_stage_scores_are_koh_and_liang_influence(tmp_path, solver):
    task = SingleStageTask()
    config = PrecomputeConfig(solver=solver, damping=0.0, maps=False, full_scores="on",
                              device="cpu", cg_tol=1e-10)  # fmt: skip
    run = precompute(task, tmp_path / solver, config, log=lambda m: None)
    manifest = read_manifest(run)
    assert manifest["parameters"] == {"shared": 27, "pretrain_only": 0}
    assert manifest["solver"]["fixed"]["solver"] == "none"  # u_t = grad l_t: no finetuning solve
    expected = koh_liang(task)
    got = scores_of(run)  # float32 in the run
    assert np.abs(got - expected).max() <= 1e-6 * np.abs(expected).max() + 1e-9
