"""Eigenvalue-corrected Kronecker-factored curvature (EK-FAC; George et al. 2018, as used for
influence functions by Grosse et al. 2023).

The data term of the curvature is approximated by a second moment of gradients,
(1/n) sum_i G_i G_i^T, block-diagonal over layers: of gradients J_i^T L_i e_k whose moment is the
Gauss-Newton matrix (`ggn_roots`; the true Fisher for cross-entropy) when the loss splits into
outputs and a convex loss of them, or of the task's own gradients (the empirical Fisher) when it
does not. For a layer whose per-example weight gradient is G_i = sum_n g_n a_n^T
(the dense rules of precompute.layers: nn.Linear, nn.Conv1d/Conv2d with a_n the unfolded input
patch under output position n as in KFC (Grosse & Martens 2016), GPT-2's Conv1D; the bias as a
column of ones appended to a; nn.Embedding, where a_n is the one-hot token), the block's
eigenbasis is Q_S (x) Q_A with A = sum_{i,n} a a^T = Q_A diag Q_A^T and
S = sum_{i,n} g g^T = Q_S diag Q_S^T, and its eigenvalues are corrected to the second moments of
the gradients in that basis: Lambda = (1/n) sum_i (Q_S^T G_i Q_A)^2. Then, per block,

    (H + (reg + d) I)^{-1} v = Q_S [(Q_S^T V Q_A) / (Lambda + reg + d)] Q_A^T.

A grouped convolution has one such block per group. For nn.Embedding, A is diagonal (token
counts), so Q_A = I. Parameters outside such layers get a diagonal block, (1/n) sum_i g_i^2.
Fitted once per objective; every right-hand side then costs a few small matrix products.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from precompute.layers import (
    DenseRule,
    EmbeddingRule,
    broadcast_layers,
    dense_weight_grads,
    layer_calls,
    rules,
    weighted_output_calls,
)
from precompute.objective import (
    Objective,
    ParamSpace,
    batch_grads,
    batches,
    functional_loss,
    ordered_sum,
    sum_blocks,
)

FIT_BUDGET = 2**26  # entries of the largest per-example tensor of a fitting batch
GGN_EXACT_OUTPUTS = 16  # up to this many outputs per example, the GGN fit takes every column


@dataclass
class _Block:
    """One layer: its parameters' names, the eigenbases and the corrected eigenvalues."""

    module: nn.Module
    rule: DenseRule | EmbeddingRule
    weight: str
    bias: str | None
    q_s: torch.Tensor | None = None  # [groups, out, out] ([d, d] for an Embedding)
    q_a: torch.Tensor | None = None  # [groups, in(+1), in(+1)], None for an Embedding
    eigenvalues: torch.Tensor | None = None  # [groups, out, in(+1)] or, for an Embedding, [V, d]


