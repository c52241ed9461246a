"""The Gauss-Newton product from stored per-example layer factors: exact, without the network.

With the loss split as h(f(x; theta)) and L_i L_i^T = H_i, the loss Hessian in example i's K
outputs (precompute.ekfac.ggn_roots), the data term of the GGN is

    C = (1/n) sum_i sum_k phi_ik phi_ik^T,    phi_ik = J_i^T L_i e_k,

phi_ik being the gradient of <f_i, L_i e_k> (weights held constant). In a dense layer
(precompute.layers.DenseRule: nn.Linear, nn.Conv1d/Conv2d, GPT-2's Conv1D) the weight's part of
phi_ik is sum_n g_ikn a_in^T, with a_in the layer's input at output position n (the bias as a
column of ones) and g_ikn the gradient of <f_i, L_i e_k> at its output. One pass over the data
records a [n, G, N, in] and g [n, K, G N out] per layer (K backward passes from one forward, as
EK-FAC's Gauss-Newton fit does); the parameters outside such layers and embeddings (LayerNorm,
a tied weight, a layer called on inputs not split by example) keep their part of phi_ik itself,
[n, K, p_o] (per-example gradients by vmap). Every product after that is

    u_ik = phi_ik^T v = sum_layers sum_n g_ikn^T V a_in (+ phi_ik,o^T v_o),
    C v = (1/n) sum_i sum_k u_ik phi_ik,

two matrix products per layer with the stored inputs (a forward's and a backward's flops for
the layer, in large matrix products) and two small per-example products with the stored output
gradients: no forward, no activation function, no automatic differentiation. On
benchmarks/scale.py's 32-64-16 MLP (3,322 parameters, 20,000 examples, 100 vectors) a product
took 0.436 s where forward and reverse mode took 1.073 s (benchmarks/products.py). The factors
also give the data term's trace exactly (`trace`), which "auto" damping takes in place of a
Hutchinson estimate.

An embedding keeps its token ids [n, N] and output gradients [n, K, N d]: row t of its part of
phi_ik is the sum of g_ikn over the positions holding t, so u gathers rows of V by token and
the product adds back by token. `GGNFactors.record` returns None, with the reason, where this
does not apply: more than GGN_EXACT_OUTPUTS outputs per example, or factors outgrowing
1 / FACTOR_SHARE of the device's memory; the
forward/reverse product (precompute.objective.Objective.ggn_sum) serves those.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from precompute.objective import Objective, device_memory

FACTOR_SHARE = 8  # the factors take at most this fraction (1 / FACTOR_SHARE) of the memory
CHUNK_BUDGET = 2**22  # entries of a product's largest intermediate per chunk, on a CPU
GPU_CHUNK_BUDGET = 2**27


@dataclass
class _Inputs:
    """A layer's stored inputs and output gradients of every output column for one batch, the
    gradients [B, K, width]: how a dense layer and an embedding are kept alike."""

    inputs: torch.Tensor
    grads: torch.Tensor

    def rows(self, start: int, stop: int):
        """The examples start:stop (views), of the same kind."""
        return type(self)(self.inputs[start:stop], self.grads[start:stop])

    @property
    def width(self) -> int:
        """Entries per example and row of the product's largest intermediate."""
        return self.grads.shape[2]

    def project(self, w: torch.Tensor, u: torch.Tensor | None) -> torch.Tensor:
        """u [b, K, Q] += the layer's part of phi_ik^T v: the gradients [b, K, width] times the
        rows' values at each example's output entries [b, width, Q] (`_rows_at`)."""
        at = self._rows_at(w)
        return torch.bmm(self.grads, at) if u is None else u.baddbmm_(self.grads, at)

    def add_back(self, total: torch.Tensor, u: torch.Tensor) -> None:
        """total += sum_i sum_k u_ik (the layer's part of phi_ik): the gradients' transpose
        times u, [b, width, Q], added back through the layer's inputs (`_add_rows`)."""
        self._add_rows(total, torch.bmm(self.grads.transpose(1, 2), u))


