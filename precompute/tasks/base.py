"""`BuiltinTask`: what the built-in tasks share beyond the contract.

A built-in task trains its own models on first use and keeps them, so it only says how to build
and train them; this base does the rest:
- caching: the pretrained model and each scenario's finetuned model are state_dict files in
  `cache_dir()`, a folder under $MSIF_CACHE (else ~/.cache/msif) named
  `<name>-<sha256 of the cache_fields' values>`, so a change of a hyper-parameter or of
  `version` never reads a stale checkpoint (see `checkpoints.load_or_train`);
- the models handed out: fresh modules in eval mode built by `new_pretrain_model()` /
  `new_finetune_model()` and loaded from the cached state, so callers may modify them;
- the retraining hooks of `msif validate`: `fit_pretrained(keep)` and
  `fit_finetuned(pretrained, scenario)`, warm-started from the cached optima and not cached.

A subclass implements the two model factories and the two trainers,
`_train_pretrained(keep, init)` and `_train_finetuned(pretrained, scenario, init)`, each
returning (trained model, training record) with the record's "grad_norm" the gradient 2-norm of
the objective reached.
"""

from __future__ import annotations

import abc
import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from precompute.task import SCENARIOS, MultiStageTask
from precompute.tasks.checkpoints import cache_root, load_or_train


class BuiltinTask(MultiStageTask):
    """A MultiStageTask that trains its models itself, caches them, and can retrain them.

    Pretraining minimises G(W, U) = (1/m) sum over the kept examples of g + (lp/2)(|W|^2 + |U|^2)
    (m the full count even when `keep` drops examples: removing z is then upweighting it by
    -1/m); finetuning minimises the objective of each scenario (docs/design.md section 2).
    How is the subclass's business; it returns the optimum and a record of the run.
    """

    version: str = "1"
    # attributes whose values key the checkpoint folder (json-serialisable)
    cache_fields: tuple[str, ...] = ("version", "pretrain_l2", "finetune_l2", "proximal_alpha")

    def __init__(self) -> None:
        self._states: dict[str, dict[str, torch.Tensor]] = {}
        self.fit_info: dict[str, dict] = {}  # per trained model: grad_norm, iterations, seconds

    # ------------------------------------------------------------------- for a subclass to fill
    @abc.abstractmethod
    def new_pretrain_model(self) -> nn.Module:
        """An untrained pretraining model (W, U), in the task's dtype."""

    @abc.abstractmethod
    def new_finetune_model(self) -> nn.Module:
        """An untrained finetuning model (W, T), in the task's dtype."""

    @abc.abstractmethod
    def _train_pretrained(
        self, keep: torch.Tensor | None = None, init: dict | None = None
    ) -> tuple[nn.Module, dict]:
        """(model, record): minimise G over the examples where `keep` is True (all if None),
        starting from the state dict `init` if given."""

    @abc.abstractmethod
    def _train_finetuned(
        self, pretrained: nn.Module, scenario: str, init: dict | None = None
    ) -> tuple[nn.Module, dict]:
        """(model, record): finetune from `pretrained` (W_pt, also the UPDATED anchor) in
        `scenario`, starting from the finetuned state dict `init` if given."""

    # ----------------------------------------------------------------------------- caching
    def cache_dir(self) -> Path:
        """Folder of this task's cached checkpoints: keyed by the `cache_fields` values."""
        key = {n: getattr(self, n) for n in self.cache_fields}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
        return cache_root() / f"{self.name}-{digest}"

    def _cached_state(self, name: str, train, new_model) -> dict[str, torch.Tensor]:
        """State dict of model `name`: from memory, else the cache file, else train and save it
        (with its training record in a JSON file beside it, read back into `fit_info`)."""
        return load_or_train(
            self.cache_dir(), name, train, new_model, self._states, self.fit_info, stacklevel=3
        )

    @staticmethod
    def _ready(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
        model.load_state_dict(state)  # requires_grad as built: frozen parameters stay frozen
        return model.eval()

    @staticmethod
    def check_scenario(scenario: str) -> None:
        """ValueError unless `scenario` is "fixed" or "updated"."""
        if scenario not in SCENARIOS:
            raise ValueError(f"unknown scenario {scenario!r}: use 'fixed' or 'updated'")

    def pretrained_model(self) -> nn.Module:
        """The pretraining optimum (W_pt, U_pt); trained on first use, then loaded from cache."""
        state = self._cached_state("pretrained", self._train_pretrained, self.new_pretrain_model)
        return self._ready(self.new_pretrain_model(), state)

    def finetuned_model(self, scenario: str) -> nn.Module:
        """The finetuning optimum of `scenario` ("fixed" or "updated"), cached like the above."""
        self.check_scenario(scenario)

        def train():
            return self._train_finetuned(self.pretrained_model(), scenario)

        state = self._cached_state(f"finetuned-{scenario}", train, self.new_finetune_model)
        return self._ready(self.new_finetune_model(), state)

    # ----------------------------------------------------------------- validation by retraining
    def fit_pretrained(self, keep: torch.Tensor) -> nn.Module:
        """Minimise G without the examples where keep is False (the data term still divided by
        the full count m), warm-started from the full pretrained optimum. Not cached."""
        keep = torch.as_tensor(keep, dtype=torch.bool)
        n = len(self.pretrain_data())
        if keep.shape != (n,):
            raise ValueError(f"keep must be a bool tensor of shape ({n},), got {tuple(keep.shape)}")
        if not bool(keep.any()):
            raise ValueError("keep removes every pretraining example")
        init = self.pretrained_model().state_dict()
        model, info = self._train_pretrained(keep, init=init)
        self.fit_info["fit_pretrained"] = info
        return self._ready(self.new_pretrain_model(), model.state_dict())

    def fit_finetuned(self, pretrained_model: nn.Module, scenario: str) -> nn.Module:
        """Finetune `pretrained_model` in `scenario`, warm-started from the full finetuned model
        of that scenario; in UPDATED the proximal anchor W_pt is the given model's W."""
        self.check_scenario(scenario)
        init = self.finetuned_model(scenario).state_dict()
        model, info = self._train_finetuned(pretrained_model, scenario, init=init)
        self.fit_info[f"fit_finetuned-{scenario}"] = info
        return self._ready(self.new_finetune_model(), model.state_dict())
