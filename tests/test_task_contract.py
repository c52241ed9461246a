"""The task contract as a class: required methods abstract, optional hooks declared and detected,
and the shared base of the built-in tasks (caching, fit hooks)."""

from __future__ import annotations

import importlib
import inspect
import textwrap

import pytest
import torch
import torch.nn.functional as F
from tiny_task import TinyTask
from torch import nn
from torch.utils.data import TensorDataset

from precompute.task import (
    BUILTIN_TASKS,
    OPTIONAL_HOOKS,
    REQUIRED_METHODS,
    MultiStageTask,
    TaskError,
    call,
    has_hook,
    load_task,
)
from precompute.tasks.base import BuiltinTask


class Complete(MultiStageTask):
    """Every required method, no optional hook."""

    name = "complete"

    def pretrain_data(self):
        return TensorDataset(torch.zeros(3, 2))

    def finetune_train_data(self):
        return TensorDataset(torch.zeros(3, 2))

    def finetune_test_data(self):
        return TensorDataset(torch.zeros(3, 2))

    def pretrained_model(self):
        return nn.Linear(2, 2)

    def finetuned_model(self, scenario):
        return nn.Linear(2, 2)

    def shared_parameters(self):
        return ["weight"]

    def pretrain_loss(self, model, batch):
        return model(batch[0]).sum(1)

    def finetune_loss(self, model, batch):
        return model(batch[0]).sum(1)

    def finetune_logits(self, model, batch):
        return model(batch[0])

    def represent(self, model, batch):
        return batch[0]

    def describe(self, split, index):
        return {"label": index, "label_name": f"{split}-{index}", "text": None, "image": None}


# ------------------------------------------------------------------------- the abstract class
def test_required_methods_are_exactly_the_abstract_ones():
    assert inspect.isabstract(MultiStageTask)
    assert MultiStageTask.__abstractmethods__ == frozenset(REQUIRED_METHODS)
    assert len(REQUIRED_METHODS) == 11
    with pytest.raises(TypeError):
        MultiStageTask()
    assert not inspect.isabstract(Complete) and not inspect.isabstract(TinyTask)


def test_optional_hooks_are_declared_with_signatures_and_docstrings():
    expected = {
        "fit_pretrained": ["self", "keep"],
        "fit_finetuned": ["self", "pretrained_model", "scenario"],
        "describe_many": ["self", "split", "indices"],
        "pretrain_outputs": ["self", "model", "batch"],
        "pretrain_loss_from_outputs": ["self", "outputs", "batch"],
        "finetune_outputs": ["self", "model", "batch"],
        "finetune_loss_from_outputs": ["self", "outputs", "batch"],
    }
    for name, params in expected.items():
        method = inspect.getattr_static(MultiStageTask, name)
        assert inspect.isfunction(method), name
        assert list(inspect.signature(method).parameters) == params
        assert len(inspect.getdoc(method)) > 40, name
        assert name not in MultiStageTask.__abstractmethods__
    assert "finetune_class_names" in MultiStageTask.__annotations__
    assert MultiStageTask.finetune_class_names is None
    assert set(OPTIONAL_HOOKS) == {*expected, "finetune_class_names"}


def test_missing_method_gives_one_sentence_from_load_task(tmp_path):
    path = tmp_path / "partial.py"
    path.write_text(
        textwrap.dedent(
            """
            from precompute import MultiStageTask

            class Partial(MultiStageTask):
                def pretrain_data(self): ...
                def finetune_train_data(self): ...
                def finetune_test_data(self): ...
                def pretrained_model(self): ...
                def finetuned_model(self, scenario): ...
                def shared_parameters(self): ...
                def pretrain_loss(self, model, batch): ...
                def finetune_loss(self, model, batch): ...
                def finetune_logits(self, model, batch): ...
            """
        )
    )
    with pytest.raises(TaskError) as error:
        load_task(f"{path}:Partial")
    message = str(error.value)
    # contract order, one line, no TypeError text from instantiating an abstract class
    assert message == f"task '{path}:Partial' does not implement represent, describe"
    assert "\n" not in message and "abstract" not in message