@dataclass
class _Dense(_Inputs):
    """One batch of one dense layer: its inputs [B, G, N, in(+1)] and the output gradients of
    every output column [B, K, G N out], positions of repeated calls joined along N. The rows
    it multiplies are [G, out, Q, in(+1)] (`_as_matrix`, permuted), so that the projections
    come out [b, G N out, Q] and the per-example products with the gradients are Q wide: 0.35-
    0.37 s against 0.42-0.44 s for [b, Q, G N out] on scale's MLP (100 rows)."""

    def _rows_at(self, w: torch.Tensor) -> torch.Tensor:
        """V a_in for every example and position: [b, G N out, Q]."""
        return _project(self.inputs, w)

    def _add_rows(self, total: torch.Tensor, back: torch.Tensor) -> None:
        """total [G, out, Q, in] += sum_i sum_n back_in a_in^T."""
        _add_outer(total, back, self.inputs)

    def squared_norms(self) -> float:
        """sum_i sum_k |sum_n g_ikn a_in^T|^2 (every group), through the positions' Gram
        matrices, a few examples at a time."""
        b, groups, positions, _ = self.inputs.shape
        columns = self.grads.shape[1]
        grads = self.grads.reshape(b, columns, groups, positions, -1)
        if positions == 1:
            norms = grads.square().sum((3, 4)) * self.inputs.square().sum((2, 3))[:, None]
            return norms.sum().item()
        size = max(1, CHUNK_BUDGET // (columns * groups * positions * positions))
        total = 0.0
        for start in range(0, b, size):
            g, a = grads[start : start + size], self.inputs[start : start + size]
            gram_g = torch.einsum("bkgno,bkgmo->bgnm", g, g)  # summed over the columns k
            gram_a = torch.einsum("bgni,bgmi->bgnm", a, a)
            total += (gram_g * gram_a).sum().item()
        return total


@dataclass
class _Tokens(_Inputs):
    """One batch of one embedding: its token ids [B, N] and the output gradients of every
    output column [B, K, N d] (padding positions zeroed), repeated calls joined along N. Row
    t of the weight's part of phi_ik is sum_{n: t_in = t} g_ikn. The rows it multiplies are
    [vocabulary, d, Q], so that the rows gathered by token are [b, N d, Q] as they lie, for
    one batched product with the gradients: 0.67 s against 1.27-1.67 s for [vocabulary, Q, d]
    gathered then permuted (20,000 examples of 8 tokens, d = 32, Q = 100; a scratch script)."""

    def _rows_at(self, w: torch.Tensor) -> torch.Tensor:
        """V[t_in] for every example and position: [b, N d, Q]."""
        return w[self.inputs].view(len(self.inputs), self.grads.shape[2], -1)

    def _add_rows(self, total: torch.Tensor, back: torch.Tensor) -> None:
        """total [vocabulary, d, Q], row t_in += back_in, for every example and position."""
        total.index_add_(0, self.inputs.flatten(), back.view(self.inputs.numel(), *total.shape[1:]))

    def squared_norms(self) -> float:
        """sum_i sum_k |phi_ik|^2 = sum_i sum_k sum_{n, m: t_in = t_im} g_ikn . g_ikm."""
        b, columns, positions = *self.grads.shape[:2], self.inputs.shape[1]
        g = self.grads.view(b, columns, positions, -1)
        same = self.inputs[:, :, None] == self.inputs[:, None, :]  # [b, N, N]
        size = max(1, CHUNK_BUDGET // (columns * positions**2))
        total = 0.0
        for start in range(0, b, size):
            chunk = g[start : start + size]
            gram = torch.einsum("bknd,bkmd->bnm", chunk, chunk)  # summed over the columns k
            total += (gram * same[start : start + size]).sum().item()
        return total


@dataclass
class _Outside:
    """One batch of the parameters outside the blocks (LayerNorm, a tied weight, a layer called
    on inputs not split by example): their part of phi_ik itself, [B, K, p_o]; the rows it
    multiplies are [p_o, Q]."""

    grads: torch.Tensor

    def rows(self, start: int, stop: int) -> _Outside:
        return _Outside(self.grads[start:stop])

    @property
    def width(self) -> int:
        return self.grads.shape[1]  # the intermediate is u's own [b, K, Q]

    def project(self, w: torch.Tensor, u: torch.Tensor | None) -> torch.Tensor:
        term = torch.matmul(self.grads, w)  # [b, K, Q]
        return term if u is None else u.add_(term)

    def add_back(self, total: torch.Tensor, u: torch.Tensor) -> None:
        total.addmm_(self.grads.flatten(0, 1).T, u.flatten(0, 1))

    def squared_norms(self) -> float:
        return self.grads.square().sum().item()


_Recorded = _Dense | _Tokens | _Outside


class GGNFactors:
    """The stored layer factors of an objective's Gauss-Newton matrix; `product` multiplies by
    its data term."""

    def __init__(
        self, objective: Objective, blocks: list, outside, recorded: list[list[_Recorded | None]]
    ):  # fmt: skip
        self.objective = objective
        self.blocks = blocks  # precompute.ekfac._Block, one per dense layer or embedding
        self.outside = outside  # ParamSpace of the parameters outside them (maybe empty)
        # per batch, per block (None: the layer never reached the loss), then the parameters
        # outside the blocks where there are any
        self.recorded = recorded
        self._trace: float | None = None

    @classmethod
    def record(
        cls, objective: Objective, budget: int | None = None
    ) -> tuple[GGNFactors | None, str]:
        """(factors, how products are taken): the factors from one pass over the objective's
        data where they apply and fit the budget (stored entries; default 1 / FACTOR_SHARE of
        the device's memory, precompute.objective.device_memory), else (None, the reason)."""
        from precompute.ekfac import EKFAC, every_column, network_outputs
        from precompute.objective import batches

        if objective.curvature != "ggn":
            return None, "Hessian products by double backward"
        fallback = "forward and reverse mode"
        ekfac = EKFAC(objective, fisher="ggn")
        probe = next(batches(objective.dataset, min(2, objective.n), objective.device))
        outputs = network_outputs(objective.split, objective.model, probe)
        if not every_column(outputs):
            return None, f"{fallback}: {outputs[0].numel()} outputs per example"
        first = next(ekfac.column_calls(range(min(2, objective.n))))
        found = [r for r in _batch_factors(ekfac, first) if r is not None]
        per_example = sum((r.inputs.numel() + r.grads.numel()) // len(r.inputs) for r in found)
        per_example += len(first) * ekfac.diagonal_space.size  # K columns of the outside part
        if budget is None:
            memory = device_memory(objective.device) // FACTOR_SHARE
            budget = memory // objective.theta.element_size()
        if per_example * objective.n > budget:
            entries = per_example * objective.n
            return None, f"{fallback}: {entries:,} factor entries, over the budget of {budget:,}"
        recorded = list(_record(ekfac))
        return cls(objective, ekfac.blocks, ekfac.diagonal_space, recorded), "stored layer factors"

    @torch.no_grad()
    def product(self, vectors: torch.Tensor) -> torch.Tensor:
        """(1/n) sum_i sum_k phi_ik (phi_ik^T v) for each row v of vectors [Q, p]."""
        space = self.objective.space
        parts = space.unflatten(vectors)
        weights = [_block_rows(b, parts) for b in self.blocks]
        if self.outside.names:
            rows = [parts[n].reshape(len(vectors), -1) for n in self.outside.names]
            weights.append(torch.cat(rows, 1).T.contiguous())  # [p_o, Q]
        sums = [torch.zeros_like(w) for w in weights]
        for layers in self.recorded:
            for chunk in self._chunks(layers, len(vectors)):
                u = None
                for r, w in zip(chunk, weights, strict=True):
                    if r is not None:
                        u = r.project(w, u)  # u_ik = phi_ik^T v, [b, K, Q]
                for r, total in zip(chunk, sums, strict=True):
                    if r is not None:
                        r.add_back(total, u)
        n = self.objective.n
        out = {}
        for block, total in zip(self.blocks, sums, strict=False):  # then the outside part
            out.update(_from_block_rows(block, total / n))
        if self.outside.names:
            out.update(self.outside.unflatten(sums[-1].T / n))
        return torch.cat([out[name].reshape(len(vectors), -1) for name in space.names], 1)

    def trace(self) -> float:
        """trace(C) = (1/n) sum_i sum_k |phi_ik|^2, exactly: in a dense layer's group,
        |sum_n g_ikn a_in^T|^2 = sum_{n,n'} (g_ikn . g_ikn') (a_in . a_in'), which for one
        position is |g_ik|^2 |a_i|^2. Computed once and kept."""
        if self._trace is None:
            total = 0.0
            for layers in self.recorded:
                total += sum(r.squared_norms() for r in layers if r is not None)
            self._trace = total / self.objective.n
        return self._trace

    def _chunks(self, layers: list[_Recorded | None], rows: int):
        """The batch's layers in chunks of examples whose largest intermediate (a dense layer's
        projections [b, G N out, Q]) stays within the chunk budget."""
        present = [r for r in layers if r is not None]
        if not present:
            return
        budget = GPU_CHUNK_BUDGET if self.objective.device.type == "cuda" else CHUNK_BUDGET
        size = max(1, budget // (rows * max(r.width for r in present)))
        for start in range(0, len(present[0].grads), size):
            yield [None if r is None else r.rows(start, start + size) for r in layers]


def _record(ekfac):
    """Per batch of the objective's data: each block's factors (`_batch_factors`), then, where
    parameters lie outside the blocks, their part of every phi_ik, per-example gradients of
    <f_i, L_i e_k> by vmap (precompute.objective.batch_grads)."""
    from precompute.objective import batch_grads, functional_loss

    outside = ekfac.diagonal_space
    if not outside.names:
        for columns in ekfac.column_calls():
            yield _batch_factors(ekfac, columns)
        return
    loss = functional_loss(ekfac.model, ekfac.loss_fn, outside)
    theta = outside.read(ekfac.model)
    for columns, parts in ekfac.column_parts():
        grads = torch.stack([batch_grads(loss, theta, part) for part in parts], 1)
        yield [*_batch_factors(ekfac, columns), _Outside(grads)]


def _batch_factors(ekfac, columns: list[list]) -> list[_Recorded | None]:
    """One batch's factors per block from its layer calls per output column [[(module, input,
    output gradient)]]: a dense layer's inputs as the block takes them
    (precompute.ekfac.EKFAC.block_inputs) and output gradients [B, K, G N out]; an
    embedding's token ids [B, N] and output gradients [B, K, N d]."""
    from precompute.layers import EmbeddingRule

    index = {id(b.module): i for i, b in enumerate(ekfac.blocks)}
    inputs: list[list] = [[] for _ in ekfac.blocks]
    grads: list[list[list]] = [[[] for _ in columns] for _ in ekfac.blocks]
    for k, calls in enumerate(columns):
        for module, a, g in calls:
            i = index[id(module)]
            block = ekfac.blocks[i]
            if isinstance(block.rule, EmbeddingRule):
                a, g = block.rule.tokens_and_grads(a, g)  # [B, N], [B, N, d]
                a, g = a[:, None, :, None], g[:, None]  # as [B, 1, N, 1], [B, 1, N, d]
            else:
                a, g = ekfac.block_inputs(block, a), block.rule.outputs(g)  # [B, G, N, *]
            if k == 0:
                inputs[i].append(a)
            grads[i][k].append(g)
    found: list[_Recorded | None] = []
    for i, block in enumerate(ekfac.blocks):
        if not inputs[i]:
            found.append(None)
            continue
        a = torch.cat(inputs[i], 2)  # repeated calls: more positions
        g = torch.stack([torch.cat(per_call, 2) for per_call in grads[i]], 1)  # [B, K, G, N, o]
        g = g.reshape(g.shape[0], g.shape[1], -1).contiguous()
        tokens = isinstance(block.rule, EmbeddingRule)
        found.append(_Tokens(a[:, 0, :, 0], g) if tokens else _Dense(a, g))
    return found


def _block_rows(block, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """The rows' part in a block as its recorded kind multiplies them: a dense layer's
    [G, out, Q, in(+1)], an embedding's [vocabulary, d, Q]."""
    from precompute.layers import EmbeddingRule

    if isinstance(block.rule, EmbeddingRule):
        return parts[block.weight].permute(1, 2, 0).contiguous()
    return _as_matrix(block, parts).permute(1, 2, 0, 3).contiguous()


def _from_block_rows(block, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The inverse of _block_rows: {name: [Q, *shape]}."""
    from precompute.layers import EmbeddingRule

    if isinstance(block.rule, EmbeddingRule):
        return {block.weight: x.permute(2, 0, 1)}
    return _from_matrix(block, x.permute(2, 0, 1, 3))


def _project(inputs: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """V a_n for every example, position and row: [b, G N out, Q] from inputs [b, G, N, in]
    and w [G, out, Q, in]."""
    b, groups, positions, width = inputs.shape
    _, out, q, _ = w.shape
    if groups == 1 and positions == 1:  # one matrix product: [b, in] x [in, out Q]
        return (inputs.reshape(b, width) @ w.reshape(out * q, width).T).view(b, out, q)
    return torch.einsum("bgni,goqi->bgnoq", inputs, w).reshape(b, -1, q)


def _add_outer(total: torch.Tensor, back: torch.Tensor, inputs: torch.Tensor) -> None:
    """total [G, out, Q, in] += sum_i sum_n back_in a_in^T, from back [b, G N out, Q] and
    inputs [b, G, N, in]."""
    b, groups, positions, width = inputs.shape
    if groups == 1 and positions == 1:  # one matrix product, [out Q, b] x [b, in], in place
        total.view(-1, width).addmm_(back.reshape(b, -1).T, inputs.reshape(b, width))
        return
    back = back.reshape(b, groups, positions, -1, back.shape[2])
    total += torch.einsum("bgnoq,bgni->goqi", back, inputs)


def _as_matrix(block, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """The rows' weight (and bias) of a block as [Q, G, out, in(+1)]."""
    w = block.rule.to_matrix(parts[block.weight])
    if block.bias is not None:
        w = torch.cat([w, block.rule.bias_to_matrix(parts[block.bias])[..., None]], -1)
    return w


def _from_matrix(block, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The inverse of _as_matrix: {name: [Q, *shape]}."""
    out = {}
    if block.bias is not None:
        x, bias = x[..., :-1], x[..., -1]
        out[block.bias] = bias.reshape(len(x), -1)
    out[block.weight] = block.rule.from_matrix(x)
    return out
