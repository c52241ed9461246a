"""The score against ground truth: explicit dense Hessians, and leave-one-out retraining."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_task import TinyTask

from precompute.curvature import SolveConfig
from precompute.influence import Spaces, pretrain_vectors, scenario_vectors
from precompute.objective import ParamSpace
from precompute.scoring import score_pretraining


@pytest.fixture(scope="module")
def task():
    task = TinyTask()
    task.pretrained_model()
    for s in task.scenarios:
        task.finetuned_model(s)
    return task


def engine_scores(task, scenario, solver="exact", damping=0.0, preconditioner="regulariser"):
    """[Q, m] float64 scores from the engine's own pieces."""
    pretrained = task.pretrained_model()
    shared = task.shared_parameters()
    spaces = Spaces(
        ParamSpace.of(pretrained, shared),
        ParamSpace.of(pretrained, ["head.weight", "head.bias"]),
    )
    config = SolveConfig(
        solver, damping, cg_tol=1e-12, cg_max_iter=1000, preconditioner=preconditioner
    )
    u, _ = scenario_vectors(task, scenario, task.finetuned_model(scenario), spaces.shared, config)
    s, _ = pretrain_vectors(task, pretrained, spaces, u, config)
    columns = {}
    result = score_pretraining(
        pretrained,
        task.pretrain_loss,
        task.pretrain_data(),
        spaces.shared + spaces.pretrain_only,
        s,
        top_k=5,
        batch_size=7,
        sink=lambda start, scores: columns.__setitem__(start, scores.clone()),
    )
    assert result.path == "layers"
    return torch.cat([columns[k] for k in sorted(columns)], 1)


# ---- the slow obvious computation: every matrix written out ---------------------------------


def unpack(vec, shapes):
    out, i = [], 0
    for shape in shapes:
        n = int(np.prod(shape))
        out.append(vec[i : i + n].reshape(shape))
        i += n
    return out


def logits(w, head, x):
    w1, b1 = unpack(w, [(3, 4), (3,)])
    hw, hb = head
    return torch.tanh(x @ w1.T + b1) @ hw.T + hb


def dense_scores(task, scenario):
    """score(z, t) = (1/m) s_t . grad g(z), s_t = H_G^{-1} [u_t; 0], all by explicit Hessians."""
    pre, fin = task.pretrained_model(), task.finetuned_model(scenario)
    flat = lambda ps: torch.cat([p.detach().reshape(-1) for p in ps])  # noqa: E731
    w_pt, u_pt = flat(pre.encoder.parameters()), flat(pre.head.parameters())
    w_ft, t_ft = flat(fin.encoder.parameters()), flat(fin.head.parameters())
    xp, yp = task.pre.tensors
    xf, yf = task.train.tensors
    xt, yt = task.test.tensors
    lp, lf, a = task.pretrain_l2, task.finetune_l2, task.proximal_alpha
    nw = len(w_pt)

    def g(wu, x, y):  # per-example pretraining loss
        return F.cross_entropy(
            logits(wu[:nw], unpack(wu[nw:], [(3, 3), (3,)]), x), y, reduction="none"
        )

    def f(wt, x, y):
        return F.cross_entropy(
            logits(wt[:nw], unpack(wt[nw:], [(2, 3), (2,)]), x), y, reduction="none"
        )

    wu = torch.cat([w_pt, u_pt])
    H_G = torch.autograd.functional.hessian(lambda v: g(v, xp, yp).mean() + lp / 2 * v @ v, wu)
    wt = torch.cat([w_ft, t_ft])
    if scenario == "fixed":
        joint = torch.autograd.functional.hessian(
            lambda v: f(v, xf, yf).mean() + lf / 2 * v[nw:] @ v[nw:], wt
        )
        K, M = joint[nw:, nw:], joint[nw:, :nw]  # M = d2F/dT dW
    else:
        K = torch.autograd.functional.hessian(
            lambda v: (
                f(v, xf, yf).mean() + lf / 2 * v @ v + a / 2 * (v[:nw] - w_pt) @ (v[:nw] - w_pt)
            ),
            wt,
        )
    grads_t = torch.autograd.functional.jacobian(lambda v: f(v, xt, yt), wt)  # [Q, p]
    if scenario == "fixed":
        gw, gt = grads_t[:, :nw], grads_t[:, nw:]
        u = gw - (M.T @ torch.linalg.solve(K, gt.T)).T
    else:
        u = a * torch.linalg.solve(K, grads_t.T).T[:, :nw]
    s = torch.linalg.solve(
        H_G, torch.cat([u, torch.zeros(len(u), len(u_pt), dtype=u.dtype)], 1).T
    ).T
    grads_z = torch.autograd.functional.jacobian(lambda v: g(v, xp, yp), wu)  # [m, p]
    return s @ grads_z.T / len(xp)


