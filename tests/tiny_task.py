"""A tiny smooth two-stage float64 task for ground-truth tests (explicit Hessians, leave-one-out).

Pretraining: 3-class softmax regression on tanh features, W = encoder (4 -> 3), U = head (3 -> 3).
Finetuning: 2-class softmax regression on the same features, T = head (3 -> 2).
Strong L2 keeps both stages well conditioned, so leave-one-out retraining is accurate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from precompute import MultiStageTask


class TinyNet(nn.Module):
    def __init__(self, classes: int, inputs: int = 4, hidden: int = 3):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(inputs, hidden), nn.Tanh())
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.head(self.encoder(x))


def minimise(objective, params, steps: int = 500) -> None:
    """Full-batch L-BFGS to machine precision."""
    opt = torch.optim.LBFGS(
        params,
        lr=1,
        max_iter=steps,
        tolerance_grad=1e-11,
        tolerance_change=1e-16,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        value = objective()
        value.backward()
        return value

    opt.step(closure)


class TinyTask(MultiStageTask):
    name = "tiny"
    pretrain_l2 = 0.05
    finetune_l2 = 0.05
    proximal_alpha = 0.5
    m, n, q = 200, 20, 6
    net = TinyNet  # net(classes) -> a module with .encoder (the shared W) and .head

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        dt = torch.float64
        teacher = torch.randn(4, 3, generator=g, dtype=dt)
        x = torch.randn(self.m + self.n + self.q, 4, generator=g, dtype=dt)
        noise = torch.randn(len(x), 3, generator=g, dtype=dt)
        y3 = (x @ teacher + noise).argmax(1)
        y2 = ((x[:, 0] - x[:, 1] + 0.5 * noise[:, 0]) > 0).long()
        m, n = self.m, self.n
        self.pre = TensorDataset(x[:m], y3[:m])
        self.train = TensorDataset(x[m : m + n], y2[m : m + n])
        self.test = TensorDataset(x[m + n :], y2[m + n :])
        self._pretrained = None
        self._finetuned = {}

    def pretrain_data(self):
        return self.pre

    def finetune_train_data(self):
        return self.train

    def finetune_test_data(self):
        return self.test

    def shared_parameters(self):
        return ["encoder.0.weight", "encoder.0.bias"]

    def pretrain_loss(self, model, batch):
        x, y = batch
        return F.cross_entropy(model(x), y, reduction="none")

    def finetune_loss(self, model, batch):
        x, y = batch
        return F.cross_entropy(model(x), y, reduction="none")

    def finetune_logits(self, model, batch):
        return model(batch[0])

    def represent(self, model, batch):
        return model.encoder(batch[0])

    def describe(self, split, index):
        data = {"pretrain": self.pre, "test": self.test}[split]
        label = int(data.tensors[1][index])
        return {
            "label": label,
            "label_name": f"class {label}",
            "text": f"{split} {index}",
            "image": None,
        }

    # training, and the fit hooks of validation by retraining
    def fit_pretrained(self, keep):
        """Retrain without the examples where keep is False, from the full optimum."""
        return self._pretrain(keep, self.pretrained_model())

    def fit_finetuned(self, pretrained, scenario):
        """Finetune from `pretrained`, from the full finetuned optimum of the scenario."""
        return self._finetune(pretrained, scenario, self.finetuned_model(scenario))

    def pretrained_model(self):
        if self._pretrained is None:
            self._pretrained = self._pretrain(None, None)
        return self._pretrained

    def finetuned_model(self, scenario):
        if scenario not in self._finetuned:
            self._finetuned[scenario] = self._finetune(self.pretrained_model(), scenario, None)
        return self._finetuned[scenario]

    def _pretrain(self, keep, start):
        x, y = self.pre.tensors
        weight = torch.ones(len(x), dtype=x.dtype) if keep is None else keep.to(x.dtype)
        torch.manual_seed(1)
        model = self.net(3).double()
        if start is not None:
            model.load_state_dict(start.state_dict())

        def objective():
            reg = sum((p**2).sum() for p in model.parameters())
            # (1/m) sum over the kept examples, m = the full count: removing z is upweighting it
            # by -1/m, the change the score predicts (docs/design.md section 3)
            data = (weight * F.cross_entropy(model(x), y, reduction="none")).sum() / len(x)
            return data + self.pretrain_l2 / 2 * reg

        minimise(objective, list(model.parameters()))
        return model.eval()

    def _finetune(self, pretrained, scenario, start):
        x, y = self.train.tensors
        torch.manual_seed(2)
        model = self.net(2).double()
        model.encoder.load_state_dict(pretrained.encoder.state_dict())
        if start is not None:
            model.head.load_state_dict(start.head.state_dict())
        anchor = [p.detach().clone() for p in pretrained.encoder.parameters()]
        if scenario == "fixed":
            for p in model.encoder.parameters():
                p.requires_grad_(False)

            def objective():
                reg = sum((p**2).sum() for p in model.head.parameters())
                return F.cross_entropy(model(x), y) + self.finetune_l2 / 2 * reg

            minimise(objective, list(model.head.parameters()))
            for p in model.encoder.parameters():
                p.requires_grad_(True)
        else:

            def objective():
                reg = sum((p**2).sum() for p in model.parameters())
                prox = sum(
                    ((p - a) ** 2).sum()
                    for p, a in zip(model.encoder.parameters(), anchor, strict=True)
                )
                return (
                    F.cross_entropy(model(x), y)
                    + self.finetune_l2 / 2 * reg
                    + self.proximal_alpha / 2 * prox
                )

            minimise(objective, list(model.parameters()))
        return model.eval()


class BrieflyTrainedTask(TinyTask):
    """TinyTask whose pretrained model is far from its optimum and unregularised, as a model
    trained by a few SGD steps is: its pretraining Hessian is indefinite."""

    name = "tiny-brief"
    pretrain_l2 = 0.0

    def pretrained_model(self):
        if self._pretrained is None:
            torch.manual_seed(3)
            model = TinyNet(3).double()
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(4)
            self._pretrained = model.eval()
        return self._pretrained


class SlowTask(TinyTask):
    """TinyTask that stops for a while in describe(), to be killed mid-run."""

    name = "tiny-slow"

    def describe(self, split, index):
        import time

        time.sleep(60 if index == 0 and split == "pretrain" else 0)
        return super().describe(split, index)


class _SlowFromHalf(TensorDataset):
    """Items from the middle on take a while: a pass over them can be killed midway."""

    def __getitem__(self, index):
        if index >= len(self) // 2:
            import time

            time.sleep(0.05)
        return super().__getitem__(index)


class SlowPassTask(TinyTask):
    """TinyTask whose pretraining pass slows down halfway (item-by-item loading)."""

    name = "tiny"  # the same run as TinyTask's

    def pretrain_data(self):
        return _SlowFromHalf(*self.pre.tensors)


class SlowLossTask(TinyTask):
    """TinyTask whose pretraining loss takes a while per batch (a worker can be killed
    mid-shard)."""

    name = "tiny"

    def pretrain_loss(self, model, batch):
        import os
        import time
        from pathlib import Path

        if len(batch[0]) > 4:  # the pass's batches (the checks use 2)
            time.sleep(0.3)
            pids = os.environ.get("MSIF_TEST_PIDS")  # where each process says it scores
            if pids:
                (Path(pids) / str(os.getpid())).touch()
        return super().pretrain_loss(model, batch)


def rows_to_inputs(table):
    """A pyarrow Table of pretraining rows (x0..x3, y) as the batch (x [n, 4], y [n])."""
    import numpy as np

    x = np.stack([table.column(f"x{i}").to_numpy() for i in range(4)], 1)
    return [torch.from_numpy(x), torch.from_numpy(table.column("y").to_numpy())]


class ParquetTinyTask(TinyTask):
    """TinyTask whose pretraining examples are rows of three parquet files (row groups of 30),
    read through precompute.parquet_data.ParquetRows."""

    def __init__(self, seed: int = 0):
        import tempfile

        import pyarrow as pa
        import pyarrow.parquet as pq

        super().__init__(seed)
        folder = tempfile.mkdtemp(prefix="msif-parquet-")
        x, y = self.pre.tensors
        self.paths = []
        for number, (start, stop) in enumerate(((0, 70), (70, 71), (71, len(x)))):
            columns = {f"x{i}": x[start:stop, i].numpy() for i in range(4)}
            path = f"{folder}/part-{number}.parquet"
            pq.write_table(pa.table({**columns, "y": y[start:stop].numpy()}), path,
                           row_group_size=30)  # fmt: skip
            self.paths.append(path)

    def pretrain_data(self):
        from precompute.parquet_data import ParquetRows

        return ParquetRows(self.paths, rows_to_inputs)
