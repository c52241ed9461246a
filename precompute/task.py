"""The task contract: how a user describes a pretrain/finetune setup to msif.

A task names the data of both stages, the trained models, which parameters are SHARED (W, the
pretrained embedding reused by finetuning) and the per-example losses. Everything else about a
model is the task's business. See docs/design.md section 4.

`MultiStageTask` is an abstract base class: its 11 required methods are abstract, and its
optional hooks are declared with defaults that mark them as not provided, so that `has_hook`
tells whether a task supplies one (an editor or type checker shows both from the class).
"""

from __future__ import annotations

import abc
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

SCENARIOS = ("fixed", "updated")

BUILTIN_TASKS = {
    "digits": "precompute.tasks.digits:DigitsTask",
    "digits-cnn": "precompute.tasks.digits_cnn:DigitsCNNTask",
    "news": "precompute.tasks.news:NewsTask",
    "news-bert": "precompute.tasks.news_bert:NewsBertTask",
}

_F = TypeVar("_F", bound=Callable[..., Any])
_DEFAULT_HOOK = "__msif_default_hook__"  # marks the base class's "not provided" defaults


class TaskError(ValueError):
    """A task (or its data or models) breaks the contract; the message is one sentence."""


def _default_hook(method: _F) -> _F:
    """Mark `method` as the base class's stand-in for an optional hook a task did not provide."""
    setattr(method, _DEFAULT_HOOK, True)
    return method


