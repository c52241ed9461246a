"""The Gauss-Newton curvature (`--curvature ggn`): products against an explicit J^T H J, where it
equals the Hessian, that it stays positive semi-definite where the Hessian does not, the loss
split (task hooks or a recognised standard loss), and whole runs on a briefly trained model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_task import BrieflyTrainedTask, TinyNet, TinyTask, minimise

from precompute.cli import main
from precompute.curvature import explicit_hessian
from precompute.gauss_newton import STANDARD_LOSSES, loss_split
from precompute.objective import LossSplit, Objective, ParamSpace
from precompute.task import TaskError

TASKS = Path(__file__)


def model_and_data(seed: int = 0, n: int = 40):
    torch.manual_seed(seed)
    model = TinyNet(3).double()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return model, torch.utils.data.TensorDataset(x, y)


def logits_of(model, batch):
    return model(batch[0])


def ce_loss(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


CE = LossSplit(logits_of, STANDARD_LOSSES["cross-entropy"], "test")


def objective_for(model, data, split=CE, loss=ce_loss, reg=0.0, curvature="ggn"):
    space = ParamSpace.of(model, [n for n, _ in model.named_parameters()])
    regs = torch.full((space.size,), reg, dtype=torch.float64)
    return Objective(
        model, loss, data, space, regs, batch_size=16, curvature=curvature, split=split
    )


def explicit_ggn(objective, loss_hessian) -> torch.Tensor:
    """(1/n) sum_i J_i^T H_i J_i with J_i from jacrev of the outputs, H_i given per example."""
    x, y = objective.dataset.tensors
    jac = torch.func.jacrev(lambda t: objective.outputs(t, (x, y)))(objective.theta)  # [n,C,p]
    out = objective.outputs(objective.theta, (x, y)).detach()
    h = loss_hessian(out)  # [n, C, C]
    return torch.einsum("ncp,ncd,ndq->pq", jac, h, jac) / len(x)


def test_ggn_products_equal_explicit_jt_h_j_for_cross_entropy():
    model, data = model_and_data()
    objective = objective_for(model, data)

    def softmax_hessian(out):  # d2 CE / d logits2 = diag(p) - p p^T
        p = out.softmax(-1)
        return torch.diag_embed(p) - p[:, :, None] * p[:, None, :]

    dense = explicit_ggn(objective, softmax_hessian)
    v = torch.randn(
        5, objective.size, dtype=torch.float64, generator=torch.Generator().manual_seed(3)
    )
    torch.testing.assert_close(objective.data_ggn(v), v @ dense, rtol=1e-10, atol=1e-12)


def test_ggn_products_equal_explicit_jt_j_for_half_squared_error():
    model, data = model_and_data()
    x, _ = data.tensors
    targets = torch.randn(len(x), 3, dtype=torch.float64)
    data = torch.utils.data.TensorDataset(x, targets)
    h = STANDARD_LOSSES["half squared error (sum)"]
    split = LossSplit(logits_of, h, "test")
    objective = objective_for(model, data, split, lambda m, b: h(m(b[0]), b))
    dense = explicit_ggn(
        objective, lambda out: torch.eye(3, dtype=out.dtype).expand(len(out), 3, 3)
    )
    v = torch.randn(4, objective.size, dtype=torch.float64)
    torch.testing.assert_close(objective.hvp(v), v @ dense, rtol=1e-10, atol=1e-12)


def test_ggn_equals_the_hessian_when_the_outputs_are_linear_in_the_parameters():
    model, data = model_and_data()
    linear = torch.nn.Linear(4, 3).double()  # softmax regression: d2 f / d theta2 = 0
    objective = objective_for(linear, data, reg=0.1)
    v = torch.randn(6, objective.size, dtype=torch.float64)
    torch.testing.assert_close(objective.data_ggn(v), objective.data_hvp(v), rtol=1e-10, atol=1e-12)
    objective.curvature = "hessian"
    hessian = objective.hvp(v)
    objective.curvature = "ggn"
    torch.testing.assert_close(objective.hvp(v), hessian, rtol=1e-10, atol=1e-12)


def test_ggn_is_positive_semi_definite_where_the_hessian_is_indefinite():
    task = BrieflyTrainedTask()
    model = task.pretrained_model()
    objective = objective_for(model, task.pretrain_data(), loss=task.pretrain_loss)
    like = objective.theta[None]
    ggn = torch.linalg.eigvalsh(explicit_hessian(objective.hvp, objective.size, like))
    hessian = torch.linalg.eigvalsh(explicit_hessian(objective.data_hvp, objective.size, like))
    assert hessian[0] < -1e-3  # the briefly trained model's Hessian curves down
    assert ggn[0] > -1e-12 * ggn[-1]


# ---- the loss split ------------------------------------------------------------------------


def test_standard_cross_entropy_is_recognised_for_both_stages():
    task = TinyTask()
    model = task.pretrained_model()
    batch = task.pretrain_data()[:8]
    assert loss_split(task, "pretrain", model, batch).source == "cross-entropy of model(batch[0])"
    split = loss_split(task, "finetune", task.finetuned_model("fixed"), task.train[:8])
    assert split.source == "cross-entropy of finetune_logits"


class HookedTask(TinyTask):
    """Gives the split through the hooks, with outputs the standard detection cannot see."""

    def pretrain_outputs(self, model, batch):
        return model(batch[0]) * 2

    def pretrain_loss_from_outputs(self, outputs, batch):
        return F.cross_entropy(outputs / 2, batch[1], reduction="none")


class WrongHooksTask(HookedTask):
    def pretrain_loss_from_outputs(self, outputs, batch):
        return F.cross_entropy(outputs, batch[1], reduction="none")


class UnsplitTask(TinyTask):
    """A pretraining loss with an extra term in the logits: no standard split fits it."""

    def pretrain_loss(self, model, batch):
        logits = model(batch[0])
        return F.cross_entropy(logits, batch[1], reduction="none") + 0.1 * logits.pow(2).sum(1)


def test_hooks_give_the_split_and_are_checked_against_the_loss():
    task = HookedTask()
    model, batch = task.pretrained_model(), task.pretrain_data()[:8]
    assert loss_split(task, "pretrain", model, batch).source == "hooks"
    with pytest.raises(TaskError, match="pretrain_loss_from_outputs.*differs from pretrain_loss"):
        loss_split(WrongHooksTask(), "pretrain", model, batch)


class HalfHookedTask(TinyTask):
    def pretrain_outputs(self, model, batch):
        return model(batch[0])


def test_one_hook_without_its_pair_is_named():
    task = HalfHookedTask()
    model, batch = task.pretrained_model(), task.pretrain_data()[:8]
    with pytest.raises(TaskError, match=r"provides pretrain_outputs\(\) but not pretrain_loss_"):
        loss_split(task, "pretrain", model, batch)


def test_a_task_without_a_split_gets_one_sentence_naming_the_hooks(tmp_path, capsys):
    code = main(
        [
            "precompute",
            "--task",
            f"{TASKS.parent / 'test_ggn.py'}:UnsplitTask",
            "--out",
            str(tmp_path / "r"),
            "--no-maps",
            "--curvature",
            "ggn",
            "--solver",
            "cg",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert "Traceback" not in "\n".join(err)
    for phrase in (
        "--curvature ggn needs the pretrain loss split",
        "pretrain_outputs(model, batch)",
        "pretrain_loss_from_outputs(outputs, batch)",
        "--curvature hessian",
    ):
        assert phrase in err[-1], err[-1]


# ---- whole runs on a briefly trained model --------------------------------------------------


def run(tmp_path, name, *extra):
    out = tmp_path / name
    args = [
        "precompute",
        "--task",
        f"{TASKS.parent / 'tiny_task.py'}:BrieflyTrainedTask",
        "--out",
        str(out),
        "--no-maps",
        "--full-scores",
        "on",
        "--device",
        "cpu",
        *extra,
    ]
    assert main(args) == 0
    from precompute.rundir import read_table

    manifest = json.loads((out / "manifest.json").read_text())
    scores = read_table(out, "scores").sort_values(["scenario", "test_id", "pretrain_id"])
    return manifest, scores["score"].to_numpy()


@pytest.mark.slow
def test_pcg_on_the_gauss_newton_matrix_solves_what_cg_on_it_solves(tmp_path):
    """The true Hessian of this model is indefinite (cg and pcg meet negative curvature without
    damping, test_solve_health); its GGN is not, and both solvers agree on it."""
    common = ("--curvature", "ggn", "--damping", "0")
    pcg, pcg_scores = run(tmp_path, "pcg", "--solver", "pcg", *common)
    _, cg_scores = run(tmp_path, "cg", "--solver", "cg", "--cg-tol", "1e-10", *common)
    assert pcg["config"]["curvature"] == "ggn"
    for system in ("fixed", "updated", "pretrain"):
        info = pcg["solver"][system]
        assert info["curvature"] == "ggn" and info["solver"] == "pcg", info
        assert info["negative_curvature_rows"] == 0
    np.testing.assert_allclose(pcg_scores, cg_scores, rtol=1e-4, atol=1e-6 * abs(cg_scores).max())
    assert np.corrcoef(pcg_scores, cg_scores)[0, 1] > 0.999999


def test_sampled_output_weights_have_the_loss_hessian_as_second_moment():
    """ggn_samples: w = L e with L L^T = d2h/df2, so E[w w^T] is the loss Hessian and an EK-FAC
    of the gradients J^T w approximates the GGN (the true Fisher for cross-entropy)."""
    from precompute.ekfac import ggn_samples

    model, data = model_and_data(n=4)
    batch = [t.repeat(20000, *[1] * (t.dim() - 1)) for t in data.tensors]  # each example 20000x
    w = ggn_samples(CE, model, batch, torch.Generator().manual_seed(0)).reshape(20000, 4, 3)
    second = torch.einsum("sbi,sbj->bij", w, w) / 20000
    p = model(data.tensors[0]).softmax(-1).detach()
    hessian = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    torch.testing.assert_close(second, hessian, rtol=0, atol=0.02 * hessian.abs().max().item())


@pytest.mark.parametrize("name", list(STANDARD_LOSSES))
def test_closed_form_samples_have_the_loss_hessian_as_second_moment(name):
    """The standard losses draw w in O(K) (a label from the model for cross-entropy, noise for
    squared error) instead of K products and an eigendecomposition per example: the second
    moment is the same loss Hessian L L^T that ggn_roots computes."""
    from precompute.ekfac import ggn_roots, ggn_samples
    from precompute.gauss_newton import STANDARD_SAMPLES

    model, data = model_and_data(n=4)
    x, y = data.tensors
    if name != "cross-entropy":  # float targets shaped like the outputs
        y = torch.randn(4, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    split = LossSplit(logits_of, STANDARD_LOSSES[name], name, STANDARD_SAMPLES[name])
    batch = [x.repeat(20000, 1), y.repeat(20000, *[1] * (y.dim() - 1))]
    w = ggn_samples(split, model, batch, torch.Generator().manual_seed(0)).reshape(20000, 4, 3)
    second = torch.einsum("sbi,sbj->bij", w, w) / 20000
    roots = ggn_roots(LossSplit(logits_of, STANDARD_LOSSES[name]), model, [x, y])
    hessian = roots @ roots.transpose(1, 2)
    torch.testing.assert_close(second, hessian, rtol=0, atol=0.03 * hessian.abs().max().item())


def test_a_recognised_loss_brings_its_sampler_and_root():
    task = TinyTask()
    split = loss_split(task, "pretrain", task.pretrained_model(), task.pretrain_data()[:8])
    from precompute.gauss_newton import STANDARD_ROOTS, STANDARD_SAMPLES

    assert split.sample is STANDARD_SAMPLES["cross-entropy"]
    assert split.root is STANDARD_ROOTS["cross-entropy"]


@pytest.mark.parametrize("name", list(STANDARD_LOSSES))
def test_closed_form_roots_are_roots_of_the_loss_hessian(name):
    """A standard loss's root L (split.root) gives L L^T = the loss Hessian in the outputs that
    ggn_roots otherwise takes by K forward-over-reverse products and an eigendecomposition."""
    from precompute.ekfac import ggn_roots
    from precompute.gauss_newton import STANDARD_ROOTS

    model, data = model_and_data(n=6)
    x, y = data.tensors
    if name != "cross-entropy":
        y = torch.randn(6, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    closed = ggn_roots(
        LossSplit(logits_of, STANDARD_LOSSES[name], name, root=STANDARD_ROOTS[name]), model, [x, y]
    )
    general = ggn_roots(LossSplit(logits_of, STANDARD_LOSSES[name], name), model, [x, y])
    assert general.shape == (6, 3, 3)
    # cross-entropy's Hessian has rank K - 1 (rows summing to zero): K - 1 columns carry it
    assert closed.shape == ((6, 3, 2) if name == "cross-entropy" else (6, 3, 3))
    hessian = general @ general.transpose(1, 2)
    torch.testing.assert_close(closed @ closed.transpose(1, 2), hessian, rtol=1e-12, atol=1e-14)


def test_the_cross_entropy_root_holds_for_confident_and_two_class_outputs():
    """The closed form where the last class takes nearly all the mass (the reflection's
    denominator at its largest), where another does, and for two classes (one column)."""
    from precompute.gauss_newton import STANDARD_ROOTS

    root = STANDARD_ROOTS["cross-entropy"]
    logits = torch.tensor([[0.0, 0.0, 30.0], [30.0, 0.0, 0.0], [1.0, -2.0, 0.5]]).double()
    for outputs in (logits, logits[:, :2]):
        p = outputs.softmax(-1)
        hessian = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        columns = root(outputs, None)
        assert columns.shape == (3, outputs.shape[1], outputs.shape[1] - 1)
        torch.testing.assert_close(columns @ columns.transpose(1, 2), hessian, rtol=0, atol=1e-15)


def test_ekfac_of_the_ggn_is_the_same_for_any_root_of_the_loss_hessian():
    """EK-FAC's factors and eigenvalue corrections sum over the columns k of squares of
    (J_i^T L_i e_k)-terms, so the closed-form root (K - 1 columns) and the eigendecomposition's
    (K columns) give one fit."""
    from precompute.ekfac import EKFAC
    from precompute.gauss_newton import STANDARD_ROOTS

    model, data = model_and_data(n=50)
    closed = LossSplit(logits_of, CE.loss_of_outputs, "test", root=STANDARD_ROOTS["cross-entropy"])
    fast = EKFAC(objective_for(model, data, split=closed), fisher="ggn").fit()
    slow = EKFAC(objective_for(model, data), fisher="ggn").fit()
    for a, b in zip(fast.blocks, slow.blocks, strict=True):
        torch.testing.assert_close(a.eigenvalues, b.eigenvalues, rtol=1e-10, atol=1e-13)
    rhs = torch.randn(3, fast.objective.size, dtype=torch.float64)
    torch.testing.assert_close(fast.solve(rhs, 0.1), slow.solve(rhs, 0.1), rtol=1e-10, atol=1e-12)


def test_pcg_on_the_ggn_fits_its_preconditioner_to_the_ggn():
    from precompute.curvature import SolveConfig, solve

    model, data = model_and_data()
    objective = objective_for(model, data, reg=0.01)
    rhs = torch.randn(3, objective.size, dtype=torch.float64)
    x, info = solve(objective, rhs, SolveConfig("pcg", 0.0, cg_tol=1e-10, preconditioner="ekfac"))
    assert info["preconditioner"] == "ekfac (GGN)"
    dense = explicit_hessian(objective.hvp, objective.size, rhs)
    torch.testing.assert_close(x, torch.linalg.solve(dense, rhs.T).T, rtol=1e-7, atol=1e-10)


def test_ekfac_on_the_ggn_approximates_the_ggn_not_the_empirical_fisher():
    """With --curvature ggn, `ekfac` fits EK-FAC to the Gauss-Newton matrix (ggn_roots). Where
    labels disagree with a confident model the empirical Fisher (the task's own gradients) is
    far larger than the GGN, and its EK-FAC solves the GGN system much worse."""
    from precompute.curvature import SolveConfig, solve

    model, data = model_and_data(n=200)
    x, _ = data.tensors
    with torch.no_grad():  # a confident model, and labels that are not its own
        model.head.weight.mul_(20.0)
        y = (model(x).argmax(1) + 1) % 3
    data = torch.utils.data.TensorDataset(x, y)
    ggn = objective_for(model, data, reg=0.01)
    rhs = torch.randn(4, ggn.size, dtype=torch.float64)
    exact = torch.linalg.solve(explicit_hessian(ggn.hvp, ggn.size, rhs), rhs.T).T
    fitted, info = solve(ggn, rhs, SolveConfig("ekfac", 0.0))
    assert info["curvature"] == "Gauss-Newton (EK-FAC)"
    empirical, info = solve(objective_for(model, data, reg=0.01, curvature="hessian", split=None),
                            rhs, SolveConfig("ekfac", 0.0))  # fmt: skip
    assert info["curvature"] == "empirical Fisher (EK-FAC)"
    error = [float((s - exact).norm() / exact.norm()) for s in (fitted, empirical)]
    assert error[0] < 0.6 * error[1] and error[0] < 0.5, error  # [0.36, 0.70] when written


def test_one_forward_for_every_column_fits_what_a_forward_per_column_fits(monkeypatch):
    """The exact GGN fit backpropagates every column of the loss Hessian's root through one
    forward (layers.weighted_output_calls); a forward per column gives the same EK-FAC."""
    from precompute.ekfac import EKFAC, network_outputs
    from precompute.layers import layer_calls

    model, data = model_and_data(n=50)
    fast = EKFAC(objective_for(model, data), fisher="ggn").fit()

    def a_forward_per_column(self, item):
        batch, weights_of = item
        outputs = network_outputs(self.objective.split, self.model, batch)
        for w in weights_of(outputs, batch):
            yield layer_calls(self.model, self.loss_fn, [batch, w], self.modules)[1]

    monkeypatch.setattr(EKFAC, "_calls", a_forward_per_column)
    slow = EKFAC(objective_for(model, data), fisher="ggn").fit()
    assert len(fast.blocks) == 2
    for a, b in zip(fast.blocks, slow.blocks, strict=True):
        torch.testing.assert_close(a.eigenvalues, b.eigenvalues, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(a.q_s.abs(), b.q_s.abs(), rtol=1e-10, atol=1e-12)
    rhs = torch.randn(3, fast.objective.size, dtype=torch.float64)
    torch.testing.assert_close(fast.solve(rhs, 0.1), slow.solve(rhs, 0.1), rtol=1e-10, atol=1e-12)


def test_ekfac_of_the_hessian_fits_the_true_fisher_where_the_loss_splits():
    """Solving with the Hessian, `ekfac` still fits EK-FAC to the Gauss-Newton matrix (for
    cross-entropy the true Fisher) when the loss splits. At the optimum of a confident, right
    model the Hessian is nearly that matrix, while the empirical Fisher is far smaller (an
    example predicted with probability 1 - e gives it O(e^2) against the Fisher's O(e)), so its
    EK-FAC inverse is far too large. Right-hand sides: training examples' gradients."""
    from precompute.curvature import SolveConfig, solve

    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 4, generator=g, dtype=torch.float64)
    y = (x @ torch.randn(4, 3, generator=g, dtype=torch.float64)).argmax(1)  # separable
    torch.manual_seed(0)
    model = TinyNet(3, hidden=6).double()
    reg = 1e-3

    def objective():
        penalty = sum((p**2).sum() for p in model.parameters())
        return F.cross_entropy(model(x), y) + reg / 2 * penalty

    minimise(objective, list(model.parameters()))
    data = torch.utils.data.TensorDataset(x, y)
    hessian = objective_for(model, data, reg=reg, curvature="hessian")
    single = torch.func.grad(lambda t, xi, yi: hessian.loss(t, (xi[None], yi[None]))[0])
    rhs = torch.func.vmap(single, (None, 0, 0))(hessian.theta, x[:8], y[:8])
    dense = explicit_hessian(hessian.hvp, hessian.size, rhs)
    assert torch.linalg.eigvalsh(dense)[0] > 0  # at the optimum
    exact = torch.linalg.solve(dense, rhs.T).T
    fitted, info = solve(hessian, rhs, SolveConfig("ekfac", 0.0))
    assert info["curvature"] == "Gauss-Newton (EK-FAC)"
    unsplit = objective_for(model, data, reg=reg, curvature="hessian", split=None)
    empirical, info = solve(unsplit, rhs, SolveConfig("ekfac", 0.0))
    assert info["curvature"] == "empirical Fisher (EK-FAC)"
    error = [float((s - exact).norm() / exact.norm()) for s in (fitted, empirical)]
    scale = [float(s.norm() / exact.norm()) for s in (fitted, empirical)]
    # when written: errors [0.90, 2.40], scales [0.985, 2.82]
    assert error[1] > 2 * error[0], error
    assert 0.7 < scale[0] < 1.4 and scale[1] > 2, scale


def test_a_hessian_system_takes_the_split_when_there_is_one_and_runs_without_it():
    """curvature_objective attaches the recognised split to a Hessian system (for EK-FAC), and a
    loss that does not split leaves the Hessian solvers working, on the empirical Fisher."""
    from precompute.curvature import SolveConfig
    from precompute.influence import curvature_objective

    config = SolveConfig("ekfac")
    for task, source in ((TinyTask(), "cross-entropy of model(batch[0])"), (UnsplitTask(), None)):
        model = task.pretrained_model()
        space = ParamSpace.of(model, [n for n, _ in model.named_parameters()])
        reg = torch.zeros(space.size, dtype=torch.float64)
        objective = curvature_objective(
            task, "pretrain", model, task.pretrain_data(), space, reg, config, 16
        )
        assert objective.curvature == "hessian"
        assert (objective.split.source if objective.split else None) == source


def test_sampled_fit_draws_depend_on_the_block_alone():
    """Past GGN_EXACT_OUTPUTS outputs the EK-FAC fit draws output weights from a generator
    seeded by the block's first example: a block gives the same sums whatever was summed before
    it, so blocks summed on Ray workers equal the local fit's."""
    from precompute.ekfac import EKFAC, GGN_EXACT_OUTPUTS

    torch.manual_seed(0)
    model = TinyNet(GGN_EXACT_OUTPUTS + 4).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, GGN_EXACT_OUTPUTS + 4, (64,), generator=g)
    split = loss_split(TinyTask(), "pretrain", model, (x[:8], y[:8]))
    objective = objective_for(model, torch.utils.data.TensorDataset(x, y), split=split)
    fitter = EKFAC(objective, fisher="ggn")
    first = fitter.partial("factors", None, range(16, 48))
    fitter.partial("factors", None, range(0, 16))
    again = fitter.partial("factors", None, range(16, 48))
    other = fitter.partial("factors", None, range(32, 64))
    for (a, s), (a2, s2), (_, s3) in zip(first, again, other, strict=True):
        assert torch.equal(a, a2) and torch.equal(s, s2)
        assert not torch.equal(s, s3)


def test_a_hessian_system_keeps_the_empirical_fisher_where_the_ggn_fit_is_dear():
    """Hooks with many outputs per example (a language model's logits) and no closed-form
    draws: for a Hessian system EK-FAC keeps the empirical Fisher rather than build every
    example's loss Hessian; asked for the GGN (--curvature ggn), it fits the GGN."""
    from precompute.curvature import _fit_ekfac
    from precompute.ekfac import GGN_EXACT_OUTPUTS

    model, data = model_and_data()
    wide = TinyNet(GGN_EXACT_OUTPUTS + 1).double()
    hooks = LossSplit(logits_of, STANDARD_LOSSES["cross-entropy"], "hooks")  # no sampler
    assert _fit_ekfac(objective_for(wide, data, split=hooks, curvature="hessian")).fisher == (
        "empirical"
    )
    assert _fit_ekfac(objective_for(wide, data, split=hooks, curvature="ggn")).fisher == "ggn"
    assert _fit_ekfac(objective_for(model, data, split=hooks, curvature="hessian")).fisher == "ggn"
