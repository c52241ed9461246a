"""The pretraining pass: score(z, t) = (1/m) s_t . grad_{W,U} g(z) for all z and all tests t.

One streaming pass over the m pretraining examples. The Q test-side vectors s_t are contracted
with per-example gradients batch by batch; an (examples x parameters) matrix never exists.

For layers with a rule in precompute.layers (nn.Linear, nn.Conv1d, nn.Conv2d, GPT-2's Conv1D,
nn.Embedding) the contraction uses the layer structure instead of generic per-example
gradients: a dense layer with inputs a_n and output gradients g_n at positions n has per-example
weight gradient sum_n g_n a_n^T, so s . grad = sum_n g_n^T S a_n: with one position, one matrix
product with all Q rows of S stacked; with several (sequences, convolutions), the per-example
gradients formed from (a, g) and then one product. Any other parameter in (W, U) falls back to
per-example gradients from torch.func.vmap.
The first batch is checked against plain per-example gradients; a mismatch (a layer's weight
used outside its forward, say) switches the pass to the plain path.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map
from torch.utils.data import Dataset

from precompute.layers import (
    EmbeddingRule,
    broadcast_layers,
    dense_weight_grads,
    layer_calls,
    rules,
)
from precompute.objective import LossFn, ParamSpace, batch_grads, batches, functional_loss

Sink = Callable[[int, torch.Tensor], None]  # (first pretraining index, scores [Q, B])


@dataclass
class TopK:
    """Running k largest (helpful) and k smallest (harmful) scores per row."""

    k: int
    helpful_scores: torch.Tensor | None = None
    helpful_ids: torch.Tensor | None = None
    harmful_scores: torch.Tensor | None = None
    harmful_ids: torch.Tensor | None = None

    def update(self, scores: torch.Tensor, ids: torch.Tensor) -> None:
        ids = ids.expand_as(scores)
        for kind in ("helpful", "harmful"):
            self._fold(kind, scores, ids)

    def merge(self, other: TopK) -> TopK:
        """Fold in the lists of another part of the pretraining set (disjoint ids): the result
        is the top-k of the union, as if one pass had seen both parts."""
        if other.helpful_scores is None:
            return self
        for kind in ("helpful", "harmful"):
            self._fold(kind, getattr(other, f"{kind}_scores"), getattr(other, f"{kind}_ids"))
        return self

    def _fold(self, kind: str, scores: torch.Tensor, ids: torch.Tensor) -> None:
        """Keep the k largest (helpful) or smallest (harmful) of the list and (scores, ids)."""
        old_s, old_i = getattr(self, f"{kind}_scores"), getattr(self, f"{kind}_ids")
        s = scores if old_s is None else torch.cat([old_s, scores.to(old_s)], 1)
        i = ids if old_i is None else torch.cat([old_i, ids.to(old_i.device)], 1)
        top = torch.topk(s, min(self.k, s.shape[1]), dim=1, largest=kind == "helpful")
        setattr(self, f"{kind}_scores", top.values)
        setattr(self, f"{kind}_ids", i.gather(1, top.indices))

    def state(self) -> dict[str, torch.Tensor]:
        """The lists as plain tensors on the CPU (to save with torch.save; load weights_only)."""
        names = ("helpful_scores", "helpful_ids", "harmful_scores", "harmful_ids")
        return {n: getattr(self, n).cpu() for n in names if getattr(self, n) is not None}

    @classmethod
    def from_state(cls, k: int, state: dict[str, torch.Tensor]) -> TopK:
        return cls(k, **state)


@dataclass
class PassResult:
    top: TopK
    path: str  # "layers" or "vmap"
    layer_params: list[str] = field(default_factory=list)
    vmap_params: list[str] = field(default_factory=list)
    engine: dict = field(default_factory=dict)  # where it ran (precompute.ray_engine)


def _dense(a, g, s_w, s_b, q, budget=2**25):
    """sum_n g_n^T S_w a_n (+ sum_n g_n . s_b) for every example and every row: [Q, B].

    a [B, groups, N, in] and g [B, groups, N, out] come from a DenseRule; s_w is the weight block
    [Q, groups, out, in] (contiguous), s_b the bias block [Q, groups, out].
    """
    batch, groups, positions = a.shape[:3]
    out = torch.zeros(q, batch, dtype=g.dtype, device=g.device)
    if s_w is not None:
        if positions == 1 and groups == 1:  # (a S^T) . g, a single matrix product over Q rows
            y = (a[:, 0, 0] @ s_w.view(-1, s_w.shape[-1]).T).view(batch, q, -1)  # [B, Q, out]
            out += torch.bmm(y, g[:, 0, 0, :, None])[..., 0].T
        else:  # several positions: form the per-example gradients, then one product
            step = max(1, budget // max(1, s_w[0].numel()))
            for start in range(0, batch, step):
                per_example = dense_weight_grads(a[start : start + step], g[start : start + step])
                part = per_example.reshape(per_example.shape[0], -1)
                out[:, start : start + len(part)] += s_w.view(q, -1) @ part.T
    if s_b is not None:
        out += s_b.reshape(q, -1) @ g.sum(2).reshape(batch, -1).T
    return out


def _embedding(rule, idx, g, s_e, q, budget=2**25):
    """sum_n S_e[idx_n] . g_n for every example and row: [Q, B]."""
    idx, g = rule.tokens_and_grads(idx, g)
    batch = idx.shape[0]
    step = max(1, budget // max(1, q * idx.shape[1] * g.shape[-1]))
    parts = []
    for start in range(0, batch, step):
        i, gg = idx[start : start + step], g[start : start + step]
        rows = s_e[:, i.reshape(-1)]  # [Q, b*N, d]
        parts.append((rows * gg.reshape(1, -1, gg.shape[-1])).sum(-1).view(q, len(i), -1).sum(2))
    return torch.cat(parts, 1)


class Contraction:
    """Scores s . grad g(z) of one batch for all Q rows of S (no 1/m), [Q, B]."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        space: ParamSpace,
        s: torch.Tensor,
        skip: frozenset[nn.Module] = frozenset(),
    ):
        """`skip`: layers left to the per-example (vmap) path (see layers.broadcast_layers)."""
        self.model, self.loss_fn, self.space, self.q = model, loss_fn, space, len(s)
        blocks = space.unflatten(s)  # name -> [Q, *shape]
        params = dict(model.named_parameters())
        by_id = {id(params[n]): n for n in space.names}
        self.rules = {m: r for m, r in rules(model, set(by_id)).items() if m not in skip}
        self.modules = list(self.rules)
        # per layer: its blocks of S in the rule's layout (a weight tied between two layers is
        # read by both)
        self.s_weight: dict[nn.Module, torch.Tensor] = {}
        self.s_bias: dict[nn.Module, torch.Tensor] = {}
        covered = set()
        for module, rule in self.rules.items():
            weight = blocks[by_id[id(module.weight)]]
            covered.add(by_id[id(module.weight)])
            if isinstance(rule, EmbeddingRule):
                self.s_weight[module] = weight.contiguous()
                continue
            self.s_weight[module] = rule.to_matrix(weight).contiguous()
            bias = getattr(module, "bias", None)
            if bias is not None and id(bias) in by_id:
                self.s_bias[module] = rule.bias_to_matrix(blocks[by_id[id(bias)]]).contiguous()
                covered.add(by_id[id(bias)])
        self.layer_params = [n for n in space.names if n in covered]
        # the widest dense layer output (groups x out): a batch's products take Q x this each
        self.widest = max((w.shape[1] * w.shape[2] for m, w in self.s_weight.items()
                           if not isinstance(self.rules[m], EmbeddingRule)), default=0)  # fmt: skip
        left = [n for n in space.names if n not in covered]
        self.vmap_space = ParamSpace.of(model, left)
        self.s_left = torch.cat([blocks[n].reshape(self.q, -1) for n in left], 1) if left else None
        self.left_loss = functional_loss(model, loss_fn, self.vmap_space) if left else None
        self.full_loss = functional_loss(model, loss_fn, space)
        self.s = s
        self.use_layers = bool(self.modules)

    def __call__(self, batch: Any) -> torch.Tensor:
        if not self.use_layers:
            return self.plain(batch)
        out = self._layers(batch)
        if self.s_left is not None:
            theta = self.vmap_space.read(self.model)
            out = out + self.s_left @ batch_grads(self.left_loss, theta, batch).T
        return out

    def _layers(self, batch: Any) -> torch.Tensor:
        size, calls = layer_calls(self.model, self.loss_fn, batch, self.modules)
        out = torch.zeros(self.q, size, dtype=self.s.dtype, device=self.s.device)
        for module, inp, g in calls:
            rule = self.rules[module]
            if isinstance(rule, EmbeddingRule):
                out += _embedding(rule, inp, g, self.s_weight[module], self.q)
            else:
                a, g = rule.inputs(inp), rule.outputs(g)
                out += _dense(a, g, self.s_weight[module], self.s_bias.get(module), self.q)
        return out

    def plain(self, batch: Any) -> torch.Tensor:
        """The obvious path: per-example gradients over the whole space (vmap), then S @ grads^T."""
        theta = self.space.read(self.model)
        return self.s @ batch_grads(self.full_loss, theta, batch).T

    def check(self, batch: Any, rows: int = 4) -> bool:
        """Does the layer path agree with the plain path on the first examples of `batch`?"""
        if not self.use_layers:
            return True
        few = tree_map(lambda x: x[:rows] if isinstance(x, torch.Tensor) else x, batch)
        fast, slow = self(few), self.plain(few)
        tol = 1e-3 if self.s.dtype == torch.float32 else 1e-8
        scale = slow.abs().nan_to_num(0.0).max() + 1e-30
        return bool(
            torch.isclose(fast, slow, rtol=0.0, atol=float(tol * scale), equal_nan=True).all()
        )


