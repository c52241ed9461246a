"""The built-in `digits` task: pretrain on handwritten digits 0-4, finetune on digits 5-9.

Data: sklearn's bundled 8x8 digits (nothing is downloaded), pixels scaled to [0, 1] by 1/16.
- Pretraining set: every image of a digit 0-4; label = the digit.
- Finetuning set: every image of a digit 5-9; label = digit - 5 (label_name "5".."9"). A fixed-seed
  permutation puts `n_finetune_train` of them in the finetuning train split, the rest in test.

Model (float64 throughout): `DigitsNet`, an encoder 64 -> 32 -> 16 (tanh) shared by both stages
(W = the encoder's parameters) and a linear head 16 -> 5 (U in pretraining, T in finetuning).

Objectives (docs/design.md section 2), all minimised full-batch in float64 (L-BFGS with a
strong Wolfe line search, then Newton-CG on exact Hessian-vector products) to a gradient
2-norm of at most `grad_tol`, so that the influence engine's optimality assumption holds:
- pretraining:  G(W, U) = (1/m) sum_i CE(z_i; W, U) + (lp/2)(|W|^2 + |U|^2), lp = pretrain_l2;
- FIXED:        F(T) = (1/n) sum_j CE(x_j; W_pt, T) + (lf/2)|T|^2, lf = finetune_l2, the encoder
                kept at the pretrained W_pt;
- UPDATED:      F(W, T) = (1/n) sum_j CE(x_j; W, T) + (lf/2)(|W|^2 + |T|^2) + (a/2)|W - W_pt|^2,
                a = proximal_alpha, started from W = W_pt.

Trained models are cached as state_dict files under $MSIF_CACHE (else ~/.cache/msif) in a folder
keyed by a hash of the hyper-parameters and `version`.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from precompute.tasks.base import BuiltinTask
from precompute.tasks.training import newton_cg, sq_norm, warn_if_unconverged

DTYPE = torch.float64


class DigitsNet(nn.Module):
    """64 -> 32 -> 16 tanh encoder (the shared W) and a 16 -> 5 linear head; returns logits."""

    def __init__(self, n_classes: int = 5, dtype: torch.dtype = DTYPE) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 16), nn.Tanh())
        self.head = nn.Linear(16, n_classes)
        self.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


class _ArrayDataset(torch.utils.data.Dataset):
    """Map-style dataset of (x float64 [64], y int64 scalar) pairs."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x = torch.as_tensor(x, dtype=DTYPE)
        self.y = torch.as_tensor(y, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[index], self.y[index]


def _inputs(model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of a collated batch, x cast to the dtype and device of the model's weights."""
    x, y = batch[0], batch[1]
    weight = model.head.weight  # the substituted tensor under torch.func.functional_call
    return x.to(dtype=weight.dtype, device=weight.device), y.to(device=weight.device)


class DigitsTask(BuiltinTask):
    """Pretrain an MLP on digits 0-4, finetune it on digits 5-9 (FIXED and UPDATED scenarios).

    Pretraining minimises G(W, U) = mean CE + (pretrain_l2/2)(|W|^2 + |U|^2) over the pretraining
    set. FIXED finetuning minimises mean CE + (finetune_l2/2)|T|^2 over the head T with the
    encoder W = W_pt fixed. UPDATED finetuning minimises mean CE + (finetune_l2/2)(|W|^2 + |T|^2)
    + (proximal_alpha/2)|W - W_pt|^2 over (W, T). W = encoder parameters, U/T = head parameters.

    A subclass may swap the network: `new_pretrain_model()` / `new_finetune_model()` returning a
    module with an `encoder` (W, called on the [B, 64] inputs) and a linear `head`, and
    `shared_parameters()` naming the encoder's parameters (as `digits-cnn` does).
    """

    name = "digits"
    scenarios = ("fixed", "updated")
    pretrain_l2 = 3e-3  # 1e-3 gave min Hessian eigenvalue ~4e-6 (cond ~2e5) and slow training
    finetune_l2 = 1e-3
    proximal_alpha = 0.1

    n_finetune_train = 350
    split_seed = 0
    pretrain_seed = 0
    finetune_seed = 1
    grad_tol = 1e-10  # target gradient 2-norm of every objective at the returned models
    lbfgs_max_iter = 2000
    lbfgs_tolerance_grad = 1e-4  # divided by 10 each round
    max_rounds = 10  # alternations of L-BFGS and Newton-CG
    newton_steps = 20
    version = "1"
    cache_fields = (
        *BuiltinTask.cache_fields,
        "n_finetune_train",
        "split_seed",
        "pretrain_seed",
        "finetune_seed",
        "grad_tol",
    )

    def __init__(self) -> None:
        super().__init__()
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None
        self._source: dict[str, np.ndarray] = {}
        self._datasets: dict[str, _ArrayDataset] = {}

    # ----------------------------------------------------------------------------------- data
    def _load(self) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """{split: (x [N, 64] in [0, 1], label [N], raw 8x8 pixel images [N, 8, 8] in 0..16)}."""
        if self._arrays is None:
            from sklearn.datasets import load_digits

            digits = load_digits()
            images = digits.images.astype(np.float64)
            target = digits.target.astype(np.int64)
            x = images.reshape(len(images), 64) / 16.0
            pre = np.flatnonzero(target <= 4)
            fin = np.flatnonzero(target >= 5)
            perm = np.random.default_rng(self.split_seed).permutation(len(fin))
            train = np.sort(fin[perm[: self.n_finetune_train]])
            test = np.sort(fin[perm[self.n_finetune_train :]])
            self._arrays = {
                "pretrain": (x[pre], target[pre], images[pre]),
                "finetune_train": (x[train], target[train] - 5, images[train]),
                "test": (x[test], target[test] - 5, images[test]),
            }
            self._source = {"pretrain": pre, "finetune_train": train, "test": test}
        return self._arrays

    def source_indices(self, split: str) -> np.ndarray:
        """Row numbers in sklearn's load_digits() of the examples of a split, in dataset order."""
        self._load()
        return self._source[split].copy()

    def _dataset(self, split: str) -> _ArrayDataset:
        if split not in self._datasets:
            x, y, _ = self._load()[split]
            self._datasets[split] = _ArrayDataset(x, y)
        return self._datasets[split]

    def pretrain_data(self) -> torch.utils.data.Dataset:
        return self._dataset("pretrain")

    def finetune_train_data(self) -> torch.utils.data.Dataset:
        return self._dataset("finetune_train")

    def finetune_test_data(self) -> torch.utils.data.Dataset:
        return self._dataset("test")

    def _full_batch(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        ds = self._dataset(split)
        return ds.x, ds.y

    # ------------------------------------------------------------------------ losses, outputs
    def new_pretrain_model(self) -> nn.Module:
        return DigitsNet()

    def new_finetune_model(self) -> nn.Module:
        return DigitsNet()

    def shared_parameters(self) -> list[str]:
        return ["encoder.0.weight", "encoder.0.bias", "encoder.2.weight", "encoder.2.bias"]

    def pretrain_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Per-example cross-entropy g(z; W, U) of the pretraining head, shape [B]."""
        x, y = _inputs(model, batch)
        return F.cross_entropy(model(x), y, reduction="none")

    def finetune_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Per-example cross-entropy f(x; W, T) of the finetuning head, shape [B]."""
        x, y = _inputs(model, batch)
        return F.cross_entropy(model(x), y, reduction="none")

    def finetune_logits(self, model: nn.Module, batch: Any) -> torch.Tensor:
        x, _ = _inputs(model, batch)
        return model(x)

    def represent(self, model: nn.Module, batch: Any) -> torch.Tensor:
        x, _ = _inputs(model, batch)
        return model.encoder(x)

    def describe(self, split: str, index: int) -> dict:
        if split not in ("pretrain", "test", "finetune_train"):
            raise ValueError(f"unknown split {split!r}: use 'pretrain' or 'test'")
        _, labels, images = self._load()[split]
        index = int(index)
        if not 0 <= index < len(labels):
            raise IndexError(f"{split} index {index} out of range [0, {len(labels)})")
        label = int(labels[index])
        offset = 0 if split == "pretrain" else 5
        image = np.clip(np.rint(images[index] * 16.0), 0, 255).astype(np.uint8)
        return {"label": label, "label_name": str(label + offset), "text": None, "image": image}

    # -------------------------------------------------------------------------- objectives
    def pretrain_objective(
        self, model: nn.Module, keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        """G(W, U) = (1/m) sum over the kept examples of CE + (lp/2)(|W|^2 + |U|^2).

        m is the full pretraining count even when `keep` drops examples: removing z is then
        exactly upweighting it by -1/m, the change that the influence score predicts
        (averaging over the kept examples instead would also rescale the regulariser).
        """
        x, y = self._full_batch("pretrain")
        losses = F.cross_entropy(model(x), y, reduction="none")
        if keep is not None:
            losses = losses * keep.to(losses.dtype)
        return losses.sum() / len(x) + 0.5 * self.pretrain_l2 * sq_norm(model.parameters())

    def finetune_objective(
        self, model: nn.Module, scenario: str, anchor: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """The finetuning objective of `scenario`; `anchor` = W_pt by name (UPDATED only).

        FIXED: mean CE + (lf/2)|T|^2 (the encoder is a constant W_pt).
        UPDATED: mean CE + (lf/2)(|W|^2 + |T|^2) + (a/2)|W - W_pt|^2.
        """
        x, y = self._full_batch("finetune_train")
        ce = F.cross_entropy(model(x), y)
        head = sq_norm(model.head.parameters())
        if scenario == "fixed":
            return ce + 0.5 * self.finetune_l2 * head
        if scenario == "updated":
            if anchor is None:
                raise ValueError("the updated objective needs the anchor W_pt")
            enc = dict(model.named_parameters())
            shared = self.shared_parameters()
            w2 = sq_norm(enc[n] for n in shared)
            prox = sq_norm(enc[n] - anchor[n] for n in shared)
            return ce + 0.5 * self.finetune_l2 * (w2 + head) + 0.5 * self.proximal_alpha * prox
        raise ValueError(f"unknown scenario {scenario!r}: use 'fixed' or 'updated'")

    # ------------------------------------------------------------------------------ training
    def _minimise(self, objective, params: list[torch.Tensor]) -> dict:
        """Minimise objective() over params to |grad| <= grad_tol: full-batch L-BFGS (strong
        Wolfe), then Newton-CG steps on exact Hessian-vector products.

        L-BFGS alone stalls near 1e-7: its line search compares loss values that no longer differ
        in float64 and it drops curvature pairs with s.y <= 1e-10. Newton steps need no loss
        comparisons and converge quadratically at a strict local minimum.
        """
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny matrices: extra threads only add overhead and contention
        try:
            return self._minimise_1(objective, params)
        finally:
            torch.set_num_threads(threads)

    def _minimise_1(self, objective, params: list[torch.Tensor]) -> dict:
        start = time.perf_counter()
        info = {"lbfgs_iterations": 0, "newton_steps": 0, "cg_iterations": 0}
        grad_norm = float("inf")
        for round_ in range(self.max_rounds):
            opt = torch.optim.LBFGS(
                params,
                lr=1.0,
                max_iter=self.lbfgs_max_iter,
                max_eval=2 * self.lbfgs_max_iter,
                tolerance_grad=self.lbfgs_tolerance_grad * 0.1**round_,
                tolerance_change=1e-13,
                history_size=50,
                line_search_fn="strong_wolfe",
            )

            def closure(opt=opt):
                opt.zero_grad()
                value = objective()
                value.backward()
                return value

            opt.step(closure)
            for p in params:
                p.grad = None
            info["lbfgs_iterations"] += int(opt.state[params[0]].get("n_iter", 0))
            newton = newton_cg(objective, params, self.grad_tol, self.newton_steps)
            info["newton_steps"] += newton["steps"]
            info["cg_iterations"] += newton["cg_iterations"]
            grad_norm = newton["grad_norm"]
            if grad_norm <= self.grad_tol:
                break
        info["grad_norm"] = grad_norm
        info["seconds"] = time.perf_counter() - start
        warn_if_unconverged(grad_norm, self.grad_tol, f"{self.name} task:", stacklevel=3)
        return info

    def _train_pretrained(
        self, keep: torch.Tensor | None = None, init: dict | None = None
    ) -> tuple[nn.Module, dict]:
        torch.manual_seed(self.pretrain_seed)
        model = self.new_pretrain_model()
        if init is not None:
            model.load_state_dict(init)
        params = list(model.parameters())
        info = self._minimise(lambda: self.pretrain_objective(model, keep), params)
        return model, info

    def _train_finetuned(
        self, pretrained: nn.Module, scenario: str, init: dict | None = None
    ) -> tuple[nn.Module, dict]:
        """Finetune from `pretrained` (W_pt); `init` warm-starts (W, T) (W only in UPDATED)."""
        self.check_scenario(scenario)
        torch.manual_seed(self.finetune_seed)
        model = self.new_finetune_model()
        encoder_pt = {
            k: v.detach().clone().to(DTYPE) for k, v in pretrained.encoder.state_dict().items()
        }
        model.encoder.load_state_dict(encoder_pt)
        if init is not None:
            model.head.load_state_dict(
                {k[len("head.") :]: v for k, v in init.items() if k.startswith("head.")}
            )
            if scenario == "updated":
                model.encoder.load_state_dict(
                    {k[len("encoder.") :]: v for k, v in init.items() if k.startswith("encoder.")}
                )
        if scenario == "fixed":
            for p in model.encoder.parameters():
                p.requires_grad_(False)
            params = list(model.head.parameters())
            info = self._minimise(lambda: self.finetune_objective(model, "fixed"), params)
            for p in model.encoder.parameters():
                p.requires_grad_(True)
        else:
            anchor = {f"encoder.{k}": v for k, v in encoder_pt.items()}
            params = list(model.parameters())
            info = self._minimise(lambda: self.finetune_objective(model, "updated", anchor), params)
        return model, info