class EKFAC:
    """EK-FAC of an Objective's data Hessian; `solve` applies (approximation + reg + d)^{-1}."""

    def __init__(self, objective: Objective, fisher: str = "empirical", seed: int = 0):
        """`fisher`: "empirical" fits the gradients of the task's own losses; "ggn" fits
        gradients whose second moment is the objective's Gauss-Newton matrix (needs
        objective.split): a backward per output, all from one forward, up to GGN_EXACT_OUTPUTS
        outputs per example (`ggn_roots`, no noise), one pass with sampled output weights past
        that (`ggn_samples`)."""
        self.objective = objective
        module_of, self.loss_fn = objective.model, objective.loss_fn
        self.fisher = fisher
        if fisher == "ggn":
            self.loss_fn = _sampled_loss(objective.split)
            self.seed = seed
        self.model, self.batch_size = module_of, objective.batch_size
        space = objective.space
        params = dict(module_of.named_parameters())
        by_id = {id(params[n]): n for n in space.names}
        uses: dict[int, int] = {}
        candidates = rules(module_of, set(by_id))
        probe = next(iter(batches(objective.dataset, 2, objective.device)))
        skip = broadcast_layers(module_of, objective.loss_fn, probe, list(candidates))
        candidates = {m: r for m, r in candidates.items() if m not in skip}  # to the diagonal
        for m in candidates:
            uses[id(m.weight)] = uses.get(id(m.weight), 0) + 1
        self.blocks: list[_Block] = []
        for m, rule in candidates.items():
            if uses[id(m.weight)] > 1:  # a tied weight: no single layer owns it
                continue
            bias = getattr(m, "bias", None)
            bias_name = by_id.get(id(bias)) if bias is not None else None
            self.blocks.append(_Block(m, rule, by_id[id(m.weight)], bias_name))
        covered = {b.weight for b in self.blocks} | {b.bias for b in self.blocks if b.bias}
        self.diagonal_space = ParamSpace.of(module_of, [n for n in space.names if n not in covered])
        self.diagonal: torch.Tensor | None = None
        # examples per batch: more than the objective's while the largest per-example tensor
        # of the fit (a block's rotated gradients, or the diagonal part's gradients) stays
        # within FIT_BUDGET entries; a pass over few large batches runs several times faster
        widest = max([self.diagonal_space.size, *(self._block_size(b) for b in self.blocks)])
        fits = FIT_BUDGET // max(1, widest)
        self.batch_size = max(objective.batch_size, min(objective.n, fits))

    def _block_size(self, block: _Block) -> int:
        params = dict(self.model.named_parameters())
        bias = params[block.bias].numel() if block.bias else 0
        return params[block.weight].numel() + bias

    @property
    def modules(self) -> list[nn.Module]:
        return [b.module for b in self.blocks]

    # ---- fitting: two passes over the data ----------------------------------------------
    # Each pass is a sum over the data of `partial(step, state, block)`, taken block by block
    # (precompute.objective.sum_blocks) and added in order, so it shards: `fit` takes the
    # blocks' sums from the objective's sharded engine when it has one (precompute.ray_engine,
    # the same numbers added in the same order) and computes them here otherwise.
    def fit(self) -> EKFAC:
        n = len(self.objective.dataset)
        sharded = self.objective.sharded
        blocks = sum_blocks(n, self.batch_size)

        def total(step: str, state=None):
            if sharded is not None:
                return sharded.ekfac_sum(self.fisher, step, state, blocks, self.batch_size)
            parts = tqdm(blocks, desc=f"EK-FAC {step}", unit="block", leave=False, disable=None)
            return ordered_sum(self.partial(step, state, block) for block in parts)

        for block, (a_cov, s_cov) in zip(self.blocks, total("factors"), strict=True):
            if s_cov is None:  # the layer never touched the loss
                continue
            block.q_s = torch.linalg.eigh(s_cov.double())[1].to(s_cov.dtype)
            if not isinstance(block.rule, EmbeddingRule):
                block.q_a = torch.linalg.eigh(a_cov.double())[1].to(a_cov.dtype)
        for block, square in zip(self.blocks, total("eigenvalues", self.bases()), strict=True):
            block.eigenvalues = None if square is None else square / n
        if self.diagonal_space.names:
            self.diagonal = total("diagonal") / n
        return self

    def bases(self) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
        """(Q_A, Q_S) of every block, in order: the state the eigenvalue pass needs."""
        return [(b.q_a, b.q_s) for b in self.blocks]

    def partial(self, step: str, state=None, within: range | None = None):
        """One pass's sum over the examples in `within` (default all), per layer block in
        order: "factors", [(sum a a^T, sum g g^T)] (None where no example reaches the layer);
        "eigenvalues", given `bases()` as state, [sum (Q_S^T G_i Q_A)^2]; "diagonal", the
        summed squared gradients of the parameters outside the blocks."""
        stream = self._batches(within)
        if step == "diagonal":
            loss = functional_loss(self.model, self.loss_fn, self.diagonal_space)
            theta = self.diagonal_space.read(self.model)
            total = torch.zeros_like(theta)
            for item in stream:
                for part in self._weighted(item):
                    total += (batch_grads(loss, theta, part) ** 2).sum(0)
            return total
        if step == "eigenvalues":
            for block, (q_a, q_s) in zip(self.blocks, state, strict=True):
                block.q_a, block.q_s = q_a, q_s
        sums: list = [None] * len(self.blocks)
        index = {id(b.module): i for i, b in enumerate(self.blocks)}
        for item in stream:
            for calls in self._calls(item):
                by_block: dict[int, list] = {}
                for module, a, g in calls:
                    i = index[id(module)]
                    if step == "factors":
                        a_cov, s_cov = self._covariances(self.blocks[i], a, g)
                        sums[i] = (a_cov, s_cov) if sums[i] is None else (
                            None if a_cov is None else sums[i][0] + a_cov, sums[i][1] + s_cov
                        )  # fmt: skip
                    elif self.blocks[i].q_s is not None:
                        by_block.setdefault(i, []).append((a, g))
                for i, block_calls in by_block.items():
                    square = self._squared_rotated(self.blocks[i], block_calls)
                    sums[i] = square if sums[i] is None else sums[i] + square
        if step == "factors":
            return [(None, None) if x is None else x for x in sums]
        return sums

    def column_calls(self, within: range | None = None):
        """For each batch of the data (the examples in `within`, default all), the layer calls
        [(module, input, output gradient)] of every output weighting, one list per weighting
        (one list for the empirical Fisher)."""
        for item in self._batches(within):
            yield list(self._calls(item))

    def column_parts(self, within: range | None = None):
        """For each batch of the data (the examples in `within`, default all): its layer calls
        per output weighting, as `column_calls` yields them, and the parts [batch, w] that
        `loss_fn` takes, one per weighting, in the same order."""
        for item in self._batches(within):
            yield list(self._calls(item)), list(self._weighted(item))

    def _calls(self, item):
        """The layer calls of one item of `_batches`, once for the empirical Fisher, once per
        output weighting for the GGN (one forward for all of them)."""
        if self.fisher != "ggn":
            yield layer_calls(self.model, self.loss_fn, item, self.modules)[1]
            return
        batch, weights_of = item
        outputs = self.objective.split.outputs
        yield from weighted_output_calls(
            self.model, outputs, batch, self.modules, lambda f: weights_of(f, batch)
        )

    def _weighted(self, item):
        """The (batch, w) parts of one item of `_batches` that `loss_fn` takes."""
        if self.fisher != "ggn":
            yield item
            return
        batch, weights_of = item
        for w in weights_of(network_outputs(self.objective.split, self.model, batch), batch):
            yield [batch, w]

    def _batches(self, within: range | None = None):
        """The objective's data (the examples in `within`, default all) in batches; for the
        "ggn" Fisher each batch comes with `weights_of(outputs, batch)`, its output weights
        W [C, B, K] from the network's outputs f [B, ...] (computed by the fit's own forward):
        every column of the loss Hessian's root, or one draw. Draws come from a generator seeded
        by the seed and the first example, so a block's draws are the same wherever it is summed
        (here or on a worker of precompute.ray_engine) and in both passes."""
        objective = self.objective
        stream = batches(objective.dataset, self.batch_size, objective.device, within=within)
        if self.fisher != "ggn":
            yield from stream
            return
        split = self.objective.split
        first = within.start if within is not None else 0
        generator = torch.Generator(device=objective.device)
        generator.manual_seed(self.seed * 1_000_003 + first)

        def weights_of(outputs: torch.Tensor, batch) -> torch.Tensor:
            if every_column(outputs):  # the exact GGN, no noise
                roots = ggn_roots(split, self.model, batch, outputs)  # [B, K, C]
                return roots.permute(2, 0, 1)  # column k: roots[..., k]
            return ggn_samples(split, self.model, batch, generator, outputs)[None]

        for batch in stream:
            yield [batch, weights_of]

    @staticmethod
    def block_inputs(block: _Block, a: torch.Tensor) -> torch.Tensor:
        """Dense inputs [B, groups, N, in], with a column of ones when the bias is in the space."""
        a = block.rule.inputs(a)
        if block.bias is not None:
            a = torch.cat([a, torch.ones_like(a[..., :1])], -1)
        return a

    def _covariances(self, block: _Block, a, g):
        """Summed A = sum a a^T [groups, in, in] (None for an Embedding) and S = sum g g^T
        [groups, out, out] ([d, d] for an Embedding) of one call, over examples and positions."""
        if isinstance(block.rule, EmbeddingRule):
            _, g = block.rule.tokens_and_grads(a, g)
            g = g.reshape(-1, g.shape[-1])
            return None, g.T @ g
        a = self.block_inputs(block, a)
        g = block.rule.outputs(g)
        return (
            torch.einsum("bgni,bgnj->gij", a, a),
            torch.einsum("bgno,bgnp->gop", g, g),
        )

    def _squared_rotated(self, block: _Block, calls: list) -> torch.Tensor:
        """sum_i (Q_S^T G_i Q_A)^2 over a batch, G_i summed over the layer's calls. A dense
        layer called once at one position per example (an MLP's Linear) has the rank-one
        G_i = g_i a_i^T, so (Q_S^T g_i)^2 (a_i^T Q_A)^2 summed over i is one matrix product of
        the squared rotated vectors, without forming a [B, out, in] tensor."""
        if len(calls) == 1 and isinstance(block.rule, DenseRule):
            a, g = calls[0]
            a = self.block_inputs(block, a)  # [B, groups, N, in]
            g = block.rule.outputs(g)  # [B, groups, N, out]
            if a.shape[2] == 1:
                aq = (a @ block.q_a)[:, :, 0] ** 2  # [B, groups, in]
                gq = (g @ block.q_s)[:, :, 0] ** 2  # [B, groups, out]
                return torch.einsum("bgo,bgi->goi", gq, aq)
        rotated = sum(self._rotated_gradients(block, a, g) for a, g in calls)
        return (rotated**2).sum(0)

    def _rotated_gradients(self, block: _Block, a, g) -> torch.Tensor:
        """Q_S^T G_i Q_A for every example i: [B, groups, out, in(+1)], or [B, V, d]."""
        batch = a.shape[0]
        if isinstance(block.rule, EmbeddingRule):
            idx, g = block.rule.tokens_and_grads(a, g)
            gq = g @ block.q_s  # [B, N, d]
            vocab = block.module.num_embeddings
            out = torch.zeros(batch * vocab, gq.shape[-1], dtype=gq.dtype, device=gq.device)
            rows = (torch.arange(batch, device=idx.device)[:, None] * vocab + idx).reshape(-1)
            out.index_add_(0, rows, gq.reshape(-1, gq.shape[-1]))
            return out.view(batch, vocab, -1)
        a = self.block_inputs(block, a) @ block.q_a  # [B, groups, N, in]
        g = block.rule.outputs(g) @ block.q_s  # [B, groups, N, out]
        return dense_weight_grads(a, g)

    # ---- solving ------------------------------------------------------------------------
    def mean_eigenvalue(self) -> float:
        """trace of the approximate data Hessian plus regulariser, over p."""
        total = 0.0
        for block in self.blocks:
            if block.eigenvalues is not None:
                total += block.eigenvalues.sum().item()
        if self.diagonal is not None:
            total += self.diagonal.sum().item()
        return (total + self.objective.reg.sum().item()) / self.objective.size

    def preconditioner(self, rhs: torch.Tensor, damping: float) -> torch.Tensor:
        """M^{-1} r = (EK-FAC + diag(reg) + d I)^{-1} r for every row r of rhs: the
        preconditioner of `pcg`. Where reg + d is zero the shift is raised to 1e-6 * the mean
        eigenvalue, so that M stays positive definite on directions without data curvature (any
        positive definite M keeps the solve exact; it only changes the iterations)."""
        if (self.objective.reg.min().item() + damping) <= 0:
            damping = max(damping, 1e-6 * abs(self.mean_eigenvalue()))
        return self.solve(rhs, damping)

    def solve(self, rhs: torch.Tensor, damping: float) -> torch.Tensor:
        """(EK-FAC + diag(reg) + d I)^{-1} applied to every row of rhs [Q, p]."""
        space, reg = self.objective.space, self.objective.reg
        blocks_rhs = space.unflatten(rhs)
        blocks_reg = space.unflatten(reg)
        out: dict[str, torch.Tensor] = {}
        q = rhs.shape[0]
        for block in self.blocks:
            shift = blocks_reg[block.weight].reshape(-1)[0] + damping
            v = blocks_rhs[block.weight]  # [Q, *shape]
            if isinstance(block.rule, EmbeddingRule):
                if block.q_s is None:  # no data curvature: the regulariser alone
                    out[block.weight] = v / shift
                else:
                    x = ((v @ block.q_s) / (block.eigenvalues + shift)) @ block.q_s.T
                    out[block.weight] = x
                continue
            v = block.rule.to_matrix(v)  # [Q, groups, out, in]
            if block.bias is not None:
                bias = block.rule.bias_to_matrix(blocks_rhs[block.bias])
                v = torch.cat([v, bias[..., None]], -1)
            if block.q_s is None:
                x = v / shift
            else:
                rotated = block.q_s.transpose(-1, -2) @ v @ block.q_a
                x = (
                    block.q_s
                    @ (rotated / (block.eigenvalues + shift))
                    @ block.q_a.transpose(-1, -2)
                )
            if block.bias is not None:
                x, bias = x[..., :-1], x[..., -1]
                out[block.bias] = bias.reshape(q, -1)
            out[block.weight] = block.rule.from_matrix(x)
        if self.diagonal_space.names:
            left = torch.cat([blocks_rhs[n].reshape(q, -1) for n in self.diagonal_space.names], 1)
            left_reg = torch.cat([blocks_reg[n].reshape(-1) for n in self.diagonal_space.names])
            x = left / (self.diagonal + left_reg + damping)
            out.update(self.diagonal_space.unflatten(x))
        return torch.cat([out[n].reshape(q, -1) for n in space.names], 1)


