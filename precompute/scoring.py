"""The pretraining pass: score(z, t) = (1/m) s_t . grad_{W,U} g(z) for all z and all tests t.

One streaming pass over the m pretraining examples. The Q test-side vectors s_t are contracted
with per-example gradients batch by batch; an (examples x parameters) matrix never exists.

For nn.Linear and nn.Embedding layers the contraction uses the layer structure instead of
per-example gradients: a Linear layer with input a and output gradient g has per-example weight
gradient sum_n g_n a_n^T, so s . grad = sum_n g_n^T S a_n, one matrix product with all Q rows of S
stacked. Any other parameter in (W, U) falls back to per-example gradients from torch.func.vmap.
The first batch is checked against plain per-example gradients; a mismatch (a layer's weight
used outside its forward, say) switches the pass to the plain path.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map
from torch.utils.data import Dataset

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
        for kind, largest in (("helpful", True), ("harmful", False)):
            old_s, old_i = getattr(self, f"{kind}_scores"), getattr(self, f"{kind}_ids")
            s = scores if old_s is None else torch.cat([old_s, scores], 1)
            i = ids if old_i is None else torch.cat([old_i, ids], 1)
            top = torch.topk(s, min(self.k, s.shape[1]), dim=1, largest=largest)
            setattr(self, f"{kind}_scores", top.values)
            setattr(self, f"{kind}_ids", i.gather(1, top.indices))


@dataclass
class PassResult:
    top: TopK
    path: str  # "layers" or "vmap"
    layer_params: list[str] = field(default_factory=list)
    vmap_params: list[str] = field(default_factory=list)


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


def layer_calls(
    model: nn.Module, loss_fn: LossFn, batch: Any, modules: list[nn.Module]
) -> tuple[int, list[tuple[nn.Module, torch.Tensor, torch.Tensor]]]:
    """(batch size, [(module, input, d sum(loss)/d output)] for every call of the modules).

    Examples are independent, so the output gradient of the summed loss holds each example's
    own output gradient in its row.
    """
    recorder = _Recorder(modules)
    try:
        with torch.enable_grad():
            loss = loss_fn(model, batch)
    finally:
        recorder.close()
    calls = [c for c in recorder.calls if c[2].requires_grad]
    if not calls:
        return loss.shape[0], []
    grads = torch.autograd.grad(loss.sum(), [c[2] for c in calls], allow_unused=True)
    found = [
        (module, inp.detach(), g.detach())
        for (module, inp, _), g in zip(calls, grads, strict=True)
        if g is not None
    ]
    return loss.shape[0], found


def supported(module: nn.Module, ids: set[int]) -> bool:
    """Is this a layer whose weight (a parameter in `ids`) has a layer rule here?"""
    if isinstance(module, nn.Linear):
        return id(module.weight) in ids
    if isinstance(module, nn.Embedding):
        return id(module.weight) in ids and module.max_norm is None and not module.sparse
    return False


def _linear(a, g, s_w, s_b, q):
    """sum_n g_n^T S_w a_n (+ sum_n g_n . s_b) for every example and every row: [Q, B].

    s_w is the weight block [Q, out, in] (contiguous), s_b the bias block [Q, out].
    """
    batch = a.shape[0]
    a = a.reshape(batch, -1, a.shape[-1])
    g = g.reshape(batch, -1, g.shape[-1])
    out = torch.zeros(q, batch, dtype=g.dtype, device=g.device)
    if s_w is not None:
        if a.shape[1] == 1:  # one position: (a S^T) . g, a single matrix product over Q rows
            y = (a[:, 0] @ s_w.view(-1, s_w.shape[-1]).T).view(batch, q, -1)  # [B, Q, out]
            out += torch.bmm(y, g[:, 0, :, None])[..., 0].T
        else:  # several positions: form the layer's per-example gradient, then one product
            per_example = torch.einsum("bno,bni->boi", g, a).reshape(batch, -1)
            out += s_w.view(q, -1) @ per_example.T
    if s_b is not None:
        out += s_b @ g.sum(1).T
    return out


def _embedding(module, idx, g, s_e, q, budget=2**25):
    """sum_n S_e[idx_n] . g_n for every example and row: [Q, B]."""
    batch = idx.shape[0]
    idx = idx.reshape(batch, -1)
    g = g.reshape(batch, idx.shape[1], -1)
    if module.padding_idx is not None:
        g = g * (idx != module.padding_idx).unsqueeze(-1)
    step = max(1, budget // max(1, q * idx.shape[1] * g.shape[-1]))
    parts = []
    for start in range(0, batch, step):
        i, gg = idx[start : start + step], g[start : start + step]
        rows = s_e[:, i.reshape(-1)]  # [Q, b*N, d]
        parts.append((rows * gg.reshape(1, -1, gg.shape[-1])).sum(-1).view(q, len(i), -1).sum(2))
    return torch.cat(parts, 1)


class Contraction:
    """Scores s . grad g(z) of one batch for all Q rows of S (no 1/m), [Q, B]."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, space: ParamSpace, s: torch.Tensor):
        self.model, self.loss_fn, self.space, self.q = model, loss_fn, space, len(s)
        blocks = space.unflatten(s)  # name -> [Q, *shape]
        params = dict(model.named_parameters())
        by_id = {id(params[n]): n for n in space.names}
        self.modules = [m for m in model.modules() if supported(m, set(by_id))]
        self.s_by_param: dict[int, torch.Tensor] = {}
        covered = set()
        for m in self.modules:
            for p in (m.weight, getattr(m, "bias", None)):
                if p is not None and id(p) in by_id:
                    # contiguous [Q, *shape]: a weight tied between layers is one block
                    self.s_by_param[id(p)] = blocks[by_id[id(p)]].contiguous()
                    covered.add(by_id[id(p)])
        self.layer_params = [n for n in space.names if n in covered]
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
            s_w = self.s_by_param.get(id(module.weight))
            if isinstance(module, nn.Embedding):
                out += _embedding(module, inp, g, s_w, self.q)
            else:
                s_b = self.s_by_param.get(id(module.bias)) if module.bias is not None else None
                out += _linear(inp, g, s_w, s_b, self.q)
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


