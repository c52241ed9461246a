"""The Gauss-Newton product from stored per-example layer factors: exact, without the network.

With the loss split as h(f(x; theta)) and L_i L_i^T = H_i, the loss Hessian in example i's K
outputs (precompute.ekfac.ggn_roots), the data term of the GGN is

    C = (1/n) sum_i sum_k phi_ik phi_ik^T,    phi_ik = J_i^T L_i e_k,

phi_ik being the gradient of <f_i, L_i e_k> (weights held constant). In a dense layer
(precompute.layers.DenseRule: nn.Linear, nn.Conv1d/Conv2d, GPT-2's Conv1D) the weight's part of
phi_ik is sum_n g_ikn a_in^T, with a_in the layer's input at output position n (the bias as a
column of ones) and g_ikn the gradient of <f_i, L_i e_k> at its output. When every parameter of
an objective belongs to such layers, one pass over the data records a [n, G, N, in] and
g [n, K, G N out] per layer (K backward passes from one forward, as EK-FAC's Gauss-Newton fit
does), and every product after that is

    u_ik = phi_ik^T v = sum_layers sum_n g_ikn^T V a_in,     C v = (1/n) sum_i sum_k u_ik phi_ik,

two matrix products per layer with the stored inputs (a forward's and a backward's flops for
the layer, in large matrix products) and two small per-example products with the stored output
gradients: no forward, no activation function, no automatic differentiation. On
benchmarks/scale.py's 32-64-16 MLP (3,322 parameters, 20,000 examples, 100 vectors) a product
took 0.475 s where forward and reverse mode took 1.027 s (benchmarks/products.py).

`GGNFactors.record` returns None, with the reason, where this does not apply: parameters
outside dense layers (LayerNorm, embeddings, tied weights), more than GGN_EXACT_OUTPUTS outputs
per example, or factors outgrowing 1 / FACTOR_SHARE of the device's memory; the
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
class _Recorded:
    """One batch of one layer: its inputs [B, G, N, in(+1)] and the output gradients of every
    output column [B, K, G N out], positions of repeated calls joined along N."""

    inputs: torch.Tensor
    grads: torch.Tensor


class GGNFactors:
    """The stored layer factors of an objective's Gauss-Newton matrix; `product` multiplies by
    its data term."""

    def __init__(self, objective: Objective, blocks: list, recorded: list[list[_Recorded]]):
        self.objective = objective
        self.blocks = blocks  # precompute.ekfac._Block, one per dense layer
        self.recorded = recorded  # per batch, per block (None: the layer never reached the loss)

    @classmethod
    def record(
        cls, objective: Objective, budget: int | None = None
    ) -> tuple[GGNFactors | None, str]:
        """(factors, how products are taken): the factors from one pass over the objective's
        data where they apply and fit the budget (stored entries; default 1 / FACTOR_SHARE of
        the device's memory, precompute.objective.device_memory), else (None, the reason)."""
        from precompute.ekfac import EKFAC, EmbeddingRule, every_column, network_outputs
        from precompute.objective import batches

        if objective.curvature != "ggn":
            return None, "Hessian products by double backward"
        fallback = "forward and reverse mode"
        ekfac = EKFAC(objective, fisher="ggn")
        outside = list(ekfac.diagonal_space.names)
        outside += [b.weight for b in ekfac.blocks if isinstance(b.rule, EmbeddingRule)]
        if outside:
            return None, f"{fallback}: {', '.join(outside[:3])} outside dense layers"
        probe = next(batches(objective.dataset, min(2, objective.n), objective.device))
        outputs = network_outputs(objective.split, objective.model, probe)
        if not every_column(outputs):
            return None, f"{fallback}: {outputs[0].numel()} outputs per example"
        first = next(ekfac.column_calls(range(min(2, objective.n))))
        found = [r for r in _batch_factors(ekfac, first) if r is not None]
        per_example = sum((r.inputs.numel() + r.grads.numel()) // len(r.inputs) for r in found)
        if budget is None:
            memory = device_memory(objective.device) // FACTOR_SHARE
            budget = memory // objective.theta.element_size()
        if per_example * objective.n > budget:
            entries = per_example * objective.n
            return None, f"{fallback}: {entries:,} factor entries, over the budget of {budget:,}"
        recorded = [_batch_factors(ekfac, columns) for columns in ekfac.column_calls()]
        return cls(objective, ekfac.blocks, recorded), "stored layer factors"

    @torch.no_grad()
    def product(self, vectors: torch.Tensor) -> torch.Tensor:
        """(1/n) sum_i sum_k phi_ik (phi_ik^T v) for each row v of vectors [Q, p]."""
        space = self.objective.space
        parts = space.unflatten(vectors)
        weights = [_as_matrix(b, parts) for b in self.blocks]  # [Q, G, out, in(+1)]
        sums = [torch.zeros_like(w) for w in weights]
        for layers in self.recorded:
            for chunk in self._chunks(layers, len(vectors)):
                self._add(chunk, weights, sums)
        out = {}
        for block, total in zip(self.blocks, sums, strict=True):
            out.update(_from_matrix(block, total / self.objective.n))
        return torch.cat([out[n].reshape(len(vectors), -1) for n in space.names], 1)

    def _chunks(self, layers: list[_Recorded | None], rows: int):
        """The batch's layers in chunks of examples whose largest intermediate, the rows'
        projections [b, Q, G N out] of a layer, stays within the chunk budget."""
        present = [r for r in layers if r is not None]
        if not present:
            return
        budget = GPU_CHUNK_BUDGET if self.objective.device.type == "cuda" else CHUNK_BUDGET
        widest = max(r.grads.shape[2] for r in present)
        size = max(1, budget // (rows * widest))
        for start in range(0, len(present[0].inputs), size):
            yield [
                None if r is None else _Recorded(
                    r.inputs[start : start + size], r.grads[start : start + size]
                )
                for r in layers
            ]  # fmt: skip

    @staticmethod
    def _add(layers: list[_Recorded | None], weights: list, sums: list) -> None:
        """sums[l] += sum_i sum_k u_ik (layer l's part of phi_ik), u_ik = phi_ik^T v."""
        u = None
        for r, w in zip(layers, weights, strict=True):
            if r is None:
                continue
            projected = _project(r.inputs, w)  # [b, Q, G N out]
            term = torch.bmm(projected, r.grads.transpose(1, 2))  # [b, Q, K]
            u = term if u is None else u.add_(term)
        for r, total in zip(layers, sums, strict=True):
            if r is not None:
                back = torch.bmm(u, r.grads)  # [b, Q, G N out]
                total += _outer(back, r.inputs)


def _batch_factors(ekfac, columns: list[list]) -> list[_Recorded | None]:
    """One batch's factors per block from its layer calls per output column [[(module, input,
    output gradient)]]: inputs as the block takes them (precompute.ekfac.EKFAC.block_inputs),
    output gradients [B, K, G N out]."""
    index = {id(b.module): i for i, b in enumerate(ekfac.blocks)}
    inputs: list[list] = [[] for _ in ekfac.blocks]
    grads: list[list[list]] = [[[] for _ in columns] for _ in ekfac.blocks]
    for k, calls in enumerate(columns):
        for module, a, g in calls:
            i = index[id(module)]
            if k == 0:
                inputs[i].append(ekfac.block_inputs(ekfac.blocks[i], a))
            grads[i][k].append(ekfac.blocks[i].rule.outputs(g))  # [B, G, N, out]
    found: list[_Recorded | None] = []
    for i in range(len(ekfac.blocks)):
        if not inputs[i]:
            found.append(None)
            continue
        a = torch.cat(inputs[i], 2)  # repeated calls: more positions
        g = torch.stack([torch.cat(per_call, 2) for per_call in grads[i]], 1)  # [B, K, G, N, o]
        found.append(_Recorded(a, g.reshape(g.shape[0], g.shape[1], -1).contiguous()))
    return found


def _project(inputs: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """V a_n for every example, position and row: [b, Q, G N out] from inputs [b, G, N, in]
    and w [Q, G, out, in]."""
    b, groups, positions, width = inputs.shape
    q, _, out, _ = w.shape
    if groups == 1 and positions == 1:  # one matrix product: [b, in] x [in, Q out]
        return (inputs.reshape(b, width) @ w.reshape(q * out, width).T).view(b, q, out)
    return torch.einsum("bgni,qgoi->bqgno", inputs, w).reshape(b, q, -1)


def _outer(back: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """sum_i sum_n back_in a_in^T: [Q, G, out, in] from back [b, Q, G N out] and inputs
    [b, G, N, in]."""
    b, groups, positions, width = inputs.shape
    q = back.shape[1]
    if groups == 1 and positions == 1:  # one matrix product: [Q out, b] x [b, in]
        return (back.reshape(b, -1).T @ inputs.reshape(b, width)).view(q, 1, -1, width)
    back = back.reshape(b, q, groups, positions, -1)
    return torch.einsum("bqgno,bgni->qgoi", back, inputs)


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