def ggn_fit_is_cheap(objective: Objective) -> bool:
    """Whether EK-FAC of the objective's Gauss-Newton matrix costs a pass or a few: its loss
    split draws output weights in closed form (the standard losses), or has at most
    GGN_EXACT_OUTPUTS outputs per example. Past that, a split from hooks would take `ggn_roots`'
    K products and K x K eigendecomposition per example."""
    split = objective.split
    if split is None:
        return False
    if split.sample is not None:
        return True
    first = next(batches(objective.dataset, 1, objective.device))
    return every_column(network_outputs(split, objective.model, first))


def every_column(outputs: torch.Tensor) -> bool:
    """Whether the GGN fit takes every column of the loss Hessian's root for these outputs
    [B, ...] (at most GGN_EXACT_OUTPUTS per example), rather than one draw."""
    return outputs[0].numel() <= GGN_EXACT_OUTPUTS


def network_outputs(split, model: nn.Module, batch) -> torch.Tensor:
    """split.outputs(model, batch), the network function f, without recording a graph."""
    with torch.no_grad():
        return split.outputs(model, batch)


def ggn_roots(split, model: nn.Module, batch, outputs: torch.Tensor | None = None) -> torch.Tensor:
    """L_i with L_i L_i^T = H_i, the Hessian of the loss in example i's outputs (from split;
    K = outputs per example): [B, K, C], C columns; in closed form where the split knows its
    loss (split.root: for cross-entropy K - 1 columns, the Hessian's rank, O(K^2) per example),
    else C = K by K forward-over-reverse products of the loss in the outputs, one per output
    coordinate for all examples at once (the loss is a sum of per-example terms), and an
    eigendecomposition of each H_i: 0.19 s against 0.006 s for 20,000 examples of 10 logits (a
    scratch script). Any root serves: the Gauss-Newton matrix sum_k (J_i^T L_i e_k)(J_i^T L_i
    e_k)^T = J_i^T L_i L_i^T J_i, and EK-FAC's factors and eigenvalue corrections, whose sums
    over the columns k are of that form too, depend on L_i only through L_i L_i^T = H_i.

    For any w_i = L_i e, the gradient of <f_i, w_i> (w held constant) is J_i^T L_i e, and
    sum_k (J_i^T L_i e_k)(J_i^T L_i e_k)^T = J_i^T H_i J_i: an EK-FAC fitted on the gradients of
    every column of L_i is the EK-FAC of the Gauss-Newton matrix (for cross-entropy, of the true
    Fisher, where the task's own gradients give the empirical Fisher); with one sampled
    e ~ N(0, I) per example it is that in expectation (Martens & Grosse 2015, Kronfluence).
    `outputs`: network_outputs(split, model, batch), where already computed."""
    outputs = network_outputs(split, model, batch) if outputs is None else outputs
    flat = outputs.reshape(len(outputs), -1)
    k = flat.shape[1]
    if split.root is not None:
        return split.root(outputs, batch).reshape(len(flat), k, -1)

    def loss_grad(f):
        return torch.func.grad(lambda o: split.loss_of_outputs(o.view_as(outputs), batch).sum())(f)

    eye = torch.eye(k, dtype=flat.dtype, device=flat.device)
    columns = [torch.func.jvp(loss_grad, (flat,), (eye[j].expand_as(flat),))[1] for j in range(k)]
    hessians = torch.stack(columns, -1)  # [B, K, K]
    values, vectors = torch.linalg.eigh((hessians + hessians.transpose(1, 2)) / 2)
    return vectors * values.clamp_min(0).sqrt()[:, None, :]