def score_pretraining(
    model: nn.Module,
    loss_fn: LossFn,
    dataset: Dataset,
    space: ParamSpace,
    s: torch.Tensor,
    top_k: int,
    batch_size: int = 256,
    sink: Sink | None = None,
    progress: Callable[[int], None] | None = None,
) -> PassResult:
    """Stream the pretraining set; score = (1/m) s . grad g(z); keep top-k, send scores to sink."""
    m = len(dataset)
    contraction = Contraction(model, loss_fn, space, s)
    top = TopK(top_k)
    start = 0
    for number, batch in enumerate(batches(dataset, batch_size, s.device)):
        if number == 0 and not contraction.check(batch):
            warnings.warn(
                "layer-structured scores disagree with per-example gradients on this model "
                "(a layer's weight used outside its forward?); using per-example gradients",
                stacklevel=2,
            )
            contraction.use_layers = False
        scores = contraction(batch) / m
        if not torch.isfinite(scores).all():
            raise FloatingPointError(
                f"non-finite influence scores at pretraining examples {start}.."
                f"{start + scores.shape[1] - 1} (non-finite pretraining loss or gradient there?)"
            )
        ids = torch.arange(start, start + scores.shape[1], device=s.device)
        top.update(scores, ids[None, :])
        if sink is not None:
            sink(start, scores)
        start += scores.shape[1]
        if progress is not None:
            progress(scores.shape[1])
    layers = contraction.use_layers
    return PassResult(
        top=top,
        path="layers" if layers else "vmap",
        layer_params=contraction.layer_params if layers else [],
        vmap_params=list(contraction.vmap_space.names if layers else space.names),
    )


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
