"""Eigenvalue-corrected Kronecker-factored curvature (EK-FAC; George et al. 2018, as used for
influence functions by Grosse et al. 2023).

The data term of the Hessian is approximated by the empirical Fisher (1/n) sum_i G_i G_i^T,
block-diagonal over layers. For a layer whose per-example weight gradient is G_i = sum_n g_n a_n^T
(nn.Linear, with the bias as a column of ones appended to a; nn.Embedding, where a_n is the
one-hot token), the block's eigenbasis is Q_S (x) Q_A with A = E[a a^T] = Q_A diag Q_A^T and
S = E[g g^T] = Q_S diag Q_S^T, and its eigenvalues are corrected to the second moments of the
gradients in that basis: Lambda = (1/n) sum_i (Q_S^T G_i Q_A)^2. Then, per block,

    (H + (reg + d) I)^{-1} v = Q_S [(Q_S^T V Q_A) / (Lambda + reg + d)] Q_A^T.

For nn.Embedding, A is diagonal (token counts), so Q_A = I. Parameters outside such layers get a
diagonal block, (1/n) sum_i g_i^2. Fitted once per objective; every right-hand side then costs a
few small matrix products.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from precompute.objective import Objective, ParamSpace, batch_grads, batches, functional_loss
from precompute.scoring import layer_calls, supported


@dataclass
class _Block:
    """One layer: its parameters' names, the eigenbases and the corrected eigenvalues."""

    module: nn.Module
    weight: str
    bias: str | None
    q_s: torch.Tensor | None = None  # [out, out]
    q_a: torch.Tensor | None = None  # [in(+1), in(+1)], None for an Embedding
    eigenvalues: torch.Tensor | None = None  # [out, in(+1)] or, for an Embedding, [V, d]


