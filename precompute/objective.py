"""Training objectives as functions of a flat parameter vector.

An `Objective` is F(theta) = (1/n) sum_i loss(x_i; theta) + (1/2) theta^T diag(reg) theta (+ terms
linear in theta, which no second derivative sees), where theta is a chosen subset of a model's
parameters (a `ParamSpace`) and every other parameter of the model is a constant. It gives what
the influence computation needs: Hessian-vector products over many vectors at once (double
backward, streamed over the data) and per-example loss gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import tree_map
from torch.utils.data import DataLoader, Dataset

LossFn = Callable[[torch.nn.Module, Any], torch.Tensor]


@dataclass(frozen=True)
class ParamSpace:
    """An ordered set of named parameters of a model, laid out as one flat vector."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @classmethod
    def of(cls, model: torch.nn.Module, names: list[str] | tuple[str, ...]) -> ParamSpace:
        params = dict(model.named_parameters())
        return cls(tuple(names), tuple(params[n].shape for n in names))

    @property
    def numels(self) -> list[int]:
        return [s.numel() for s in self.shapes]

    @property
    def size(self) -> int:
        return sum(self.numels)

    def __add__(self, other: ParamSpace) -> ParamSpace:
        return ParamSpace(self.names + other.names, self.shapes + other.shapes)

    def read(self, model: torch.nn.Module) -> torch.Tensor:
        """The model's current values of these parameters as one detached flat vector."""
        params = dict(model.named_parameters())
        return torch.cat([params[n].detach().reshape(-1) for n in self.names])

    def unflatten(self, vec: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of vec [..., size] as {name: tensor [..., *shape]}."""
        out, offset = {}, 0
        lead = vec.shape[:-1]
        for name, shape, n in zip(self.names, self.shapes, self.numels, strict=True):
            out[name] = vec[..., offset : offset + n].reshape(*lead, *shape)
            offset += n
        return out

    def split(self, vec: torch.Tensor, first: int) -> tuple[torch.Tensor, torch.Tensor]:
        """vec [..., size] cut after the first `first` parameters' entries."""
        cut = sum(self.numels[:first])
        return vec[..., :cut], vec[..., cut:]


def to_device(batch: Any, device: torch.device) -> Any:
    return tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, batch)


def batches(dataset: Dataset, batch_size: int, device: torch.device) -> Iterator[Any]:
    """The dataset in order, default collation, moved to `device`."""
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        yield to_device(batch, device)


class _Bound(torch.nn.Module):
    """A module whose forward is loss_fn(model, batch), so functional_call can swap parameters."""

    def __init__(self, model: torch.nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


def functional_loss(
    model: torch.nn.Module, loss_fn: LossFn, space: ParamSpace
) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    """(theta, batch) -> per-example losses [B] with the space's parameters set to theta."""
    bound = _Bound(model, loss_fn)

    def loss(theta: torch.Tensor, batch: Any) -> torch.Tensor:
        params = {f"model.{n}": t for n, t in space.unflatten(theta).items()}
        return torch.func.functional_call(bound, params, (batch,))

    return loss


class Objective:
    """F(theta) = (1/n) sum_i loss(x_i; theta) + (1/2) theta^T diag(reg) theta.

    theta = the space's parameters of `model` at their current values (the optimum).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss_fn: LossFn,
        dataset: Dataset,
        space: ParamSpace,
        reg: torch.Tensor,
        batch_size: int = 512,
        rhs_chunk: int | None = None,
    ):
        self.model, self.loss_fn = model, loss_fn
        self.space = space
        self.dataset = dataset
        self.n = len(dataset)
        self.theta = space.read(model)
        self.device = self.theta.device
        self.reg = reg.to(self.theta)
        self.batch_size = batch_size
        # vectors per vmapped product: many for small models (fewer, larger kernels), few for
        # large ones, whose per-vector activations would otherwise take gigabytes
        self.rhs_chunk = rhs_chunk or max(1, min(256, 2**22 // max(1, space.size)))
        self.loss = functional_loss(model, loss_fn, space)

    @property
    def size(self) -> int:
        return self.space.size

    @torch.no_grad()  # torch.func transforms inside still differentiate; nothing else records
    def data_hvp(self, vectors: torch.Tensor) -> torch.Tensor:
        """(1/n) sum_i d2 loss_i/dtheta2 @ v for each row v of vectors [Q, p] (double backward)."""
        out = torch.zeros_like(vectors)
        for batch in batches(self.dataset, self.batch_size, self.device):

            def grad_sum(theta, batch=batch):
                return torch.func.grad(lambda t: self.loss(t, batch).sum())(theta)

            _, vjp = torch.func.vjp(grad_sum, self.theta)
            for start in range(0, len(vectors), self.rhs_chunk):
                chunk = vectors[start : start + self.rhs_chunk]
                out[start : start + len(chunk)] += torch.func.vmap(vjp)(chunk)[0]
        return out / self.n

    def hvp(self, vectors: torch.Tensor) -> torch.Tensor:
        """d2F/dtheta2 @ v for each row v of vectors [Q, p] (data term plus regulariser)."""
        return self.data_hvp(vectors) + vectors * self.reg

    def per_example_grads(self, dataset: Dataset) -> torch.Tensor:
        """d loss(x)/dtheta for every x in dataset, [len(dataset), p] (no regulariser)."""
        return per_example_grads(self.loss, self.theta, dataset, self.batch_size)


@torch.no_grad()
def batch_grads(
    loss: Callable[[torch.Tensor, Any], torch.Tensor], theta: torch.Tensor, batch: Any
) -> torch.Tensor:
    """Rows d loss(x; theta)/dtheta for the examples x of a collated batch, [B, p] (vmap)."""

    def single(theta, item):
        return loss(theta, tree_map(lambda x: x.unsqueeze(0), item))[0]

    return torch.func.vmap(torch.func.grad(single), in_dims=(None, 0))(theta, batch)


def per_example_grads(
    loss: Callable[[torch.Tensor, Any], torch.Tensor],
    theta: torch.Tensor,
    dataset: Dataset,
    batch_size: int = 256,
) -> torch.Tensor:
    """Rows d loss(x; theta)/dtheta for every x in dataset, [len(dataset), p]."""
    rows = [batch_grads(loss, theta, b) for b in batches(dataset, batch_size, theta.device)]
    return torch.cat(rows) if rows else theta.new_zeros(0, theta.numel())