def test_complete_task_loads_from_a_module_spec():
    task = load_task(f"{__name__}:Complete")
    assert isinstance(task, Complete) and task.name == "complete"


# ------------------------------------------------------------------------------ optional hooks
def test_hooks_absent_on_a_task_without_them():
    task = Complete()
    assert [has_hook(task, name) for name in OPTIONAL_HOOKS] == [False] * len(OPTIONAL_HOOKS)
    keep = torch.ones(3, dtype=torch.bool)
    with pytest.raises(TaskError, match=r"^task 'complete' has no fit_pretrained\(\) hook"):
        task.fit_pretrained(keep)
    # call() passes the default's sentence through unchanged instead of wrapping it
    with pytest.raises(TaskError) as error:
        call(task, "fit_finetuned", None, "fixed")
    assert str(error.value) == "task 'complete' has no fit_finetuned() hook, needed to retrain"


def test_describe_many_default_loops_over_describe():
    assert Complete().describe_many("test", [2, 0]) == [
        {"label": 2, "label_name": "test-2", "text": None, "image": None},
        {"label": 0, "label_name": "test-0", "text": None, "image": None},
    ]


def test_hooks_present_when_a_task_provides_them():
    tiny = TinyTask()
    assert has_hook(tiny, "fit_pretrained") and has_hook(tiny, "fit_finetuned")
    assert not has_hook(tiny, "describe_many") and not has_hook(tiny, "finetune_class_names")

    class Named(Complete):
        finetune_class_names = {0: "zero", 1: "one"}

        def describe_many(self, split, indices):
            return [self.describe(split, i) for i in indices]

    class NamedByProperty(Complete):
        @property
        def finetune_class_names(self):
            return {0: "zero"}

    class NamedPerInstance(Complete):
        def __init__(self):
            self.finetune_class_names = {0: "zero"}

    assert has_hook(Named(), "describe_many") and has_hook(Named(), "finetune_class_names")
    assert has_hook(NamedByProperty(), "finetune_class_names")
    assert has_hook(NamedPerInstance(), "finetune_class_names")
    with pytest.raises(ValueError, match="not an optional hook"):
        has_hook(tiny, "describe")


def test_builtin_tasks_are_registered_and_provide_the_fit_hooks():
    assert BUILTIN_TASKS["digits-cnn"] == "precompute.tasks.digits_cnn:DigitsCNNTask"
    assert BUILTIN_TASKS["news-bert"] == "precompute.tasks.news_bert:NewsBertTask"
    for name in ("digits", "digits-cnn", "news"):  # not news-bert: another module, maybe absent
        module, _, cls_name = BUILTIN_TASKS[name].partition(":")
        cls = getattr(importlib.import_module(module), cls_name)
        assert issubclass(cls, BuiltinTask) and not inspect.isabstract(cls), name
        assert cls.name == name
    for name in ("digits", "digits-cnn"):  # cheap to construct: no data read, nothing trained
        task = load_task(name)
        assert has_hook(task, "fit_pretrained") and has_hook(task, "fit_finetuned")
        assert not has_hook(task, "describe_many")


# -------------------------------------------------------------------- the built-in tasks' base
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(2, 2)
        self.head = nn.Linear(2, 2)

    def forward(self, x):
        return self.head(self.encoder(x))


