"""Tasks that break the contract in one way each (for the error-message tests)."""

from __future__ import annotations

import torch
from tiny_task import TinyTask
from torch.utils.data import TensorDataset

from precompute import MultiStageTask


class NoDescribe(MultiStageTask):
    name = "no-describe"

    def pretrain_data(self): ...
    def finetune_train_data(self): ...
    def finetune_test_data(self): ...
    def pretrained_model(self): ...
    def finetuned_model(self, scenario): ...
    def shared_parameters(self): ...
    def pretrain_loss(self, model, batch): ...
    def finetune_loss(self, model, batch): ...
    def finetune_logits(self, model, batch): ...
    def represent(self, model, batch): ...


class MissingShared(TinyTask):
    def shared_parameters(self):
        return ["encoder.0.weight", "encoder.7.weight"]


class MeanLoss(TinyTask):
    def pretrain_loss(self, model, batch):
        return super().pretrain_loss(model, batch).mean()


class NanLoss(TinyTask):
    def finetune_loss(self, model, batch):
        return super().finetune_loss(model, batch) * float("nan")


class EmptyPretrain(TinyTask):
    def pretrain_data(self):
        return TensorDataset(torch.zeros(0, 4, dtype=torch.float64), torch.zeros(0).long())


class RaisingModel(TinyTask):
    def finetuned_model(self, scenario):
        raise FileNotFoundError("checkpoint ft.pt is missing")


class MovedFixedEncoder(TinyTask):
    def finetuned_model(self, scenario):
        model = super().finetuned_model(scenario)
        if scenario == "fixed":
            with torch.no_grad():
                model.encoder[0].bias.add_(1.0)
        return model


class NotATask:
    pass


class ItemInLoss(TinyTask):
    def pretrain_loss(self, model, batch):
        loss = super().pretrain_loss(model, batch)
        if loss.requires_grad:  # fine for a plain forward, breaks inside torch.func transforms
            loss.sum().item()
        return loss
