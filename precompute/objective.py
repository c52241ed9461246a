"""Training objectives as functions of a flat parameter vector.

An `Objective` is F(theta) = (1/n) sum_i loss(x_i; theta) + (1/2) theta^T diag(reg) theta (+ terms
linear in theta, which no second derivative sees), where theta is a chosen subset of a model's
parameters (a `ParamSpace`) and every other parameter of the model is a constant. It gives what
the influence computation needs: curvature-vector products over many vectors at once (streamed
over the data) and per-example loss gradients.

Two curvatures of the data term, chosen per objective (`curvature`):
- "hessian": the true Hessian (1/n) sum_i d2 loss_i / dtheta2, by double backward. It is the
  right matrix at an exact optimum (where it is positive semi-definite), e.g. the built-in
  float64 tasks trained to a tiny gradient norm.
- "ggn": the generalised Gauss-Newton matrix (1/n) sum_i J_i^T H_i J_i, with the loss split as
  loss_i = h(f(x_i; theta), x_i), J_i = df/dtheta the Jacobian of the network function and
  H_i = d2h/df2 the Hessian of the loss in the outputs (a `LossSplit`). With h convex (cross
  entropy, squared error) it is positive semi-definite everywhere, so a damped solve is well
  posed for models trained by SGD, which stop short of an optimum and whose true Hessian is
  indefinite. It drops the term sum_i (dh/df)_i d2f_i/dtheta2, which vanishes where the
  residuals dh/df do. Products: J v by forward mode, H_i (J v) by forward over reverse on h,
  J^T (.) by reverse mode; or, once a solve has recorded them (precompute.curvature.
  prepare_products), from the layers' stored factors without the network (precompute.factors).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import tree_map
from torch.utils.data import Dataset, Subset, TensorDataset, default_collate

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


@contextmanager
def second_order():
    """Run torch.func transforms (double backward, vmap) under the math backend of
    `scaled_dot_product_attention`.

    The fused kernels (flash, memory-efficient, cuDNN) have no double backward and no vmap
    batching rule; the math backend computes the same attention (to rounding) from plain
    differentiable operations. First-order passes outside this context keep the fast kernels.
    """
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch without the attention module has no fused kernels to avoid
        yield
        return
    with sdpa_kernel(SDPBackend.MATH):
        yield


def to_device(batch: Any, device: torch.device, non_blocking: bool = False) -> Any:
    move = lambda x: x.to(device, non_blocking=non_blocking)  # noqa: E731
    return tree_map(lambda x: move(x) if isinstance(x, torch.Tensor) else x, batch)


def fetch(dataset: Dataset, indices: range | list[int]) -> Any:
    """The examples at `indices` as one batch, as a DataLoader's default collation gives it,
    without a Python call per example where the dataset allows: a TensorDataset is sliced (a
    range) or indexed (a list), a Subset passes its indices down, a dataset with `batch_of`
    (precompute.parquet_data) returns the collated batch itself, a dataset with
    `__getitems__` (the DataLoader's batched-fetch protocol) is asked once; any other dataset
    is read item by item and collated."""
    batch_of = getattr(dataset, "batch_of", None)  # a dataset that collates batches itself
    if callable(batch_of):
        return batch_of(indices)
    if _plain(dataset, TensorDataset):
        if isinstance(indices, range) and indices.step == 1:
            return [t[indices.start : indices.stop] for t in dataset.tensors]
        index = torch.as_tensor(list(indices), dtype=torch.long)
        return [t[index] for t in dataset.tensors]
    if _plain(dataset, Subset):
        return fetch(dataset.dataset, [int(dataset.indices[i]) for i in indices])
    getitems = getattr(dataset, "__getitems__", None)
    items = getitems(list(indices)) if getitems else [dataset[i] for i in indices]
    return default_collate(items)


def _plain(dataset: Dataset, kind: type) -> bool:
    """An instance of `kind` whose items are `kind`'s own (a subclass may transform them)."""
    return isinstance(dataset, kind) and type(dataset).__getitem__ is kind.__getitem__


def batches(
    dataset: Dataset, batch_size: int, device: torch.device, within: range | None = None
) -> Iterator[Any]:
    """The dataset in order (the examples `within`, default all), in batches of `batch_size`
    (see `fetch`), moved to `device`.

    On CUDA the next batch is fetched, pinned and its copy queued (non-blocking) before the
    current one is handed out, so loading overlaps the GPU's work on the current batch.
    """
    within = within if within is not None else range(len(dataset))
    parts = [
        range(start, min(start + batch_size, within.stop))
        for start in range(within.start, within.stop, batch_size)
    ]
    if torch.device(device).type != "cuda":
        for part in parts:
            yield to_device(fetch(dataset, part), device)
        return
    pending = None
    for part in parts:
        batch = fetch(dataset, part)
        batch = tree_map(lambda x: x.pin_memory() if isinstance(x, torch.Tensor) else x, batch)
        ready = to_device(batch, device, non_blocking=True)
        if pending is not None:
            yield pending
        pending = ready
    if pending is not None:
        yield pending


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


@dataclass(frozen=True)
class LossSplit:
    """A per-example loss written as loss(model, batch) = loss_of_outputs(outputs(model, batch),
    batch), with loss_of_outputs convex in the outputs: what the Gauss-Newton matrix needs.

    `outputs(model, batch)` is the network function f [B, ...] (e.g. logits);
    `loss_of_outputs(outputs, batch)` the per-example loss h [B]. `source` says where the split
    came from (the task's hooks, or the standard loss it was recognised as). `sample(outputs,
    batch, generator)`, where known (the standard losses), draws w_i [B, K] (K = outputs per
    example) with E[w_i w_i^T] = d2h/df2 at f_i in closed form, for EK-FAC's sampled fit;
    `root(outputs, batch)`, where known, L_i [B, K, C] with L_i L_i^T = d2h/df2 at f_i in closed
    form (C columns, as few as the Hessian's rank allows), for the fits and stored factors that
    take every column (precompute.ekfac.ggn_roots)."""

    outputs: LossFn
    loss_of_outputs: Callable[[torch.Tensor, Any], torch.Tensor]
    source: str = "hooks"
    sample: Callable[[torch.Tensor, Any, torch.Generator], torch.Tensor] | None = None
    root: Callable[[torch.Tensor, Any], torch.Tensor] | None = None


CURVATURES = ("hessian", "ggn")
# activation entries (vectors x examples x per-example activations) of one vmapped product: on a
# CPU small enough for the caches (2**27 ran 1.4-2.1x slower than 2**22 on three models,
# benchmarks/products.py); on a GPU large, for fewer kernel launches
PRODUCT_BUDGET = 2**22
GPU_PRODUCT_BUDGET = 2**27
MAX_PRODUCT_VECTORS = 256  # vectors in one vmapped product at most
SUM_BLOCKS = 64  # a sum over the data is taken in at most this many blocks, added in order


def device_memory(device: torch.device) -> int:
    """Bytes of memory of a device: the GPU's, or the machine's physical memory for a CPU (8 GiB
    where the system does not say)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 8 * 2**30


def sum_blocks(n: int, batch_size: int) -> list[range]:
    """The blocks, whole batches of `batch_size` and at most SUM_BLOCKS of them, in which a sum
    over n examples is taken: each block's sum, batch by batch, then the blocks' sums in order.
    The partition depends only on n and the batch size, so a sum split over workers by blocks
    (precompute.ray_engine) adds the same numbers in the same order as this process does."""
    batches_in = -(-n // batch_size)
    block = -(-batches_in // SUM_BLOCKS) * batch_size
    return [range(start, min(start + block, n)) for start in range(0, n, block)]


def ordered_sum(parts):
    """The element-wise sum of equally structured parts (tensors, None, lists, tuples of
    them), added in the order given."""
    total = None
    for part in parts:
        total = _add(total, part)
    return total


def _add(a, b):
    if a is None:
        return b
    if b is None:
        return a
    if isinstance(a, list | tuple):
        return type(a)(_add(x, y) for x, y in zip(a, b, strict=True))
    return a + b


def activation_size(model: torch.nn.Module, loss_fn: LossFn, batch: Any) -> int:
    """Entries of every leaf module's output per example, measured on one forward of `batch`:
    what one vector of a vmapped product holds per example."""
    total = 0

    def count(module, inputs, output):
        nonlocal total
        leaves = [t for t in torch.utils._pytree.tree_leaves(output) if isinstance(t, torch.Tensor)]
        total += sum(t.numel() for t in leaves)

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(count) for m in leaves]
    try:
        with torch.no_grad():
            losses = loss_fn(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return max(1, total // max(1, len(losses)))


class Objective:
    """F(theta) = (1/n) sum_i loss(x_i; theta) + (1/2) theta^T diag(reg) theta.

    theta = the space's parameters of `model` at their current values (the optimum).
    `curvature` ("hessian" or "ggn", see the module docstring) is the matrix `hvp` multiplies
    by; "ggn" needs `split`.
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
        curvature: str = "hessian",
        split: LossSplit | None = None,
    ):
        if curvature not in CURVATURES:
            raise ValueError(f"curvature {curvature!r} is unknown: use {', '.join(CURVATURES)}")
        if curvature == "ggn" and split is None:
            raise ValueError("the Gauss-Newton curvature needs the loss split into outputs")
        self.model, self.loss_fn = model, loss_fn
        self.space = space
        self.dataset = dataset
        self.n = len(dataset)
        self.theta = space.read(model)
        self.device = self.theta.device
        self.reg = reg.to(self.theta)
        self.batch_size = batch_size
        self.rhs_chunk = rhs_chunk  # vectors per vmapped product; None: see product_shape
        self.loss = functional_loss(model, loss_fn, space)
        self.curvature = curvature
        self.split = split
        self.outputs = functional_loss(model, split.outputs, space) if split else None
        self._activations: int | None = None
        # an engine summing curvature products and EK-FAC statistics over shards of the data
        # on other workers (precompute.ray_engine.RayCurvature), or None: this process
        self.sharded = None
        # the Gauss-Newton matrix's stored layer factors (precompute.factors.GGNFactors), which
        # take its products without the network once recorded, or None
        self.factors = None

    def product_shape(self, rows: int) -> tuple[int, int]:
        """(vectors per vmapped product, examples per batch) of a curvature product over `rows`
        vectors, so that vectors x examples x activations per example stays within the budget
        (PRODUCT_BUDGET on a CPU, GPU_PRODUCT_BUDGET on a GPU): as many vectors as fit beside
        batch_size examples (at most MAX_PRODUCT_VECTORS, and at most budget / p, whose
        [vectors, p] results every batch adds), in equal parts, then as many examples as fit
        beside them, up to all n, and at least batch_size. Small models gain from large batches
        (a vmapped product over a few examples is mostly per-batch overhead); a model with large
        activations per example takes fewer vectors at a time rather than outgrow the caches:
        news' UPDATED product, one vector at a time over its 300 articles, ran 2.2x faster than
        40 at a time over 256 (benchmarks/products.py measures both rules side by side)."""
        if self._activations is None:
            first = next(batches(self.dataset, min(4, self.n), self.device))
            self._activations = activation_size(self.model, self.loss_fn, first)
        budget = GPU_PRODUCT_BUDGET if self.device.type == "cuda" else PRODUCT_BUDGET
        vectors = self.rhs_chunk or min(
            rows,
            MAX_PRODUCT_VECTORS,
            budget // max(1, self.size),
            budget // (self.batch_size * self._activations),
        )
        rows = max(1, rows)
        vectors = -(-rows // -(-rows // max(1, vectors)))  # equal parts: 50 + 50, not 95 + 5
        examples = budget // (vectors * self._activations)
        return vectors, max(self.batch_size, min(self.n, examples))

    def product_batch(self, rows: int) -> int:
        """Examples per batch of a curvature product over `rows` vectors (`product_shape`)."""
        return self.product_shape(rows)[1]

    @property
    def size(self) -> int:
        return self.space.size

    @torch.no_grad()  # torch.func transforms inside still differentiate; nothing else records
    def hessian_sum(
        self, vectors: torch.Tensor, within: range | None = None, size: int | None = None
    ) -> torch.Tensor:
        """sum_i d2 loss_i/dtheta2 @ v over the examples i in `within` (default all), in
        batches of `size` (default product_batch), for each row v of vectors [Q, p] (double
        backward)."""
        out = torch.zeros_like(vectors)
        chunk, chosen = self.product_shape(len(vectors))
        size = size or chosen
        for batch in batches(self.dataset, size, self.device, within=within):

            def grad_sum(theta, batch=batch):
                return torch.func.grad(lambda t: self.loss(t, batch).sum())(theta)

            with second_order():
                _, vjp = torch.func.vjp(grad_sum, self.theta)
                for start in range(0, len(vectors), chunk):
                    part = vectors[start : start + chunk]
                    out[start : start + len(part)] += torch.func.vmap(vjp)(part)[0]
        return out

    @torch.no_grad()
    def ggn_sum(
        self, vectors: torch.Tensor, within: range | None = None, size: int | None = None
    ) -> torch.Tensor:
        """sum_i J_i^T H_i J_i @ v over the examples i in `within` (default all), in batches of
        `size` (default product_batch), for each row v of vectors [Q, p]: J_i v by forward mode,
        H_i (J_i v) = d/de grad_f h(f + e J_i v) by forward over reverse, then one reverse-mode
        product with J^T, vmapped over the rows."""
        split = self.split
        out = torch.zeros_like(vectors)
        chunk, chosen = self.product_shape(len(vectors))
        size = size or chosen
        for batch in batches(self.dataset, size, self.device, within=within):

            def network(theta, batch=batch):
                return self.outputs(theta, batch)

            def loss_grad(outputs, batch=batch):
                return torch.func.grad(lambda o: split.loss_of_outputs(o, batch).sum())(outputs)

            with second_order():
                outputs, vjp = torch.func.vjp(network, self.theta)

                def product(v, network=network, loss_grad=loss_grad, outputs=outputs, vjp=vjp):
                    jv = torch.func.jvp(network, (self.theta,), (v,))[1]
                    hjv = torch.func.jvp(loss_grad, (outputs,), (jv,))[1]
                    return vjp(hjv)[0]

                for start in range(0, len(vectors), chunk):
                    part = vectors[start : start + chunk]
                    out[start : start + len(part)] += torch.func.vmap(product)(part)
        return out

    def data_hvp(self, vectors: torch.Tensor) -> torch.Tensor:
        """(1/n) sum_i d2 loss_i/dtheta2 @ v for each row v of vectors [Q, p]."""
        return self._data_sum(self.hessian_sum, vectors)

    def data_ggn(self, vectors: torch.Tensor) -> torch.Tensor:
        """(1/n) sum_i J_i^T H_i J_i @ v for each row v of vectors [Q, p]."""
        return self._data_sum(self.ggn_sum, vectors)

    def curvature_sum(
        self, vectors: torch.Tensor, within: range | None = None, size: int | None = None
    ) -> torch.Tensor:
        """The chosen curvature's data sum (Hessian or GGN) over the examples in `within`."""
        if self.curvature == "ggn":
            return self.ggn_sum(vectors, within, size)
        return self.hessian_sum(vectors, within, size)

    def data_curvature(self, vectors: torch.Tensor) -> torch.Tensor:
        """The data term of the chosen curvature times each row of vectors, the blocks' sums
        taken by the sharded engine (`sharded`) when one is attached, else from the stored
        Gauss-Newton factors (`factors`) when recorded, else here."""
        if self.sharded is not None:
            size = self.product_batch(len(vectors))
            blocks = sum_blocks(self.n, size)
            return self.sharded.curvature_sum(vectors, blocks, size) / self.n
        if self.factors is not None:
            return self.factors.product(vectors)
        return self._data_sum(self.curvature_sum, vectors)

    def _data_sum(self, term, vectors: torch.Tensor) -> torch.Tensor:
        """(1/n) sum over the data of term(vectors, block, size), block by block in order
        (`sum_blocks`)."""
        size = self.product_batch(len(vectors))
        blocks = sum_blocks(self.n, size)
        return ordered_sum(term(vectors, b, size) for b in blocks) / self.n

    def mean_eigenvalue(self) -> float | None:
        """trace(C) / p exactly where the stored Gauss-Newton factors give the data term's
        trace (precompute.factors.GGNFactors.trace; the regulariser adds sum(reg)), else None:
        solvers then estimate it (Hutchinson)."""
        if self.factors is None or self.sharded is not None:
            return None
        return (self.factors.trace() + self.reg.sum().item()) / self.size

    def hvp(self, vectors: torch.Tensor) -> torch.Tensor:
        """C @ v for each row v of vectors [Q, p], C = the chosen curvature of F: the data term's
        Hessian or GGN, plus diag(reg) (quadratic, so exact in both)."""
        return self.data_curvature(vectors).addcmul_(vectors, self.reg)

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

    with second_order():  # vmap: fused attention kernels have no batching rule
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
