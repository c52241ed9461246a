"""Per-layer rules: a layer's per-example weight gradient from its input and output gradient.

Shared by the pretraining pass (precompute.scoring) and EK-FAC (precompute.ekfac). A forward
hook records each supported layer's input a and the gradient g of the summed loss with respect
to its output; examples are independent, so row b of g is example b's own output gradient.

Dense layers (`DenseRule`): the output at position n of group c is y_n = W_c a_n (+ b_c), so
example b's weight gradient is a sum over output positions, G_b = sum_n g_bn a_bn^T, [out, in]
per group, and its bias gradient sum_n g_bn.
- nn.Linear: one group; positions are the leading dimensions between batch and features.
- nn.Conv1d / nn.Conv2d: a_bn = the unfolded input patch (in/groups x kernel) under output
  position n, padded as the layer pads; one block per group of channels.
- GPT-2's `Conv1D` (transformers.pytorch_utils): y = x W + b with W stored [in, out].
nn.Embedding (`EmbeddingRule`): the gradient of row v is the sum of g_bn over positions with
token v. Other parameters (LayerNorm, ...) have no rule here and use vmapped per-example
gradients.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from precompute.objective import LossFn


class DenseRule:
    """Linear maps applied at positions: Linear, Conv1d, Conv2d, GPT-2's Conv1D."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.groups = getattr(module, "groups", 1)
        self.transposed = _is_gpt2_conv1d(module)

    # ---- shapes ---------------------------------------------------------------------------
    def inputs(self, a: torch.Tensor) -> torch.Tensor:
        """Inputs per example, group and position: [B, groups, N, in/groups (x kernel)]."""
        m = self.module
        if isinstance(m, nn.Conv1d | nn.Conv2d):
            return self._patches(a)
        return a.reshape(a.shape[0], 1, -1, a.shape[-1])

    def outputs(self, g: torch.Tensor) -> torch.Tensor:
        """Output gradients per example, group and position: [B, groups, N, out/groups]."""
        batch = g.shape[0]
        if isinstance(self.module, nn.Conv1d | nn.Conv2d):
            g = g.reshape(batch, self.groups, -1, g[0, 0].numel())  # [B, G, out/G, N]
            return g.transpose(2, 3)
        return g.reshape(batch, 1, -1, g.shape[-1])

    def to_matrix(self, w: torch.Tensor) -> torch.Tensor:
        """Weight blocks [..., *weight.shape] as [..., groups, out/groups, in/groups]."""
        if self.transposed:
            return w.transpose(-1, -2).unsqueeze(-3)
        shape = self.module.weight.shape
        lead = w.shape[: w.dim() - len(shape)]
        return w.reshape(*lead, self.groups, shape[0] // self.groups, -1)

    def from_matrix(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of to_matrix: [..., groups, out/groups, in/groups] -> [..., *shape]."""
        if self.transposed:
            return x.squeeze(-3).transpose(-1, -2)
        lead = x.shape[:-3]
        return x.reshape(*lead, *self.module.weight.shape)

    def bias_to_matrix(self, b: torch.Tensor) -> torch.Tensor:
        """Bias blocks [..., out] as [..., groups, out/groups]."""
        return b.reshape(*b.shape[:-1], self.groups, -1)

    # ---- convolutions ---------------------------------------------------------------------
    def _patches(self, a: torch.Tensor) -> torch.Tensor:
        m = self.module
        one_d = isinstance(m, nn.Conv1d)
        if one_d:  # as a 2-d convolution of height 1
            a = a.unsqueeze(-2)
        kernel, stride, dilation = (_pair(v, one_d) for v in (m.kernel_size, m.stride, m.dilation))
        pad = m._reversed_padding_repeated_twice  # handles "same" (asymmetric) and the modes
        if one_d:
            pad = [*pad, 0, 0]
        if any(pad):
            mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
            a = F.pad(a, pad, mode=mode)
        patches = F.unfold(a, kernel, dilation=dilation, stride=stride)  # [B, C k, N]
        batch = a.shape[0]
        return patches.reshape(batch, self.groups, -1, patches.shape[-1]).transpose(2, 3)


class EmbeddingRule:
    """nn.Embedding: the per-example gradient of row v is sum of g_n over positions with v."""

    def __init__(self, module: nn.Embedding):
        self.module = module

    def tokens_and_grads(self, idx: torch.Tensor, g: torch.Tensor):
        """(token ids [B, N], output gradients [B, N, d] with padding positions zeroed)."""
        batch = idx.shape[0]
        idx = idx.reshape(batch, -1)
        g = g.reshape(batch, idx.shape[1], -1)
        if self.module.padding_idx is not None:
            g = g * (idx != self.module.padding_idx).unsqueeze(-1)
        return idx, g


def _pair(value, one_d: bool) -> tuple[int, int]:
    value = tuple(value) if isinstance(value, tuple | list) else (value,)
    return (1, value[0]) if one_d else (value[0], value[-1])


def _is_gpt2_conv1d(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 2
        and weight.shape[1] == getattr(module, "nf", None)
    )


def rule_for(module: nn.Module, ids: set[int]) -> DenseRule | EmbeddingRule | None:
    """The rule of a layer whose weight is a parameter in `ids` (by id), else None."""
    weight = getattr(module, "weight", None)
    if weight is None or id(weight) not in ids:
        return None
    if isinstance(module, nn.Embedding):
        return EmbeddingRule(module) if module.max_norm is None and not module.sparse else None
    if isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d) or _is_gpt2_conv1d(module):
        return DenseRule(module)
    return None


def rules(model: nn.Module, ids: set[int]) -> dict[nn.Module, DenseRule | EmbeddingRule]:
    """The layer rules of every supported layer of `model` whose weight is in `ids`."""
    found = {}
    for module in model.modules():
        rule = rule_for(module, ids)
        if rule is not None:
            found[module] = rule
    return found


class _Recorder:
    """Forward hooks that keep each supported layer's input and output for one forward."""

    def __init__(self, modules: list[nn.Module]):
        self.calls: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []
        self.handles = [m.register_forward_hook(self._hook) for m in modules]

    def _hook(self, module, inputs, output):
        self.calls.append((module, inputs[0], output))

    def close(self):
        for h in self.handles:
            h.remove()


def _recorded(model: nn.Module, fn: LossFn, batch: Any, modules: list[nn.Module]):
    """(fn(model, batch) with its graph, [(module, input, output)] for every call of the modules
    whose output the graph reaches)."""
    recorder = _Recorder(modules)
    try:
        with torch.enable_grad():
            result = fn(model, batch)
    finally:
        recorder.close()
    return result, [c for c in recorder.calls if c[2].requires_grad]


def layer_calls(
    model: nn.Module, loss_fn: LossFn, batch: Any, modules: list[nn.Module]
) -> tuple[int, list[tuple[nn.Module, torch.Tensor, torch.Tensor]]]:
    """(batch size, [(module, input, d sum(loss)/d output)] for every call of the modules).

    Examples are independent, so the output gradient of the summed loss holds each example's
    own output gradient in its row. First derivatives only: fused attention kernels are kept.
    """
    loss, calls = _recorded(model, loss_fn, batch, modules)
    if not calls:
        return loss.shape[0], []
    grads = torch.autograd.grad(loss.sum(), [c[2] for c in calls], allow_unused=True)
    found = [
        (module, inp.detach(), g.detach())
        for (module, inp, _), g in zip(calls, grads, strict=True)
        if g is not None
    ]
    return loss.shape[0], found


def weighted_output_calls(
    model: nn.Module, outputs_fn: LossFn, batch: Any, modules: list[nn.Module], weights_of
) -> Iterator[list[tuple[nn.Module, torch.Tensor, torch.Tensor]]]:
    """For each output weighting w [B, K] in weights_of(f) [C, B, K]: [(module, input, d sum_i
    <f_i, w_i> / d output)] for every call of the modules, f = outputs_fn(model, batch) [B, ...]
    (K outputs per example; weights_of sees it detached), the C backward passes sharing ONE
    forward, whose graph is kept until the last. EK-FAC's Gauss-Newton fit weights the outputs
    by every column of the loss Hessian's root (up to 16) or by one draw: one forward for the
    weights and every backward, where it took one per column and one more for the weights."""
    outputs, calls = _recorded(model, outputs_fn, batch, modules)
    flat = outputs.reshape(len(outputs), -1)
    weights = weights_of(outputs.detach())
    for k, w in enumerate(weights):
        if not calls:
            yield []
            continue
        grads = torch.autograd.grad(
            (flat * w).sum(), [c[2] for c in calls], allow_unused=True,
            retain_graph=k + 1 < len(weights),
        )  # fmt: skip
        yield [
            (module, inp.detach(), g.detach())
            for (module, inp, _), g in zip(calls, grads, strict=True)
            if g is not None
        ]


def broadcast_layers(
    model: nn.Module, loss_fn: LossFn, batch: Any, modules: list[nn.Module]
) -> set[nn.Module]:
    """The modules called on an input that is not split by example (a leading dimension other
    than the batch's: Hugging Face's position ids [1, N], broadcast over the batch after the
    lookup). Their per-example weight gradients cannot be read from the call: such weights take
    the per-example (vmap) path. `batch` should hold at least two examples."""
    size, calls = layer_calls(model, loss_fn, batch, modules)
    return {module for module, inp, _ in calls if inp.shape[0] != size}


def dense_weight_grads(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-example weight gradients sum_n g_bn a_bn^T: [B, groups, out, in] from
    a [B, groups, N, in] and g [B, groups, N, out]."""
    return torch.einsum("bgno,bgni->bgoi", g, a)