class MultiStageTask(abc.ABC):
    """Base class of every msif task. Subclass it and implement the abstract methods below.

    Notation (docs/design.md section 2): W = shared parameters, U = pretraining-only parameters,
    T = finetuning-only parameters. Pretraining minimises
    G(W, U) = (1/m) sum_i g(z_i; W, U) + (pretrain_l2/2)(|W|^2 + |U|^2); finetuning minimises
    (1/n) sum_j f(x_j; W, T) + (finetune_l2/2)|T|^2 over T (FIXED) or, in UPDATED, over (W, T)
    with (finetune_l2/2)|W|^2 + (proximal_alpha/2)|W - W_pt|^2 added.

    Required: the 11 abstract methods (`REQUIRED_METHODS`). Optional (`OPTIONAL_HOOKS`, ask
    `has_hook(task, name)` whether a task provides one): `fit_pretrained` and `fit_finetuned`
    (validation by retraining), `finetune_class_names`, `describe_many`, and the Gauss-Newton
    split of each loss (`pretrain_outputs` with `pretrain_loss_from_outputs`, `finetune_outputs`
    with `finetune_loss_from_outputs`; `--curvature ggn`, precompute.gauss_newton).
    """

    name: str = "task"
    scenarios: tuple[str, ...] = SCENARIOS
    pretrain_l2: float = 0.0
    finetune_l2: float = 0.0
    proximal_alpha: float = 1.0

    # ------------------------------------------------------------------- data (required)
    # map-style datasets; batches come from a DataLoader with default collation
    @abc.abstractmethod
    def pretrain_data(self) -> torch.utils.data.Dataset:
        """The m pretraining examples z_1..z_m (map-style, with a length)."""

    @abc.abstractmethod
    def finetune_train_data(self) -> torch.utils.data.Dataset:
        """The n finetuning training examples x_1..x_n (map-style, with a length)."""

    @abc.abstractmethod
    def finetune_test_data(self) -> torch.utils.data.Dataset:
        """The finetuning test examples t whose predictions are explained."""

    # ----------------------------------------------------------------- models (required)
    @abc.abstractmethod
    def pretrained_model(self) -> torch.nn.Module:
        """The trained pretrained model (W_pt, U_pt)."""

    @abc.abstractmethod
    def finetuned_model(self, scenario: str) -> torch.nn.Module:
        """The trained finetuned model (W, T) of `scenario` ("fixed": W = W_pt; "updated")."""

    @abc.abstractmethod
    def shared_parameters(self) -> list[str]:
        """Names (as in named_parameters()) of W's parameters, present in every model."""

    # ------------------------------------------------ losses and outputs, per example (required)
    @abc.abstractmethod
    def pretrain_loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        """Per-example pretraining loss g(z; W, U), shape [B]."""

    @abc.abstractmethod
    def finetune_loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        """Per-example finetuning loss f(x; W, T), shape [B]."""

    @abc.abstractmethod
    def finetune_logits(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        """Class logits of the finetuned model, shape [B, C]."""

    @abc.abstractmethod
    def represent(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        """Shared representation, shape [B, d] (used for the embedding maps)."""

    @abc.abstractmethod
    def describe(self, split: str, index: int) -> dict:
        """{"label", "label_name", "text", "image"} of one example; split is pretrain or test.

        label: int or None; label_name: str or None; text: str or None; image: an HxW or HxWxC
        uint8 array, or None.
        """

    # ------------------------------------------------------------------- optional hooks
    finetune_class_names: dict[int, str] | None = None
    """{class id: name} of the finetuning classes, or None (the default): then the names come
    from the `label_name` of the test examples. A dict attribute or a property."""

    @_default_hook
    def fit_pretrained(self, keep: torch.Tensor) -> torch.nn.Module:
        """Retrain the pretraining stage on the examples where `keep` is True; return the model.

        `keep` is a bool tensor of shape [m]. The data term keeps the full count m,
        (1/m) sum_{i kept} g(z_i), so that removing z is upweighting it by -1/m, the change the
        score predicts. Used by `msif validate` (with `fit_finetuned`); not provided by default.
        """
        raise TaskError(f"task {self.name!r} has no fit_pretrained() hook, needed to retrain")

    @_default_hook
    def fit_finetuned(self, pretrained_model: torch.nn.Module, scenario: str) -> torch.nn.Module:
        """Finetune from `pretrained_model` (its W is W_pt, the UPDATED proximal anchor) in
        `scenario`; return the trained finetuned model. Not provided by default."""
        raise TaskError(f"task {self.name!r} has no fit_finetuned() hook, needed to retrain")

    @_default_hook
    def describe_many(self, split: str, indices: Sequence[int]) -> list[dict]:
        """describe(split, i) for every i in `indices`, in order; a task may provide a vectorised
        version (one read of its source for many examples). The default loops over describe."""
        return [self.describe(split, int(i)) for i in indices]

    # the Gauss-Newton split g = h(f) of each stage's loss (--curvature ggn): the network outputs
    # f and a loss h convex in them, with {stage}_loss(model, batch) ==
    # {stage}_loss_from_outputs({stage}_outputs(model, batch), batch). Without them msif
    # recognises cross-entropy or squared error of the logits / model(batch[0]) (gauss_newton).
    @_default_hook
    def pretrain_outputs(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        """f(z; W, U), [B, ...]: what the pretraining loss sees (e.g. the LM logits)."""
        raise TaskError(f"task {self.name!r} has no pretrain_outputs() hook")

    @_default_hook
    def pretrain_loss_from_outputs(self, outputs: torch.Tensor, batch: Any) -> torch.Tensor:
        """g as h(outputs, batch), [B], convex in the outputs."""
        raise TaskError(f"task {self.name!r} has no pretrain_loss_from_outputs() hook")

    @_default_hook
    def finetune_outputs(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        """f(x; W, T), [B, ...]: what the finetuning loss sees (usually finetune_logits)."""
        raise TaskError(f"task {self.name!r} has no finetune_outputs() hook")

    @_default_hook
    def finetune_loss_from_outputs(self, outputs: torch.Tensor, batch: Any) -> torch.Tensor:
        """f's loss as h(outputs, batch), [B], convex in the outputs."""
        raise TaskError(f"task {self.name!r} has no finetune_loss_from_outputs() hook")


REQUIRED_METHODS = (
    "pretrain_data",
    "finetune_train_data",
    "finetune_test_data",
    "pretrained_model",
    "finetuned_model",
    "shared_parameters",
    "pretrain_loss",
    "finetune_loss",
    "finetune_logits",
    "represent",
    "describe",
)
OPTIONAL_HOOKS = (
    "fit_pretrained",
    "fit_finetuned",
    "finetune_class_names",
    "describe_many",
    "pretrain_outputs",
    "pretrain_loss_from_outputs",
    "finetune_outputs",
    "finetune_loss_from_outputs",
)


def has_hook(task: MultiStageTask, name: str) -> bool:
    """Whether `task` provides the optional hook `name` (one of OPTIONAL_HOOKS).

    A method hook counts when it is callable and not the base class's default; the
    `finetune_class_names` attribute when it is not None.
    """
    if name not in OPTIONAL_HOOKS:
        raise ValueError(f"{name!r} is not an optional hook: use one of {OPTIONAL_HOOKS}")
    value = getattr(task, name, None)
    if name == "finetune_class_names":
        return value is not None
    return callable(value) and not getattr(value, _DEFAULT_HOOK, False)


def _missing_methods(cls: type) -> list[str]:
    """The abstract methods `cls` leaves unimplemented, required ones in contract order."""
    missing = set(getattr(cls, "__abstractmethods__", ()))
    return [n for n in REQUIRED_METHODS if n in missing] + sorted(missing - set(REQUIRED_METHODS))


def load_task(spec: str) -> MultiStageTask:
    """Instantiate a task from a built-in name, `package.module:Class` or `file.py:Class`."""
    target = BUILTIN_TASKS.get(spec, spec)
    if ":" not in target:
        known = ", ".join(sorted(BUILTIN_TASKS))
        raise TaskError(
            f"unknown task {spec!r}: use a built-in name ({known}), package.module:Class "
            "or path/to/file.py:Class"
        )
    where, _, class_name = target.rpartition(":")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise TaskError(f"task file {where!r} does not exist")
        module_name = f"msif_task_{path.stem}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:  # the user's file failed to import: say where
            raise TaskError(f"task file {where!r} failed to import: {exc!r}") from exc
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as exc:
            raise TaskError(f"cannot import task module {where!r}: {exc}") from exc
    cls = getattr(module, class_name, None)
    if cls is None:
        raise TaskError(f"task class {class_name!r} not found in {where!r}")
    if not (inspect.isclass(cls) and issubclass(cls, MultiStageTask)):
        raise TaskError(f"{target!r} is not a subclass of precompute.MultiStageTask")
    missing = _missing_methods(cls)  # instantiating it would raise a bare TypeError
    if missing:
        raise TaskError(f"task {target!r} does not implement {', '.join(missing)}")
    try:
        task = cls()
    except Exception as exc:
        raise TaskError(f"task {target!r} failed to construct: {exc!r}") from exc
    bad = [s for s in task.scenarios if s not in SCENARIOS]
    if bad or not task.scenarios:
        raise TaskError(f"task {target!r} has unknown scenarios {bad}: use fixed and/or updated")
    if "updated" in task.scenarios and not task.proximal_alpha > 0:
        raise TaskError(
            f"task {target!r}: proximal_alpha must be > 0 for the updated scenario "
            f"(got {task.proximal_alpha})"
        )
    return task


def call(task: MultiStageTask, method: str, *args: Any) -> Any:
    """task.method(*args), with any exception turned into one TaskError sentence naming it."""
    try:
        return getattr(task, method)(*args)
    except TaskError:
        raise
    except Exception as exc:
        raise TaskError(
            f"task {task.name!r}: {method}() raised {type(exc).__name__}: {exc}"
        ) from exc


def check_models(
    task: MultiStageTask, pretrained: torch.nn.Module, finetuned: dict[str, torch.nn.Module]
) -> list[str]:
    """The shared parameter names, after checking them against every model; TaskError if off."""
    shared = call(task, "shared_parameters")
    if not shared or not all(isinstance(n, str) for n in shared):
        raise TaskError(f"task {task.name!r}: shared_parameters() must be a non-empty list of str")
    models = {"pretrained model": pretrained}
    models.update({f"finetuned model ({s})": m for s, m in finetuned.items()})
    reference = dict(pretrained.named_parameters())
    for what, model in models.items():
        params = dict(model.named_parameters())
        for name in shared:
            if name not in params:
                raise TaskError(
                    f"task {task.name!r}: shared parameter {name!r} is not a parameter of the "
                    f"{what}"
                )
            if name in reference and params[name].shape != reference[name].shape:
                raise TaskError(
                    f"task {task.name!r}: shared parameter {name!r} has shape "
                    f"{tuple(params[name].shape)} in the {what} but "
                    f"{tuple(reference[name].shape)} in the pretrained model"
                )
    if "fixed" in finetuned:
        params = dict(finetuned["fixed"].named_parameters())
        for name in shared:
            if not torch.allclose(params[name].detach().cpu(), reference[name].detach().cpu()):
                raise TaskError(
                    f"task {task.name!r}: in the fixed scenario the finetuned model's shared "
                    f"parameter {name!r} must equal the pretrained one, but it differs"
                )
    return list(shared)


def check_outputs(
    task: MultiStageTask, method: str, model: torch.nn.Module, batch: Any, size: int, what: str
) -> torch.Tensor:
    """Run a per-example method on a batch of `size` and check its shape and finiteness."""
    with torch.no_grad():
        out = call(task, method, model, batch)
    if not isinstance(out, torch.Tensor):
        raise TaskError(
            f"task {task.name!r}: {method}() on {what} returned {type(out).__name__}, not a tensor"
        )
    want = (
        "[B]" if method.endswith("_loss") else "[B, C]" if method.endswith("logits") else "[B, d]"
    )
    ok = out.ndim == (1 if want == "[B]" else 2) and out.shape[0] == size
    if not ok:
        raise TaskError(
            f"task {task.name!r}: {method}() on a batch of {size} from {what} returned shape "
            f"{list(out.shape)}; it must be {want.replace('B', str(size))}, one row per example"
        )
    if not torch.isfinite(out).all():
        raise TaskError(f"task {task.name!r}: {method}() returned non-finite values on {what}")
    return out


def check_data(task: MultiStageTask) -> dict[str, torch.utils.data.Dataset]:
    """The three datasets, each checked to be non-empty."""
    data = {}
    for method in ("pretrain_data", "finetune_train_data", "finetune_test_data"):
        dataset = call(task, method)
        try:
            size = len(dataset)
        except TypeError as exc:
            raise TaskError(
                f"task {task.name!r}: {method}() must return a map-style Dataset with a length"
            ) from exc
        if size == 0:
            raise TaskError(f"task {task.name!r}: {method}() is empty")
        data[method] = dataset
    return data
