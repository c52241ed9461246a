"""Inverse-Hessian solves with many right-hand sides: X = (H + d I)^{-1} B, row by row.

A solver is a function of (hvp, rhs) -> (solution, info): `hvp` maps vectors [Q, p] to H @ each row
(H symmetric), `rhs` is B [Q, p]. All test points are solved together: one factorisation
(`exact`) or one block of conjugate-gradient iterations whose Hessian-vector products are
batched over the right-hand sides (`cg`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

Hvp = Callable[[torch.Tensor], torch.Tensor]

SOLVERS = ("auto", "exact", "cg", "ekfac")
EXACT_MAX_PARAMS = 4096  # `auto` builds the explicit Hessian up to this many parameters
AUTO_DAMPING = 1e-3  # `auto` damping, relative to the mean Hessian eigenvalue


@dataclass
class SolveConfig:
    solver: str = "auto"
    damping: float | str = "auto"  # absolute d >= 0, or "auto"
    cg_tol: float = 1e-6  # relative residual |B - (H + dI) X| / |B| per right-hand side
    cg_max_iter: int = 500


def explicit_hessian(hvp: Hvp, size: int, like: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """H as a dense [p, p] matrix, from hvp on the identity in chunks, symmetrised."""
    rows = []
    for start in tqdm(
        range(0, size, chunk), desc="explicit Hessian", unit="chunk", leave=False, disable=None
    ):
        stop = min(start + chunk, size)
        eye = torch.zeros(stop - start, size, dtype=like.dtype, device=like.device)
        eye[:, start:stop] = torch.eye(stop - start, dtype=like.dtype, device=like.device)
        rows.append(hvp(eye))
    hessian = torch.cat(rows)
    return (hessian + hessian.T) / 2


def solve_exact(hvp: Hvp, rhs: torch.Tensor, damping: float | str) -> tuple[torch.Tensor, dict]:
    """X = (H + d I)^{-1} B through the eigendecomposition H = V diag(lam) V^T.

    Damping "auto" is d = 1e-3 * mean(lam), plus -min(lam) when H has negative eigenvalues, so
    the damped matrix is positive definite. The eigenvalues found are reported.
    """
    size = rhs.shape[1]
    hessian = explicit_hessian(hvp, size, rhs)
    # eigh in float64 for accuracy whatever the model's dtype
    eigenvalues, eigenvectors = torch.linalg.eigh(hessian.double())
    mean = eigenvalues.mean().item()
    smallest = eigenvalues[0].item()
    if damping == "auto":
        d = AUTO_DAMPING * abs(mean) + max(0.0, -smallest)
    else:
        d = float(damping)
    shifted = eigenvalues + d
    x = ((rhs.double() @ eigenvectors) / shifted) @ eigenvectors.T
    info = {
        "solver": "exact",
        "params": size,
        "damping": d,
        "damping_relative": d / mean if mean else None,
        "mean_eigenvalue": mean,
        "min_eigenvalue": smallest,
        "max_eigenvalue": eigenvalues[-1].item(),
        "negative_eigenvalues": int((eigenvalues < 0).sum().item()),
    }
    return x.to(rhs.dtype), info


def mean_eigenvalue(hvp: Hvp, size: int, like: torch.Tensor, probes: int = 16) -> float:
    """Hutchinson estimate of trace(H)/p with Rademacher probes (seeded)."""
    generator = torch.Generator().manual_seed(0)
    signs = torch.randint(0, 2, (probes, size), generator=generator).to(like) * 2 - 1
    return (signs * hvp(signs)).sum(1).mean().item() / size


def solve_cg(
    hvp: Hvp, rhs: torch.Tensor, damping: float | str, tol: float = 1e-6, max_iter: int = 500
) -> tuple[torch.Tensor, dict]:
    """X = (H + d I)^{-1} B by conjugate gradients on all rows at once.

    Each iteration makes one batched Hessian-vector product over the rows not yet converged
    (relative residual |b - (H + dI) x| / |b| <= tol). Damping "auto" is 1e-3 * the Hutchinson
    estimate of the mean eigenvalue. A row meeting non-positive curvature stops there.
    """
    mean = mean_eigenvalue(hvp, rhs.shape[1], rhs)
    d = AUTO_DAMPING * abs(mean) if damping == "auto" else float(damping)

    def damped(v: torch.Tensor) -> torch.Tensor:
        return hvp(v) + d * v

    x = torch.zeros_like(rhs)
    r = rhs.clone()
    p = r.clone()
    rs = (r * r).sum(1)
    target = tol * rhs.norm(dim=1)
    active = rs.sqrt() > target
    negative = torch.zeros(len(rhs), dtype=torch.bool, device=rhs.device)
    iterations = 0
    bar = tqdm(total=max_iter, desc="conjugate gradients", unit="it", leave=False, disable=None)
    while active.any() and iterations < max_iter:
        iterations += 1
        bar.update()
        bar.set_postfix(unconverged=int(active.sum()))
        idx = active.nonzero().squeeze(1)
        ap = damped(p[idx])
        curvature = (p[idx] * ap).sum(1)
        bad = curvature <= 0
        negative[idx[bad]] = True
        alpha = torch.where(bad, torch.zeros_like(curvature), rs[idx] / curvature)
        x[idx] += alpha[:, None] * p[idx]
        r[idx] -= alpha[:, None] * ap
        rs_new = (r[idx] * r[idx]).sum(1)
        beta = rs_new / rs[idx]
        p[idx] = r[idx] + beta[:, None] * p[idx]
        rs[idx] = rs_new
        active[idx] = (rs_new.sqrt() > target[idx]) & ~bad
    bar.close()
    relative = rs.sqrt() / rhs.norm(dim=1).clamp_min(torch.finfo(rhs.dtype).tiny)
    info = {
        "solver": "cg",
        "params": rhs.shape[1],
        "damping": d,
        "damping_relative": d / mean if mean else None,
        "mean_eigenvalue": mean,
        "iterations": iterations,
        "tolerance": tol,
        "max_relative_residual": relative.max().item() if len(rhs) else 0.0,
        "unconverged": int((relative > tol).sum().item()),
        "negative_curvature_rows": int(negative.sum().item()),
    }
    return x, info


def solve_ekfac(objective, rhs: torch.Tensor, damping: float | str) -> tuple[torch.Tensor, dict]:
    """X = (EK-FAC of the data Hessian + diag(reg) + d I)^{-1} B (see precompute.ekfac).

    Damping "auto" is 1e-3 * the mean eigenvalue of the approximation.
    """
    from precompute.ekfac import EKFAC

    curvature = EKFAC(objective).fit()
    mean = curvature.mean_eigenvalue()
    d = AUTO_DAMPING * abs(mean) if damping == "auto" else float(damping)
    info = {
        "solver": "ekfac",
        "params": rhs.shape[1],
        "damping": d,
        "damping_relative": d / mean if mean else None,
        "mean_eigenvalue": mean,
        "kronecker_blocks": [b.weight for b in curvature.blocks],
        "diagonal_params": list(curvature.diagonal_space.names),
    }
    return curvature.solve(rhs, d), info


def resolve(solver: str, size: int, stage: str) -> str:
    """The solver `auto` stands for: exact up to EXACT_MAX_PARAMS parameters; past that, cg
    for a finetuning Hessian (its data, the finetuning set, is small) and ekfac for the
    pretraining Hessian (one pass per iteration over the large pretraining set is too dear)."""
    if solver != "auto":
        return solver
    if size <= EXACT_MAX_PARAMS:
        return "exact"
    return "ekfac" if stage == "pretrain" else "cg"


def solve(
    objective, rhs: torch.Tensor, config: SolveConfig, stage: str = "finetune"
) -> tuple[torch.Tensor, dict]:
    """(H + d I)^{-1} rhs for the Hessian H of `objective` (an Objective), by config.solver
    (`auto` resolved by size and stage, see `resolve`)."""
    solver = resolve(config.solver, rhs.shape[1], stage)
    if solver == "exact":
        return solve_exact(objective.hvp, rhs, config.damping)
    if solver == "cg":
        return solve_cg(objective.hvp, rhs, config.damping, config.cg_tol, config.cg_max_iter)
    if solver == "ekfac":
        return solve_ekfac(objective, rhs, config.damping)
    raise ValueError(f"unknown solver {solver!r}: use one of {', '.join(SOLVERS)}")
