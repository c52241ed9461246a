"""TinyTask with a self-attention encoder: eager attention (softmax(Q K^T / sqrt(d)) V written
out) or torch's fused `scaled_dot_product_attention`, whose kernels have no double backward."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from tiny_task import TinyTask
from torch import nn


class AttentionEncoder(nn.Module):
    """Each of the 4 input features is a token: embed, one attention head, mean-pool, tanh."""

    def __init__(self, hidden: int = 3, fused: bool = False):
        super().__init__()
        self.embed = nn.Linear(1, hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.fused = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = torch.tanh(self.embed(x.unsqueeze(-1)))  # [B, 4, hidden]
        # [B, heads = 1, tokens, hidden], the layout the fused kernels take
        q, k, v = self.qkv(tokens).unsqueeze(1).chunk(3, -1)
        if self.fused:
            mixed = F.scaled_dot_product_attention(q, k, v)
        else:
            weights = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)
            mixed = weights @ v
        return torch.tanh(mixed[:, 0].mean(1))


class AttentionNet(nn.Module):
    def __init__(self, classes: int, hidden: int = 3):
        super().__init__()
        self.encoder = AttentionEncoder(hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.head(self.encoder(x))


class EagerAttentionTask(TinyTask):
    name = "tiny-attention"
    net = AttentionNet

    def shared_parameters(self):
        return [f"encoder.{n}" for n, _ in AttentionEncoder().named_parameters()]


class FusedAttentionTask(EagerAttentionTask):
    """The same trained models as EagerAttentionTask, calling the fused kernel."""

    def pretrained_model(self):
        return _fused(super().pretrained_model())

    def finetuned_model(self, scenario):
        return _fused(super().finetuned_model(scenario))


def _fused(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model)
    model.encoder.fused = True
    return model
