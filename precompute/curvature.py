"""Inverse-curvature solves with many right-hand sides: X = (C + d I)^{-1} B, row by row.

C is the curvature of an objective (precompute.objective.Objective: its Hessian or its
Gauss-Newton matrix, plus the regulariser), d >= 0 the damping, B [Q, p] the stacked test-side
vectors. All test points are solved together.

Every solver has one signature, (objective, rhs, config) -> (solution, info), and sits in one
table, `SOLVER_TABLE`, from which the command line's choices are built:
- `exact`: the explicit matrix and one eigendecomposition; reports negative eigenvalues.
- `cg`: conjugate gradients, each row its own Krylov space, one batched curvature product per
  iteration over the rows not yet converged.
- `pcg`: block conjugate gradients, the rows sharing one Krylov space (see `block_pcg`),
  preconditioned by the regulariser's diagonal plus the damping (the default) or by the EK-FAC
  inverse (`PRECONDITIONERS`).
- `ekfac`: the EK-FAC approximation's inverse (precompute.ekfac), no iterations.
The damping rule and the common fields of the info come from `damping_for` and `solve_info`.
The iterative solvers' infos also carry what precompute.health checks: `tolerance`,
`iterations`, `max_relative_residual`, `unconverged_rows`, `negative_curvature_rows` and
`min_curvature`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from precompute.objective import CURVATURES, device_memory

Hvp = Callable[[torch.Tensor], torch.Tensor]
Precondition = Callable[[torch.Tensor], torch.Tensor]

EXACT_MAX_PARAMS = 4096  # `auto` builds the explicit Hessian up to this many parameters
EXACT_MAX_WORK = 5 * 10**7  # ... and up to this many parameters x training examples
AUTO_DAMPING = 1e-3  # `auto` damping, relative to the mean Hessian eigenvalue
PROBES = 16  # Rademacher probes of the Hutchinson estimate of the mean eigenvalue
GRAM_PART = 2**24  # entries of z converted to float64 at a time by _orthonormal_rows
HISTORY_SHARE = 8  # block_pcg's earlier blocks take at most 1 / HISTORY_SHARE of the memory
PRECONDITIONERS = ("regulariser", "ekfac")  # pcg's M: diag(reg) + d I, or EK-FAC + diag(reg) + d I


@dataclass
class SolveConfig:
    solver: str = "auto"
    damping: float | str = "auto"  # absolute d >= 0, or "auto"
    cg_tol: float = 1e-6  # relative residual |B - (C + dI) X| / |B| per right-hand side
    cg_max_iter: int = 500
    curvature: str = "hessian"  # hessian | ggn: the matrix C (see precompute.objective)
    preconditioner: str = "regulariser"  # pcg's M: one of PRECONDITIONERS


# ---- the shared pieces: damping and info ------------------------------------------------


def damping_for(damping: float | str, mean: float | None, smallest: float | None = None) -> float:
    """d for a setting: a number as given; "auto" is AUTO_DAMPING * |mean eigenvalue|, plus
    -smallest when the smallest eigenvalue is known and negative (so C + dI is positive
    definite)."""
    if damping != "auto":
        return float(damping)
    return AUTO_DAMPING * abs(mean or 0.0) + max(0.0, -(smallest or 0.0))


def solve_info(
    solver: str, size: int, d: float, mean: float | None, curvature: str = "hessian", **extra
) -> dict:
    """The fields every solver reports: its name, the parameter count, the curvature, the
    damping (absolute and relative to the mean eigenvalue, where known)."""
    return {
        "solver": solver,
        "params": size,
        "curvature": curvature,
        "damping": d,
        "damping_relative": d / mean if mean else None,
        "mean_eigenvalue": mean,
        **extra,
    }


def _iterative_info(residual, rhs, tol, iterations, negative, lowest) -> dict:
    """Convergence fields of an iterative solve (checked by precompute.health), from the final
    residual rows [Q, p]."""
    tiny = torch.finfo(rhs.dtype).tiny
    relative = residual.norm(dim=1) / rhs.norm(dim=1).clamp_min(tiny)
    unconverged = (relative > tol) | negative
    return {
        "iterations": iterations,
        "tolerance": tol,
        "max_relative_residual": relative.max().item() if len(rhs) else 0.0,
        "unconverged": int(unconverged.sum().item()),
        "negative_curvature_rows": int(negative.sum().item()),
        "min_curvature": lowest if iterations else None,
        "unconverged_rows": unconverged.nonzero().squeeze(1).tolist(),
    }


def mean_eigenvalue(hvp: Hvp, size: int, like: torch.Tensor, probes: int = PROBES) -> float:
    """Hutchinson estimate of trace(C)/p with Rademacher probes (seeded)."""
    signs = rademacher(probes, size, like)
    return (signs * hvp(signs)).sum(1).mean().item() / size


def rademacher(probes: int, size: int, like: torch.Tensor) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 2, (probes, size), generator=generator).to(like) * 2 - 1


# ---- exact ------------------------------------------------------------------------------


def explicit_hessian(hvp: Hvp, size: int, like: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """C as a dense [p, p] matrix, from products with the identity in chunks, symmetrised."""
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
    """X = (C + d I)^{-1} B through the eigendecomposition C = V diag(lam) V^T.

    Damping "auto" is d = 1e-3 * mean(lam), plus -min(lam) when C has negative eigenvalues, so
    the damped matrix is positive definite. The eigenvalues found are reported.
    """
    size = rhs.shape[1]
    hessian = explicit_hessian(hvp, size, rhs)
    # eigh in float64 for accuracy whatever the model's dtype
    eigenvalues, eigenvectors = torch.linalg.eigh(hessian.double())
    mean = eigenvalues.mean().item()
    smallest = eigenvalues[0].item()
    d = damping_for(damping, mean, smallest)
    x = ((rhs.double() @ eigenvectors) / (eigenvalues + d)) @ eigenvectors.T
    info = solve_info(
        "exact",
        size,
        d,
        mean,
        min_eigenvalue=smallest,
        max_eigenvalue=eigenvalues[-1].item(),
        negative_eigenvalues=int((eigenvalues < 0).sum().item()),
    )
    return x.to(rhs.dtype), info


# ---- conjugate gradients, one Krylov space per row ----------------------------------------


def solve_cg(
    hvp: Hvp,
    rhs: torch.Tensor,
    damping: float | str,
    tol: float = 1e-6,
    max_iter: int = 500,
    mean: float | None = None,
) -> tuple[torch.Tensor, dict]:
    """X = (C + d I)^{-1} B by conjugate gradients on all rows at once.

    Each iteration makes one batched curvature product over the rows not yet converged
    (relative residual |b - (C + dI) x| / |b| <= tol). Damping "auto" is 1e-3 * the mean
    eigenvalue: `mean` where known exactly (trace(C) / p), else its Hutchinson estimate. A row
    meeting non-positive curvature stops there and counts as unconverged. The info lists the
    unconverged rows and the lowest Rayleigh quotient p^T (C + dI) p / |p|^2 met along the
    search directions.
    """
    mean = mean if mean is not None else mean_eigenvalue(hvp, rhs.shape[1], rhs)
    d = damping_for(damping, mean)

    def damped(v: torch.Tensor) -> torch.Tensor:
        return hvp(v).add_(v, alpha=d)

    x = torch.zeros_like(rhs)
    r = rhs.clone()
    p = r.clone()
    rs = (r * r).sum(1)
    target = tol * rhs.norm(dim=1)
    active = rs.sqrt() > target
    negative = torch.zeros(len(rhs), dtype=torch.bool, device=rhs.device)
    lowest = torch.full((len(rhs),), float("inf"), dtype=rhs.dtype, device=rhs.device)
    iterations = 0
    bar = tqdm(total=max_iter, desc="conjugate gradients", unit="it", leave=False, disable=None)
    while active.any() and iterations < max_iter:
        iterations += 1
        bar.update()
        bar.set_postfix(unconverged=int(active.sum()))
        idx = active.nonzero().squeeze(1)
        ap = damped(p[idx])
        curvature = (p[idx] * ap).sum(1)
        # p^T (C + dI) p / |p|^2: how far below zero the damped curvature went
        rayleigh = curvature / (p[idx] * p[idx]).sum(1).clamp_min(torch.finfo(rhs.dtype).tiny)
        lowest[idx] = torch.minimum(lowest[idx], rayleigh)
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
    info = solve_info("cg", rhs.shape[1], d, mean)
    info.update(_iterative_info(r, rhs, tol, iterations, negative, lowest.min().item()))
    return x, info


# ---- block preconditioned conjugate gradients ---------------------------------------------


def block_pcg(
    damped: Hvp,
    rhs: torch.Tensor,
    precondition: Precondition,
    tol: float = 1e-6,
    max_iter: int = 500,
    first_product: Hvp | None = None,
    keep: int | None = None,
) -> tuple[torch.Tensor, dict]:
    """X = A^{-1} B for a symmetric positive definite A (`damped`, rows in, rows out) by
    breakdown-free block preconditioned conjugate gradients (O'Leary 1980; Ji & Li 2017).

    All rows share one Krylov space: at step k the search block P_k spans
    orth(M^{-1} R_k + P_{k-1} beta), M^{-1} = `precondition`, so a row's solution draws on the
    directions found for every other row, and after k steps X is A-optimal over the block Krylov
    space of dimension up to k * Q. Each step:
        alpha = (P^T A P)^{-1} P^T R,   X += P alpha,   R -= A P alpha,
        Z = M^{-1} R,  beta = -(P^T A P)^{-1} (A P)^T Z,  P = orth(Z + P beta),
    one product with A per step over at most Q rows, until every row's relative residual
    |r|/|b| is at most `tol`. A row that has converged stays in the block: its residual keeps
    adding directions that the rows still converging need. Freezing converged rows shrank the
    block to the last few rows, which then crept on at one vector's speed (measured with the
    last block alone, below): 272 steps against 98 on benchmarks/peers.py's small problem;
    keeping at least a quarter of the rows, 101 there but 432 against 54 on a plain test
    problem with 16 rows (the cost: news' UPDATED system takes its last step over all 100 rows
    where 12 were unconverged). Every row's X and R take
    each step's correction, the A-optimal one over the block. orth() scales the rows of Z to
    unit length, so small residuals count as much as large ones, and drops directions that are
    (numerically) dependent, the rank deflation that keeps P^T A P invertible when rows become
    alike. The eigenvalues of P^T A P are the Rayleigh quotients of A over the block (P
    orthonormal); a non-positive one means A is not positive definite: the solve stops there,
    the unconverged rows flagged. `first_product`, if given, replaces `damped` for the first
    step only (it may compute more than the product, e.g. a trace estimate on extra rows).

    Conjugacy to every earlier block holds in exact arithmetic with the last one alone; in
    floating point it is lost as the extreme eigenvalues converge (Paige 1976), and the steps
    repeat directions already searched. So every step works over the kept blocks, the last
    `keep` (P_j, A P_j), or as many as 1 / HISTORY_SHARE of the memory holds (`history_blocks`):
    after its own step it takes R's remaining part in each earlier block's span,
    alpha_j = (P_j^T A P_j)^{-1} P_j^T R, X += P_j alpha_j, R -= A P_j alpha_j (zero in exact
    arithmetic, rounding's share otherwise), and conjugates the next block against each,
    Z -= P_j (P_j^T A P_j)^{-1} (A P_j)^T Z, oldest first. Conjugation alone stalls near the
    working precision's floor, where the residual's error lies in directions already searched;
    the corrections take it out. Each is made only where some row's part in the block's span
    exceeds sqrt(eps) of the row (semi-orthogonality keeps the iteration as in exact
    arithmetic: partial reorthogonalisation, Simon 1984), so a well-conditioned system pays
    two products a kept block a step, to measure, and the info counts the `corrections`.
    Explicit float32 matrices, steps to tolerance 1e-3 / 1e-6 with the last block alone, then
    with every block: benchmarks/peers.py's small Hessian 71 / 133 and 39 / 62 (conjugation
    alone, 39 / 164); benchmarks/scale.py's pretraining GGN 4 / 7 and 4 / 6. news' UPDATED
    system (float64) takes its 7 steps either way, in the same time (12 corrections).
    """
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    target = tol * rhs.norm(dim=1)
    active = r.norm(dim=1) > target
    negative = torch.zeros(len(rhs), dtype=torch.bool, device=rhs.device)
    lowest = float("inf")
    iterations, block_sizes = 0, []
    keep = keep if keep is not None else history_blocks(rhs)
    level = torch.finfo(rhs.dtype).eps ** 0.5  # semi-orthogonality suffices (Simon 1984)
    corrections = 0
    past: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (P, A P, (P^T A P)^-1)
    p = _orthonormal_rows(_unit_rows(precondition(r))) if active.any() else None
    bar = tqdm(total=max_iter, desc="block PCG", unit="it", leave=False, disable=None)
    while active.any() and iterations < max_iter and p is not None and len(p):
        iterations += 1
        block_sizes.append(len(p))
        bar.update()
        bar.set_postfix(unconverged=int(active.sum()), block=len(p))
        ap = (first_product or damped)(p) if iterations == 1 else damped(p)
        gram = p @ ap.T
        gram = (gram + gram.T) / 2
        eigenvalues, vectors = torch.linalg.eigh(gram.double())
        lowest = min(lowest, eigenvalues[0].item())
        if eigenvalues[0] <= 0:  # the damped curvature is not positive definite
            negative |= active
            break
        inverse = (vectors / eigenvalues) @ vectors.T  # (P^T A P)^{-1}, [k, k] float64
        # the [Q, k] products in the working dtype, like the Gram: only the k x k solve in float64
        alpha = ((r @ p.T).double() @ inverse).to(rhs.dtype)  # rows: [Q, k]
        x.addmm_(alpha, p)
        r.addmm_(alpha, ap, alpha=-1)
        for p_j, ap_j, inverse_j in past:  # what rounding left of R in earlier blocks' span
            share = r @ p_j.T  # zero in exact arithmetic
            if _negligible(share, r, level):
                continue
            alpha_j = (share.double() @ inverse_j).to(rhs.dtype)
            x.addmm_(alpha_j, p_j)
            r.addmm_(alpha_j, ap_j, alpha=-1)
            corrections += 1
        active = r.norm(dim=1) > target
        if not active.any():
            break
        past = [*past, (p, ap, inverse)][-keep:]
        z = precondition(r)
        for j, (p_j, ap_j, inverse_j) in enumerate(past):
            beta = ((z @ ap_j.T).double() @ inverse_j).to(rhs.dtype)  # [Q, k]
            newest = j == len(past) - 1  # the recurrence itself; the others zero when exact
            if not newest and _negligible(beta, z, level):
                continue
            z = z - beta @ p_j
            corrections += not newest
        p = _orthonormal_rows(_unit_rows(z))
    bar.close()
    info = _iterative_info(r, rhs, tol, iterations, negative, lowest)
    info.update(block_sizes=block_sizes, conjugated_blocks=keep, corrections=corrections)
    return x, info


def _negligible(coefficients: torch.Tensor, rows: torch.Tensor, level: float) -> bool:
    """Whether every row's coefficients over an orthonormal block ([Q, k], the norm of that
    row's part in the block's span) are at most `level` times the row's norm."""
    return bool((coefficients.norm(dim=1) <= level * rows.norm(dim=1)).all())