@pytest.mark.parametrize("scenario", ["fixed", "updated"])
def test_matches_explicit_hessians(task, scenario):
    dense = dense_scores(task, scenario)
    for solver in ("exact", "cg"):
        fast = engine_scores(task, scenario, solver)
        error = ((fast - dense).abs().max() / dense.abs().max()).item()
        print(f"{scenario} {solver}: relative error against explicit Hessians {error:.2e}")
        assert error < 1e-6, (solver, error)


def test_fixed_and_updated_differ(task):
    # the two scenarios are different quantities; a mix-up would make them equal
    fixed, updated = engine_scores(task, "fixed"), engine_scores(task, "updated")
    assert (fixed - updated).abs().max() > 0.01 * fixed.abs().max()


def leave_one_out(task, scenario, removed):
    """Actual change of every test loss when each pretraining example in `removed` is dropped."""
    xt, yt = task.test.tensors
    everything = torch.ones(task.m, dtype=torch.bool)
    base = task.finetune_loss(
        task.fit_finetuned(task.fit_pretrained(everything), scenario), (xt, yt)
    )
    columns = []
    for i in removed:
        keep = torch.ones(task.m, dtype=torch.bool)
        keep[i] = False
        model = task.fit_finetuned(task.fit_pretrained(keep), scenario)
        columns.append(task.finetune_loss(model, (xt, yt)) - base)
    return torch.stack(columns, 1).detach()


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["fixed", "updated"])
def test_matches_leave_one_out_retraining(task, scenario):
    """Retrain both stages without each of 30 pretraining examples; compare with the score."""
    predicted = engine_scores(task, scenario)  # [Q, m]
    chosen = torch.randperm(task.m, generator=torch.Generator().manual_seed(0))[:24].tolist()
    chosen += [int(predicted[0].argmax()), int(predicted[0].argmin())]  # strongest of test 0
    chosen += [int(predicted[1].argmax()), int(predicted[1].argmin())]
    actual = leave_one_out(task, scenario, chosen)
    p, a = predicted[:, chosen].reshape(-1).numpy(), actual.reshape(-1).numpy()
    pearson = np.corrcoef(p, a)[0, 1]
    slope = (p @ a) / (p @ p)
    print(f"{scenario}: leave-one-out Pearson {pearson:.4f}, slope {slope:.3f}")
    assert pearson >= 0.98, pearson
    assert 0.8 <= slope <= 1.25, slope


class ExtraUnusedParameters(TinyTask):
    """Both models carry a trainable parameter that no loss uses (a leftover head, say)."""

    def pretrained_model(self):
        model = super().pretrained_model()
        model.leftover = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
        return model

    def finetuned_model(self, scenario):
        model = super().finetuned_model(scenario)
        model.leftover = torch.nn.Parameter(torch.ones(5, dtype=torch.float64))
        return model


def test_parameters_no_loss_uses_are_constants(tmp_path):
    from precompute.pipeline import PrecomputeConfig, precompute
    from precompute.rundir import read_manifest, read_table

    config = PrecomputeConfig(solver="exact", damping=0.0, maps=False, full_scores="on")
    plain = precompute(TinyTask(), tmp_path / "plain", config, log=lambda m: None)
    extra = precompute(ExtraUnusedParameters(), tmp_path / "extra", config, log=lambda m: None)
    for system in ("fixed", "updated", "pretrain"):
        sizes = [read_manifest(r)["solver"][system]["params"] for r in (plain, extra)]
        assert sizes[0] == sizes[1]
    scores = [read_table(r, "scores")["score"].to_numpy() for r in (plain, extra)]
    np.testing.assert_allclose(scores[1], scores[0], rtol=1e-6)