class PretrainingPass:
    """The pass as a unit of work: the scores (1/m) s_t . grad g(z) of any batch of pretraining
    examples z, given with their ids, for all Q rows of S: [Q, B].

    Drivers (the local loop below, a distributed engine) call it on disjoint shards of the
    pretraining set; partial top lists merge exactly (TopK.merge). On its first batch, the layer
    path is checked against plain per-example gradients; on disagreement (a layer's weight used
    outside its forward, say) it switches to the plain path.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, space: ParamSpace, s: torch.Tensor,
                 m: int):  # fmt: skip
        self.contraction = Contraction(model, loss_fn, space, s)
        self.space, self.m = space, m
        self.checked = False
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None  # see verify

    def __call__(self, batch: Any, ids: torch.Tensor) -> torch.Tensor:
        contraction = self.contraction
        if not self.checked:
            self.checked = True
            few = tree_map(lambda x: x[:4] if isinstance(x, torch.Tensor) else x, batch)
            skip = broadcast_layers(
                contraction.model, contraction.loss_fn, few, contraction.modules
            )
            if skip:  # e.g. position embeddings: their weights take the vmap path
                c = contraction
                contraction = Contraction(c.model, c.loss_fn, c.space, c.s, frozenset(skip))
                self.contraction = contraction
            if not contraction.check(batch):
                warnings.warn(
                    "layer-structured scores disagree with per-example gradients on this model "
                    "(a layer's weight used outside its forward?); using per-example gradients",
                    stacklevel=2,
                )
                contraction.use_layers = False
        scores = contraction(batch) / self.m
        self.verify()  # the previous batch, whose work the device has finished by now
        self.pending = (~torch.isfinite(scores).all(0), ids)
        return scores

    def verify(self) -> None:
        """Refuse non-finite scores of the last batch scored.

        Checked one batch late (and by the driver after the last batch): reading a flag from a
        GPU waits for its work, so checking each batch at once would stall the loading of the
        next batch behind it."""
        if self.pending is None:
            return
        bad, ids = self.pending
        self.pending = None
        if bool(bad.any()):
            raise FloatingPointError(
                f"non-finite influence scores at pretraining example {int(ids[bad][0])} "
                "(non-finite pretraining loss or gradient there?)"
            )

    def auto_batch_size(self) -> int:
        """Examples per batch when none is given: large (16384 on a GPU, 1024 on a CPU: fewer,
        larger kernels), smaller where per-example gradients (vmapped parameters), a large
        model or many test rows would take more than about 1 GB (GPU) or 256 MB (CPU) a batch."""
        gpu = self.contraction.s.device.type == "cuda"
        base, budget = (16384, 2**30) if gpu else (1024, 2**28)
        c = self.contraction
        vmapped = c.vmap_space.size if c.use_layers else self.space.size
        # + rough allowances for activations and for the [Q, layer outputs] products
        per_example = vmapped + self.space.size // 16 + c.q * c.widest
        return int(min(base, max(32, budget // (4 * max(1, per_example)))))

    def result(self, top: TopK) -> PassResult:
        layers = self.contraction.use_layers
        return PassResult(
            top=top,
            path="layers" if layers else "vmap",
            layer_params=self.contraction.layer_params if layers else [],
            vmap_params=list(self.contraction.vmap_space.names if layers else self.space.names),
        )


def score_shard(
    unit: PretrainingPass,
    dataset: Dataset,
    shard: range,
    top_k: int,
    batch_size: int,
    sink: Sink | None = None,
    progress: Callable[[int], None] | None = None,
) -> TopK:
    """Run the unit of work over the pretraining examples `shard` (a range of ids): the shard's
    top-k lists; every batch's scores also go to `sink`."""
    device = unit.contraction.s.device
    stream = batches(dataset, batch_size, device, within=shard)
    return score_batches(unit, stream, shard.start, top_k, sink, progress)