def history_blocks(rhs: torch.Tensor) -> int:
    """Earlier blocks (P, A P) block_pcg keeps to conjugate against: as many of rhs's size as
    1 / HISTORY_SHARE of the device's memory holds, at least one."""
    block = 2 * rhs.numel() * rhs.element_size()  # P and A P
    return max(1, device_memory(rhs.device) // HISTORY_SHARE // block)


def _unit_rows(z: torch.Tensor) -> torch.Tensor:
    """The rows of z scaled to unit length (zero rows stay zero)."""
    return z / z.norm(dim=1, keepdim=True).clamp_min(torch.finfo(z.dtype).tiny)


def _orthonormal_rows(z: torch.Tensor, rank_tol: float | None = None) -> torch.Tensor:
    """An orthonormal basis (rows) of the row space of z [k, p], without directions whose
    singular value is below rank_tol (default sqrt(eps) in z's dtype) times the largest: the
    deflation of block CG.

    From the Gram matrix in float64: z z^T = U S^2 U^T, the basis S^{-1} U^T z over the kept
    directions. Squaring the singular values costs nothing in float64 here: the smallest kept
    is sqrt(eps) of the largest in z's dtype, so the basis is orthonormal to about
    eps_64 / eps (2e-9 for float32 z). One matrix product (2 p k^2 operations at full speed)
    where a QR factorisation of z^T took three times as long: 0.077 s against 0.235 s for news'
    100 x 102,565 float64 block. z goes to float64 in parts of its columns (GRAM_PART)."""
    if not len(z):
        return z
    rank_tol = rank_tol if rank_tol is not None else torch.finfo(z.dtype).eps ** 0.5
    # columns in parts of at most GRAM_PART entries, so z is never copied whole in float64
    step = max(1, GRAM_PART // len(z))
    parts = [slice(start, start + step) for start in range(0, z.shape[1], step)]
    gram = sum(z[:, c].double() @ z[:, c].double().T for c in parts)
    squares, u = torch.linalg.eigh(gram)
    keep = squares > (rank_tol**2) * squares[-1].clamp_min(torch.finfo(gram.dtype).tiny)
    coefficients = (u[:, keep] / squares[keep].sqrt()).T
    return torch.cat([(coefficients @ z[:, c].double()).to(z.dtype) for c in parts], 1)


def solve_pcg_hvp(
    hvp: Hvp,
    rhs: torch.Tensor,
    damping: float | str,
    precondition: Callable[[torch.Tensor, float], torch.Tensor],
    tol: float = 1e-6,
    max_iter: int = 500,
    mean: float | None = None,
) -> tuple[torch.Tensor, dict]:
    """X = (C + d I)^{-1} B by `block_pcg` with M^{-1} = precondition(., d).

    The mean eigenvalue (for "auto" damping and for the relative damping reported) is `mean`
    where known exactly (trace(C) / p), else a Hutchinson estimate, which costs a product with
    16 probe rows: computed first when the damping is "auto", and otherwise appended to the
    first step's block, whose pass over the data it shares.
    """
    size = rhs.shape[1]
    if mean is None and damping == "auto":
        mean = mean_eigenvalue(hvp, size, rhs)
    d = damping_for(damping, mean)
    probes = rademacher(PROBES, size, rhs)

    def first(p: torch.Tensor) -> torch.Tensor:
        nonlocal mean
        if mean is not None:
            return hvp(p).add_(p, alpha=d)
        both = hvp(torch.cat([p, probes]))
        mean = (probes * both[len(p) :]).sum(1).mean().item() / size
        return both[: len(p)].add_(p, alpha=d)

    x, convergence = block_pcg(
        lambda v: hvp(v).add_(v, alpha=d),
        rhs,
        lambda r: precondition(r, d),
        tol,
        max_iter,
        first_product=first,
    )
    if mean is None:  # nothing to solve: no step was taken
        mean = mean_eigenvalue(hvp, size, rhs)
    info = solve_info("pcg", size, d, mean)
    info.update(convergence)
    return x, info


# ---- the table of solvers: (objective, rhs, config) -> (solution, info) ---------------------


def _exact(objective, rhs: torch.Tensor, config: SolveConfig) -> tuple[torch.Tensor, dict]:
    x, info = solve_exact(objective.hvp, rhs, config.damping)
    return x, {**info, "curvature": objective.curvature}


def _cg(objective, rhs: torch.Tensor, config: SolveConfig) -> tuple[torch.Tensor, dict]:
    x, info = solve_cg(
        objective.hvp, rhs, config.damping, config.cg_tol, config.cg_max_iter,
        objective.mean_eigenvalue(),
    )  # fmt: skip
    return x, {**info, "curvature": objective.curvature}


def _pcg(objective, rhs: torch.Tensor, config: SolveConfig) -> tuple[torch.Tensor, dict]:
    """Block PCG on the objective's curvature. A preconditioner only changes the iterations,
    never the solution. The default M = diag(reg) + d I costs nothing and weighs parameters by
    their regulariser (a proximal term on the shared ones only, say). `ekfac` fits EK-FAC to
    the objective in two passes over its data (to the Gauss-Newton matrix for a GGN system, to
    the empirical Fisher for a Hessian system). Block CG's shared Krylov space does the work on
    every system measured, and EK-FAC did not shorten it: steps to the default tolerance, or to
    1e-2 where marked, with EK-FAC against diag(reg) + d I:
    - benchmarks/scale.py's pretraining GGN, 20,000 examples, 3,322 parameters: 7 against 6
      (EK-FAC misses its top eigenvalue, 0.0098 against 0.027: M^{-1} C spans 0.15 to 7.5
      where C alone spans a condition number of 28);
    - news' UPDATED Hessian: 7 against 7 (its whole run's stage 15.98 s without the fit);
    - benchmarks/peers.py's small Hessian (5,829 parameters): 40 against 38 (1e-2);
    - benchmarks/peers.py's medium GGN (85,002 parameters, 50,000 examples, every earlier
      block kept): 55 against 22 (1e-3); 719 s to the solutions, where the regulariser's
      whole run took 314 s."""
    if config.preconditioner == "ekfac":
        fisher = "ggn" if objective.curvature == "ggn" else "empirical"
        curvature = _fit_ekfac(objective, fisher)
        precondition = curvature.preconditioner
        name = "ekfac (GGN)" if curvature.fisher == "ggn" else "ekfac (empirical Fisher)"
        layout = _ekfac_layout(curvature)
    else:
        precondition, name, layout = regulariser_preconditioner(objective.reg), "regulariser", {}
    x, info = solve_pcg_hvp(
        objective.hvp, rhs, config.damping, precondition, config.cg_tol, config.cg_max_iter,
        objective.mean_eigenvalue(),
    )  # fmt: skip
    info.update(curvature=objective.curvature, preconditioner=name, **layout)
    return x, info


def regulariser_preconditioner(reg: torch.Tensor) -> Callable[[torch.Tensor, float], torch.Tensor]:
    """M^{-1} r = r / (reg + d), the curvature's part that needs no data. Where reg + d is zero
    (no regulariser, no damping) the mean of its positive entries stands in, or 1 where there
    are none: any positive definite M keeps the solve exact."""

    def precondition(r: torch.Tensor, d: float) -> torch.Tensor:
        diagonal = reg + d
        positive = diagonal > 0
        if not positive.all():
            fill = diagonal[positive].mean() if positive.any() else diagonal.new_tensor(1.0)
            diagonal = torch.where(positive, diagonal, fill)
        return r / diagonal

    return precondition


def _ekfac(objective, rhs: torch.Tensor, config: SolveConfig) -> tuple[torch.Tensor, dict]:
    """X = (EK-FAC of the data term + diag(reg) + d I)^{-1} B (see precompute.ekfac), the data
    term's EK-FAC fitted by `_fit_ekfac`; damping "auto" is 1e-3 * the mean eigenvalue of the
    approximation."""
    curvature = _fit_ekfac(objective)
    mean = curvature.mean_eigenvalue()
    d = damping_for(config.damping, mean)
    name = "Gauss-Newton (EK-FAC)" if curvature.fisher == "ggn" else "empirical Fisher (EK-FAC)"
    info = solve_info("ekfac", rhs.shape[1], d, mean, name, **_ekfac_layout(curvature))
    return curvature.solve(rhs, d), info


def _fit_ekfac(objective, fisher: str | None = None):
    """EK-FAC fitted to the objective's curvature (`ekfac`), or to the `fisher` given (`pcg`'s
    preconditioner).

    By default, of the Gauss-Newton matrix (precompute.ekfac.ggn_roots) whenever the loss splits
    into outputs and a convex loss of them, whichever curvature is solved: at an optimum the
    Hessian is the GGN plus terms of the size of the residuals, and for cross-entropy the GGN is
    the true Fisher. Of the empirical Fisher (1/n) sum_i g_i g_i^T, the task's own gradients,
    only without a split: on a confident model it is far smaller than the curvature (an
    example predicted with probability 1 - e contributes O(e^2) where the Fisher has O(e),
    Kunstner et al. 2019), and its inverse far too large. On a briefly trained 32-64-16 MLP
    (benchmarks/scale.py), the FIXED scenario's head solved by the empirical Fisher's EK-FAC
    was 13x the GGN solve at Pearson -0.04 against it; by the GGN's EK-FAC, 1.5x at 0.57.
    For a Hessian system the GGN is taken only where its fit stays cheap
    (precompute.ekfac.ggn_fit_is_cheap): a task's hooks with many outputs per example, such as
    a language model's logits, would build each example's loss Hessian."""
    from precompute.ekfac import EKFAC, ggn_fit_is_cheap

    if fisher is None:  # a GGN system always has its split (Objective checks)
        cheap = objective.curvature == "ggn" or ggn_fit_is_cheap(objective)
        fisher = "ggn" if cheap else "empirical"
    return EKFAC(objective, fisher=fisher).fit()


def _ekfac_layout(curvature) -> dict:
    return {
        "kronecker_blocks": [b.weight for b in curvature.blocks],
        "diagonal_params": list(curvature.diagonal_space.names),
    }


def solve_ekfac(objective, rhs: torch.Tensor, damping: float | str) -> tuple[torch.Tensor, dict]:
    """`ekfac` for a damping setting (kept for callers of the earlier signature)."""
    return _ekfac(objective, rhs, SolveConfig("ekfac", damping))


SOLVER_TABLE: dict[str, Callable[..., tuple[torch.Tensor, dict]]] = {
    "exact": _exact,
    "cg": _cg,
    "pcg": _pcg,
    "ekfac": _ekfac,
}
SOLVERS = ("auto", *SOLVER_TABLE)
__all__ = ["CURVATURES", "SOLVERS", "SOLVER_TABLE", "SolveConfig", "resolve", "solve"]


def resolve(solver: str, size: int, stage: str, examples: int = 0) -> str:
    """The solver `auto` stands for: exact up to EXACT_MAX_PARAMS parameters when building the
    explicit matrix (size products over the data) costs at most EXACT_MAX_WORK
    parameter-examples; past that, pcg for a finetuning system (its data, the finetuning set, is
    small, and the preconditioned block solve is exact in a few passes) and ekfac for the
    pretraining Hessian (where each pcg step is a pass over the large pretraining set)."""
    if solver != "auto":
        return solver
    if size <= EXACT_MAX_PARAMS and size * examples <= EXACT_MAX_WORK:
        return "exact"
    return "ekfac" if stage == "pretrain" else "pcg"


def solve(
    objective, rhs: torch.Tensor, config: SolveConfig, stage: str = "finetune"
) -> tuple[torch.Tensor, dict]:
    """(C + d I)^{-1} rhs for the curvature C of `objective` (an Objective), by config.solver
    (`auto` resolved by size and stage, see `resolve`)."""
    solver = resolve(config.solver, rhs.shape[1], stage, objective.n)
    if solver not in SOLVER_TABLE:
        raise ValueError(f"unknown solver {solver!r}: use one of {', '.join(SOLVERS)}")
    products = prepare_products(objective) if solver != "ekfac" else None
    x, info = SOLVER_TABLE[solver](objective, rhs, config)
    if products is not None:
        info["products"] = products
    return x, info


def prepare_products(objective) -> str:
    """How the objective's curvature products are taken, said in the solver's info; for the
    Gauss-Newton matrix in this process, its layer factors are recorded first where they apply
    (precompute.factors: one pass over the data, then every product without the network)."""
    if objective.curvature != "ggn":
        return "double backward"
    if objective.sharded is not None:
        return "forward and reverse mode, summed over the cluster"
    if objective.factors is None:
        from precompute.factors import GGNFactors

        objective.factors, how = GGNFactors.record(objective)
        return how
    return "stored layer factors"