def ggn_samples(
    split, model: nn.Module, batch, generator: torch.Generator, outputs: torch.Tensor | None = None
) -> torch.Tensor:
    """Output weights w_i with E[w_i w_i^T] = H_i, the loss Hessian in the outputs: [B, K].
    In closed form where the split knows its loss (split.sample: a label drawn from the model
    for cross-entropy, scaled Gaussian noise for squared error; O(K) per example), else
    w_i = L_i e_i, e_i ~ N(0, I), from `ggn_roots` (K products and a K x K eigendecomposition
    per example, which for K in the hundreds costs far more than the fit's pass)."""
    outputs = network_outputs(split, model, batch) if outputs is None else outputs
    if split.sample is not None:
        return split.sample(outputs, batch, generator).reshape(len(outputs), -1)
    roots = ggn_roots(split, model, batch, outputs)
    noise = torch.randn(
        (len(roots), roots.shape[2]), generator=generator, device=roots.device, dtype=roots.dtype
    )  # fmt: skip
    return (roots @ noise[..., None]).squeeze(-1)


def _sampled_loss(split):
    """(model, (batch, w)) -> <f_i, w_i> per example: gradients J_i^T w_i (see ggn_samples)."""

    def loss(model: nn.Module, item) -> torch.Tensor:
        batch, w = item
        outputs = split.outputs(model, batch)
        return (outputs.reshape(len(outputs), -1) * w).sum(1)

    return loss