class EKFAC:
    """EK-FAC of an Objective's data Hessian; `solve` applies (approximation + reg + d)^{-1}."""

    def __init__(self, objective: Objective):
        self.objective = objective
        module_of, self.loss_fn = objective.model, objective.loss_fn
        self.model, self.batch_size = module_of, objective.batch_size
        space = objective.space
        params = dict(module_of.named_parameters())
        by_id = {id(params[n]): n for n in space.names}
        uses: dict[int, int] = {}
        candidates = [m for m in module_of.modules() if supported(m, set(by_id))]
        for m in candidates:
            uses[id(m.weight)] = uses.get(id(m.weight), 0) + 1
        self.blocks: list[_Block] = []
        for m in candidates:
            if uses[id(m.weight)] > 1:  # a tied weight: no single layer owns it
                continue
            bias = getattr(m, "bias", None)
            bias_name = by_id.get(id(bias)) if bias is not None else None
            self.blocks.append(_Block(m, by_id[id(m.weight)], bias_name))
        covered = {b.weight for b in self.blocks} | {b.bias for b in self.blocks if b.bias}
        self.diagonal_space = ParamSpace.of(module_of, [n for n in space.names if n not in covered])
        self.diagonal: torch.Tensor | None = None

    @property
    def modules(self) -> list[nn.Module]:
        return [b.module for b in self.blocks]

    # ---- fitting: two passes over the data ----------------------------------------------
    def fit(self) -> EKFAC:
        dataset, device = self.objective.dataset, self.objective.device
        n = len(dataset)
        factors = {id(b.module): [None, None] for b in self.blocks}
        for batch in self._progress(batches(dataset, self.batch_size, device), "EK-FAC factors"):
            _, calls = layer_calls(self.model, self.loss_fn, batch, self.modules)
            for module, a, g in calls:
                a_cov, s_cov = self._covariances(self._block(module), a, g)
                slot = factors[id(module)]
                slot[0] = a_cov if slot[0] is None else slot[0] + a_cov
                slot[1] = s_cov if slot[1] is None else slot[1] + s_cov
        for block in self.blocks:
            a_cov, s_cov = factors[id(block.module)]
            if s_cov is None:  # the layer never touched the loss
                continue
            block.q_s = torch.linalg.eigh(s_cov.double())[1].to(s_cov.dtype)
            if not isinstance(block.module, nn.Embedding):
                block.q_a = torch.linalg.eigh(a_cov.double())[1].to(a_cov.dtype)
        stream = batches(dataset, self.batch_size, device)
        for batch in self._progress(stream, "EK-FAC eigenvalues"):
            _, calls = layer_calls(self.model, self.loss_fn, batch, self.modules)
            per_module: dict[int, torch.Tensor] = {}
            for module, a, g in calls:
                block = self._block(module)
                if block.q_s is None:
                    continue
                rotated = self._rotated_gradients(block, a, g)  # summed over calls below
                key = id(module)
                per_module[key] = rotated if key not in per_module else per_module[key] + rotated
            for key, rotated in per_module.items():
                block = self._block_by_id(key)
                square = (rotated**2).sum(0)
                block.eigenvalues = (
                    square if block.eigenvalues is None else block.eigenvalues + square
                )
        for block in self.blocks:
            if block.eigenvalues is not None:
                block.eigenvalues = block.eigenvalues / n
        if self.diagonal_space.names:
            loss = functional_loss(self.model, self.loss_fn, self.diagonal_space)
            theta = self.diagonal_space.read(self.model)
            total = torch.zeros_like(theta)
            for batch in batches(dataset, self.batch_size, device):
                total += (batch_grads(loss, theta, batch) ** 2).sum(0)
            self.diagonal = total / n
        return self

    def _progress(self, iterable, desc: str):
        total = -(-len(self.objective.dataset) // self.batch_size)
        return tqdm(iterable, desc=desc, total=total, unit="batch", leave=False, disable=None)

    def _block(self, module: nn.Module) -> _Block:
        return self._block_by_id(id(module))

    def _block_by_id(self, key: int) -> _Block:
        return next(b for b in self.blocks if id(b.module) == key)

    @staticmethod
    def _inputs(block: _Block, a: torch.Tensor) -> torch.Tensor:
        """Linear inputs [B, N, in], with a column of ones when the bias is in the space."""
        a = a.reshape(a.shape[0], -1, a.shape[-1])
        if block.bias is not None:
            a = torch.cat([a, torch.ones_like(a[..., :1])], -1)
        return a

    def _covariances(self, block: _Block, a, g):
        """Summed A = sum a a^T (None for an Embedding) and S = sum g g^T of one call."""
        if isinstance(block.module, nn.Embedding):
            idx = a.reshape(-1)
            g = g.reshape(idx.shape[0], -1)
            if block.module.padding_idx is not None:
                g = g * (idx != block.module.padding_idx).unsqueeze(-1)
            return None, g.T @ g
        a = self._inputs(block, a)
        a = a.reshape(-1, a.shape[-1])
        g = g.reshape(-1, g.shape[-1])
        return a.T @ a, g.T @ g

    def _rotated_gradients(self, block: _Block, a, g, budget: int = 2**25) -> torch.Tensor:
        """Q_S^T G_i Q_A for every example i of the batch: [B, out, in(+1)] or [B, V, d]."""
        batch = a.shape[0]
        if isinstance(block.module, nn.Embedding):
            idx = a.reshape(batch, -1)
            gq = g.reshape(batch, idx.shape[1], -1) @ block.q_s  # [B, N, d]
            if block.module.padding_idx is not None:
                gq = gq * (idx != block.module.padding_idx).unsqueeze(-1)
            vocab = block.module.num_embeddings
            out = torch.zeros(batch * vocab, gq.shape[-1], dtype=gq.dtype, device=gq.device)
            rows = (torch.arange(batch, device=idx.device)[:, None] * vocab + idx).reshape(-1)
            out.index_add_(0, rows, gq.reshape(-1, gq.shape[-1]))
            return out.view(batch, vocab, -1)
        a = self._inputs(block, a) @ block.q_a  # [B, N, in]
        g = g.reshape(batch, -1, g.shape[-1]) @ block.q_s  # [B, N, out]
        return torch.einsum("bno,bni->boi", g, a)

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

    def solve(self, rhs: torch.Tensor, damping: float) -> torch.Tensor:
        """(EK-FAC + diag(reg) + d I)^{-1} applied to every row of rhs [Q, p]."""
        space, reg = self.objective.space, self.objective.reg
        blocks_rhs = space.unflatten(rhs)
        blocks_reg = space.unflatten(reg)
        out: dict[str, torch.Tensor] = {}
        q = rhs.shape[0]
        for block in self.blocks:
            shift = blocks_reg[block.weight].reshape(-1)[0] + damping
            v = blocks_rhs[block.weight].reshape(q, *blocks_rhs[block.weight].shape[1:])
            if block.bias is not None:
                v = torch.cat([v, blocks_rhs[block.bias][..., None]], -1)
            if block.q_s is None:  # no data curvature: the regulariser alone
                x = v / shift
            elif isinstance(block.module, nn.Embedding):
                x = ((v @ block.q_s) / (block.eigenvalues + shift)) @ block.q_s.T
            else:
                rotated = block.q_s.T @ v @ block.q_a
                x = block.q_s @ (rotated / (block.eigenvalues + shift)) @ block.q_a.T
            if block.bias is not None:
                out[block.weight], out[block.bias] = x[..., :-1], x[..., -1]
            else:
                out[block.weight] = x
        if self.diagonal_space.names:
            left = torch.cat([blocks_rhs[n].reshape(q, -1) for n in self.diagonal_space.names], 1)
            left_reg = torch.cat([blocks_reg[n].reshape(-1) for n in self.diagonal_space.names])
            x = left / (self.diagonal + left_reg + damping)
            out.update(self.diagonal_space.unflatten(x))
        return torch.cat([out[n].reshape(q, -1) for n in space.names], 1)