def score_batches(
    unit: PretrainingPass,
    stream: Iterable[Any],
    start: int,
    top_k: int,
    sink: Sink | None = None,
    progress: Callable[[int], None] | None = None,
) -> TopK:
    """Run the unit of work over consecutive batches whose first example has id `start`."""
    device = unit.contraction.s.device
    top = TopK(top_k)
    for batch in stream:
        size = _size(batch)
        ids = torch.arange(start, start + size, device=device)
        scores = unit(batch, ids)
        top.update(scores, ids[None, :])
        if sink is not None:
            sink(start, scores)
        start += size
        if progress is not None:
            progress(size)
    unit.verify()
    return top


def shards(m: int, size: int) -> list[range]:
    """The pretraining ids 0..m-1 cut into consecutive shards of `size` (the last shorter)."""
    return [range(start, min(start + size, m)) for start in range(0, m, size)]


def score_pretraining(
    model: nn.Module,
    loss_fn: LossFn,
    dataset: Dataset,
    space: ParamSpace,
    s: torch.Tensor,
    top_k: int,
    batch_size: int | None = None,
    sink: Sink | None = None,
    progress: Callable[[int], None] | None = None,
    shard_size: int | Callable[[int], int] | None = None,
    store: ShardStore | None = None,
) -> PassResult:
    """Stream the pretraining set; score = (1/m) s . grad g(z); keep top-k, send scores to sink.

    The local driver of the unit of work: shard by shard, in order. With a `store`, shards it
    holds are not run again (their top lists are loaded) and each finished shard is saved, so
    an interrupted pass resumes where it stopped. `batch_size` None: the unit's choice;
    `shard_size` may be a function of the batch size.
    """
    m = len(dataset)
    unit = PretrainingPass(model, loss_fn, space, s, m)
    batch_size = batch_size or unit.auto_batch_size()
    if callable(shard_size):
        shard_size = shard_size(batch_size)
    top = TopK(top_k)
    parts = shards(m, shard_size or m or 1)
    done = finished(store, parts, progress)
    for shard in parts:
        part = done.get(shard.start)
        if part is None:
            part = score_shard(unit, dataset, shard, top_k, batch_size, sink, progress)
            if store is not None:
                store.save(shard, part)
        top.merge(part)
    return unit.result(top)


