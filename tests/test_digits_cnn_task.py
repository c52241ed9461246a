"""The built-in digits-cnn task: the digits data, the conv model, trained optima, caching, and
leave-one-out retraining through its fit hooks against the scores of a precompute run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from precompute.task import MultiStageTask, has_hook, load_task
from precompute.tasks.digits import DigitsTask
from precompute.tasks.digits_cnn import DigitsCNN, DigitsCNNTask

GRAD_TOL = 1e-8  # what the influence engine needs; the task trains to grad_tol = 1e-10
SHARED = [
    "encoder.conv1.weight",
    "encoder.conv1.bias",
    "encoder.conv2.weight",
    "encoder.conv2.bias",
]


@pytest.fixture
def task(monkeypatch, tmp_path) -> DigitsCNNTask:
    monkeypatch.setenv("MSIF_CACHE", str(tmp_path / "cache"))
    return DigitsCNNTask()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The task with its three models trained into a temporary cache (kept set for the module)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MSIF_CACHE", str(tmp_path_factory.mktemp("msif_cache")))
        task = DigitsCNNTask()
        models = {
            "pretrained": task.pretrained_model(),
            "fixed": task.finetuned_model("fixed"),
            "updated": task.finetuned_model("updated"),
        }
        yield task, models


def _full(dataset):
    return next(iter(torch.utils.data.DataLoader(dataset, batch_size=len(dataset))))


def _norm(grads) -> float:
    return float(torch.sqrt(sum((g * g).sum() for g in grads)))


# --------------------------------------------------------------------------------- fast tests
def test_registered_builtin_with_fit_hooks():
    task = load_task("digits-cnn")
    assert isinstance(task, DigitsCNNTask) and isinstance(task, MultiStageTask)
    assert task.name == "digits-cnn" and task.scenarios == ("fixed", "updated")
    assert task.pretrain_l2 > 0 and task.finetune_l2 > 0 and task.proximal_alpha > 0
    assert has_hook(task, "fit_pretrained") and has_hook(task, "fit_finetuned")


def test_same_data_and_split_as_digits(task):
    digits = DigitsTask()
    sizes = [len(task.pretrain_data()), len(task.finetune_train_data())]
    assert sizes + [len(task.finetune_test_data())] == [901, 350, 546]
    for split in ("pretrain", "finetune_train", "test"):
        assert np.array_equal(task.source_indices(split), digits.source_indices(split))
    for ours, theirs in (
        (task.pretrain_data(), digits.pretrain_data()),
        (task.finetune_test_data(), digits.finetune_test_data()),
    ):
        x, y = _full(ours)
        x_digits, y_digits = _full(theirs)
        assert x.shape[1:] == (64,) and x.dtype == torch.float64
        assert torch.equal(x, x_digits) and torch.equal(y, y_digits)
    assert task.describe("test", 5)["label_name"] == digits.describe("test", 5)["label_name"]


def test_model_is_a_small_cnn_whose_shared_part_is_the_convolutions(task):
    model = DigitsCNN(task.channels)
    params = dict(model.named_parameters())
    assert task.shared_parameters() == SHARED
    assert sorted(set(params) - set(SHARED)) == ["head.bias", "head.weight"]
    assert sum(p.numel() for p in params.values()) == 701  # exact solver: up to 4096
    assert all(p.dtype == torch.float64 for p in params.values())
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    conv_params = {id(p) for m in convs for p in m.parameters()}
    assert conv_params == {id(params[n]) for n in SHARED}
    assert [tuple(m.weight.shape) for m in convs] == [(4, 1, 3, 3), (8, 4, 3, 3)]


def test_convolutions_are_called_as_modules(task):
    """The conv layers run through nn.Conv2d.forward (so per-layer rules can hook them), with
    the [B, 1, 8, 8] and [B, 4, 8, 8] inputs of the unflattened images."""
    torch.manual_seed(0)
    model = DigitsCNN(task.channels)
    seen = []
    for module in (model.encoder.conv1, model.encoder.conv2):
        module.register_forward_hook(lambda m, i, o: seen.append((tuple(i[0].shape), o.shape)))
    batch = next(iter(torch.utils.data.DataLoader(task.pretrain_data(), batch_size=6)))
    task.pretrain_loss(model, batch)
    assert seen == [((6, 1, 8, 8), (6, 4, 8, 8)), ((6, 4, 8, 8), (6, 8, 3, 3))]


def test_losses_outputs_and_functional_call(task):
    torch.manual_seed(0)
    model = DigitsCNN(task.channels)
    batch = next(iter(torch.utils.data.DataLoader(task.finetune_test_data(), batch_size=9)))
    loss = task.finetune_loss(model, batch)
    logits = task.finetune_logits(model, batch)
    assert loss.shape == (9,) and logits.shape == (9, 5) and logits.dtype == torch.float64
    assert task.represent(model, batch).shape == (9, 72)
    torch.testing.assert_close(loss, F.cross_entropy(logits, batch[1], reduction="none"))

    # substituted parameters are the ones used: all zeros give uniform logits, log 5 loss
    zeros = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    out = functional_call(model, zeros, (batch[0],))
    assert torch.all(out == 0)

    def conv_loss(values):
        return task.pretrain_loss(_Substituted(model, values), batch).sum()

    shared = {n: p.detach() for n, p in model.named_parameters() if n in SHARED}
    grads = torch.func.grad(conv_loss)(shared)
    direct = torch.autograd.grad(
        task.pretrain_loss(model, batch).sum(), [dict(model.named_parameters())[n] for n in SHARED]
    )
    for name, g in zip(SHARED, direct, strict=True):
        torch.testing.assert_close(grads[name], g)
        assert float(g.abs().max()) > 0


class _Substituted(torch.nn.Module):
    """`model` with some parameters replaced (torch.func.functional_call) at each call."""

    def __init__(self, model, values):
        super().__init__()
        self.model, self.values = model, values
        self.head = model.head  # the task reads the dtype and device of head.weight

    def forward(self, x):
        return functional_call(self.model, self.values, (x,))


def test_cache_dir_is_its_own_and_follows_the_architecture(task, tmp_path):
    folder = task.cache_dir()
    assert folder.parent == tmp_path / "cache" and folder.name.startswith("digits-cnn-")
    assert folder != DigitsTask().cache_dir()
    wider = DigitsCNNTask()
    wider.channels = (4, 16)
    assert wider.cache_dir() != folder
    assert DigitsCNNTask().cache_dir() == folder


# --------------------------------------------------------------------------------- slow tests
@pytest.mark.slow
def test_objective_gradients_vanish_at_returned_models(trained):
    """Each objective of docs/design.md section 2, written out here independently of the task."""
    task, models = trained
    lp, lf, a = task.pretrain_l2, task.finetune_l2, task.proximal_alpha
    pre = models["pretrained"]
    xp, yp = _full(task.pretrain_data())
    params = list(pre.parameters())
    g_obj = F.cross_entropy(pre(xp), yp) + lp / 2 * sum((p**2).sum() for p in params)
    norms = {"pretrained": _norm(torch.autograd.grad(g_obj, params))}

    x, y = _full(task.finetune_train_data())
    head = list(models["fixed"].head.parameters())
    f_obj = F.cross_entropy(models["fixed"](x), y) + lf / 2 * sum((p**2).sum() for p in head)
    norms["fixed"] = _norm(torch.autograd.grad(f_obj, head))

    upd = models["updated"]
    w, t = list(upd.encoder.parameters()), list(upd.head.parameters())
    w_pt = [p.detach() for p in pre.encoder.parameters()]
    u_obj = (
        F.cross_entropy(upd(x), y)
        + lf / 2 * sum((p**2).sum() for p in w + t)
        + a / 2 * sum(((p - q) ** 2).sum() for p, q in zip(w, w_pt, strict=True))
    )
    norms["updated"] = _norm(torch.autograd.grad(u_obj, w + t))
    print("gradient norms:", {k: f"{v:.2e}" for k, v in norms.items()})
    assert all(v < GRAD_TOL for v in norms.values()), norms
    for key in ("pretrained", "finetuned-fixed", "finetuned-updated"):
        assert task.fit_info[key]["grad_norm"] <= task.grad_tol
    # FIXED keeps the pretrained convolutions exactly; UPDATED moves them
    for n, v in models["fixed"].encoder.state_dict().items():
        assert torch.equal(v, pre.encoder.state_dict()[n])
    moved = sum(float((p - q).detach().norm()) for p, q in zip(w, w_pt, strict=True))
    assert moved > 1e-3


@pytest.mark.slow
def test_finetuned_models_classify_the_new_digits(trained):
    task, models = trained
    x, y = _full(task.finetune_test_data())
    with torch.no_grad():
        accuracy = {
            s: float((task.finetune_logits(models[s], [x, y]).argmax(1) == y).double().mean())
            for s in ("fixed", "updated")
        }
    print("test accuracy:", accuracy)
    assert accuracy["fixed"] >= 0.93 and accuracy["updated"] >= 0.93, accuracy


@pytest.mark.slow
def test_cache_loads_identical_models_without_training(trained, monkeypatch):
    task, models = trained
    names = {p.name for p in task.cache_dir().iterdir()}
    assert {"pretrained.pt", "finetuned-fixed.pt", "finetuned-updated.pt"} <= names

    def no_training(*args, **kwargs):
        raise AssertionError("a cached model was retrained")

    monkeypatch.setattr(DigitsCNNTask, "_minimise", no_training)
    fresh = DigitsCNNTask()
    for key, name in (
        ("pretrained", "pretrained"),
        ("fixed", "finetuned-fixed"),
        ("updated", "finetuned-updated"),
    ):
        model = fresh.pretrained_model() if key == "pretrained" else fresh.finetuned_model(key)
        assert isinstance(model, DigitsCNN) and not model.training
        a, b = model.state_dict(), models[key].state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert fresh.fit_info[name]["cached"] is True
        assert fresh.fit_info[name]["grad_norm"] == task.fit_info[name]["grad_norm"]


@pytest.mark.slow
def test_leave_one_out_retraining_matches_the_scores_of_a_run(trained, tmp_path):
    """Retrain both stages without each of 4 pretraining examples through the fit hooks; the
    change of every test loss against score(z, t) of an `exact` precompute run."""
    from precompute.pipeline import PrecomputeConfig, precompute
    from precompute.rundir import read_table

    task, _ = trained
    config = PrecomputeConfig(solver="exact", damping=0.0, maps=False, full_scores="on")
    run = precompute(task, tmp_path / "run", config, log=lambda message: None)
    scores = read_table(run, "scores")
    m, q = len(task.pretrain_data()), len(task.finetune_test_data())
    predicted = {
        s: torch.as_tensor(
            g.sort_values(["test_id", "pretrain_id"])["score"].to_numpy(np.float64)
        ).reshape(q, m)
        for s, g in scores.groupby("scenario")
    }
    first = predicted["fixed"][0]
    chosen = [int(first.argmax()), int(first.argmin()), 100, 600]  # strongest of test 0, others

    xt, yt = _full(task.finetune_test_data())
    everything = torch.ones(m, dtype=torch.bool)
    base_pre = task.fit_pretrained(everything)
    base = {s: task.finetune_loss(task.fit_finetuned(base_pre, s), (xt, yt)) for s in predicted}
    actual = {s: [] for s in predicted}
    for z in chosen:
        keep = everything.clone()
        keep[z] = False
        refit = task.fit_pretrained(keep)
        assert task.fit_info["fit_pretrained"]["grad_norm"] <= GRAD_TOL
        for s in predicted:
            loss = task.finetune_loss(task.fit_finetuned(refit, s), (xt, yt))
            actual[s].append((loss - base[s]).detach())
    for s in predicted:
        p = predicted[s][:, chosen].reshape(-1).numpy()
        a = torch.stack(actual[s], 1).reshape(-1).numpy()
        pearson = float(np.corrcoef(p, a)[0, 1])
        slope = float(p @ a / (p @ p))
        print(f"{s}: {len(p)} pairs, Pearson {pearson:.3f}, slope {slope:.3f}")
        assert pearson >= 0.8, (s, pearson)
        assert 0.8 <= slope <= 2.5, (s, slope)
        # the strongest helpful example of test 0 raises its loss when removed, and conversely
        assert actual[s][0][0] > 0 and actual[s][1][0] < 0