class CountingTask(BuiltinTask):
    """A BuiltinTask whose 'training' writes a known value and counts its calls."""

    name = "counting"
    width = 1.0
    cache_fields = (*BuiltinTask.cache_fields, "width")

    def __init__(self):
        super().__init__()
        self.trained = []
        x = torch.arange(10.0).reshape(5, 2)
        self.data = TensorDataset(x, torch.tensor([0, 1, 0, 1, 1]))

    def pretrain_data(self):
        return self.data

    def finetune_train_data(self):
        return self.data

    def finetune_test_data(self):
        return self.data

    def shared_parameters(self):
        return ["encoder.weight", "encoder.bias"]

    def pretrain_loss(self, model, batch):
        return F.cross_entropy(model(batch[0]), batch[1], reduction="none")

    finetune_loss = pretrain_loss

    def finetune_logits(self, model, batch):
        return model(batch[0])

    def represent(self, model, batch):
        return model.encoder(batch[0])

    def describe(self, split, index):
        return {"label": None, "label_name": None, "text": str(index), "image": None}

    def new_pretrain_model(self):
        return Net()

    def new_finetune_model(self):
        return Net()

    def _train_pretrained(self, keep=None, init=None):
        self.trained.append(("pretrained", None if keep is None else int(keep.sum())))
        model = Net()
        with torch.no_grad():  # a value that depends on the kept count
            for p in model.parameters():
                p.fill_(self.width * (5 if keep is None else int(keep.sum())))
        return model, {"grad_norm": 0.0}

    def _train_finetuned(self, pretrained, scenario, init=None):
        self.trained.append((scenario, init is not None))
        model = Net()
        model.encoder.load_state_dict(pretrained.encoder.state_dict())
        with torch.no_grad():
            model.head.weight.fill_(1.0 if scenario == "fixed" else 2.0)
        return model, {"grad_norm": 0.5}


def test_base_caches_models_and_reuses_them(monkeypatch, tmp_path):
    monkeypatch.setenv("MSIF_CACHE", str(tmp_path))
    task = CountingTask()
    assert task.cache_dir().parent == tmp_path and task.cache_dir().name.startswith("counting-")
    first = task.pretrained_model()
    assert first.encoder.weight[0, 0].item() == 5.0 and not first.training
    assert task.pretrained_model() is not first  # a fresh copy each time
    fixed = task.finetuned_model("fixed")
    assert fixed.head.weight[0, 0].item() == 1.0
    assert torch.equal(fixed.encoder.weight, first.encoder.weight)
    assert task.trained == [("pretrained", None), ("fixed", False)]
    assert {p.name for p in task.cache_dir().iterdir()} == {
        "pretrained.pt",
        "pretrained.json",
        "finetuned-fixed.pt",
        "finetuned-fixed.json",
    }

    again = CountingTask()  # a new instance reads the files: no training, records come along
    assert again.finetuned_model("fixed").head.weight[0, 0].item() == 1.0
    assert again.trained == []
    assert again.fit_info["finetuned-fixed"] == {"grad_norm": 0.5, "cached": True}

    other = CountingTask()
    other.width = 2.0  # a cache field: a different folder, so trained anew
    assert other.cache_dir() != task.cache_dir()
    assert other.pretrained_model().encoder.weight[0, 0].item() == 10.0
    with pytest.raises(ValueError, match="unknown scenario 'frozen'"):
        task.finetuned_model("frozen")


def test_base_fit_hooks_retrain_without_caching(monkeypatch, tmp_path):
    monkeypatch.setenv("MSIF_CACHE", str(tmp_path))
    task = CountingTask()
    keep = torch.tensor([True, False, True, True, True])
    refit = task.fit_pretrained(keep)
    assert refit.encoder.weight[0, 0].item() == 4.0
    assert task.fit_info["fit_pretrained"] == {"grad_norm": 0.0}
    updated = task.fit_finetuned(refit, "updated")
    assert torch.equal(updated.encoder.weight, refit.encoder.weight)
    assert updated.head.weight[0, 0].item() == 2.0
    # the hooks warm-start from the cached optima (trained once), and cache nothing themselves
    assert task.trained == [
        ("pretrained", None),
        ("pretrained", 4),
        ("updated", False),
        ("updated", True),
    ]
    assert "fit_pretrained.pt" not in {p.name for p in task.cache_dir().iterdir()}
    with pytest.raises(ValueError, match=r"keep must be a bool tensor of shape \(5,\)"):
        task.fit_pretrained(torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="removes every pretraining example"):
        task.fit_pretrained(torch.zeros(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="unknown scenario"):
        task.fit_finetuned(refit, "frozen")