def finished(store: ShardStore | None, parts: list[range], progress=None) -> dict[int, TopK]:
    """{shard start: its top lists} of the shards `store` holds (counted as progress)."""
    done = {}
    for shard in parts:
        part = store.load(shard) if store is not None else None
        if part is not None:
            done[shard.start] = part
            if progress is not None:
                progress(len(shard))
    return done


class ShardStore:
    """Finished shards of a pass in a folder: each shard's top lists in `shard-<start>.pt`
    (torch.save of plain tensors, read back with weights_only=True), written atomically after
    `flush` (e.g. of the memory-mapped full scores) has made the shard's scores durable."""

    def __init__(self, folder, top_k: int, flush: Callable[[], None] | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.top_k, self.flush = top_k, flush

    def _path(self, shard: range):
        return self.folder / f"shard-{shard.start:012d}-{shard.stop:012d}.pt"

    def load(self, shard: range) -> TopK | None:
        path = self._path(shard)
        if not path.is_file():
            return None
        return TopK.from_state(self.top_k, torch.load(path, weights_only=True))

    def save(self, shard: range, top: TopK) -> None:
        if self.flush is not None:
            self.flush()
        path = self._path(shard)
        partial = path.with_suffix(".partial")
        torch.save(top.state(), partial)
        os.replace(partial, path)

    def count(self) -> int:
        return len(list(self.folder.glob("shard-*.pt")))


def _size(batch: Any) -> int:
    return int(torch.utils._pytree.tree_leaves(batch)[0].shape[0])


def naive_scores(
    model: nn.Module, loss_fn: LossFn, dataset: Dataset, space: ParamSpace, s: torch.Tensor
) -> torch.Tensor:
    """Reference: one backward per pretraining example, dot with each s_t; [Q, m], with 1/m."""
    params = dict(model.named_parameters())
    tensors = [params[n] for n in space.names]
    m = len(dataset)
    columns = []
    for batch in batches(dataset, 1, s.device):
        with torch.enable_grad():
            loss = loss_fn(model, batch).sum()
        grads = torch.autograd.grad(loss, tensors, allow_unused=True)
        flat = torch.cat(
            [
                (g if g is not None else torch.zeros_like(t)).reshape(-1)
                for g, t in zip(grads, tensors, strict=True)
            ]
        )
        columns.append(s @ flat)
    return torch.stack(columns, 1) / m
