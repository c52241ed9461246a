"""Optimisation to a stationary point, shared by the built-in tasks.

The influence engine assumes every trained model sits at a stationary point of its objective, so
the tasks minimise full-batch in float64 until the gradient 2-norm is tiny. L-BFGS gets close but
stalls near 1e-7 (its line search compares loss values that no longer differ in float64); the
Newton-CG steps here take it the rest of the way, since they need no loss comparisons and converge
quadratically at a strict local minimum.

An `objective` is a callable taking no arguments that returns the scalar loss of the current
parameter values; `params` are the leaf tensors (requires_grad=True) that it is minimised over,
updated in place.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable

import torch

from precompute.objective import second_order

Objective = Callable[[], torch.Tensor]


def sq_norm(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """Sum of the squared entries of all tensors (|theta|^2 for an L2 term), a scalar tensor."""
    return sum((p * p).sum() for p in params)


def flat(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """The tensors' entries concatenated into one vector."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflat(v: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Split a vector from `flat` back into views shaped like the tensors of `like`."""
    chunks = v.split([t.numel() for t in like])
    return [c.view_as(t) for c, t in zip(chunks, like, strict=True)]


def grad_norm(objective: Objective, params: list[torch.Tensor]) -> float:
    """2-norm of the gradient of objective() over params."""
    return float(flat(torch.autograd.grad(objective(), params)).norm())


def conjugate_gradient(
    hvp: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, rtol: float, max_iter: int
) -> tuple[torch.Tensor | None, int]:
    """Solve H x = b by conjugate gradients, H given by its product `hvp(v)` = H v.

    Minimises (1/2) x'Hx - b'x from x = 0 and stops once the residual |b - Hx| <= rtol |b| or
    after `max_iter` iterations. Returns (x, iterations); x is None where H shows non-positive
    curvature along a search direction (H not positive definite).
    """
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rr = r @ r
    stop = (rtol * b.norm()) ** 2
    for it in range(1, max_iter + 1):
        hp = hvp(p)
        php = p @ hp
        if php <= 0:
            return None, it
        step = rr / php
        x += step * p
        r -= step * hp
        rr_new = r @ r
        if rr_new <= stop:
            return x, it
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x, max_iter


def newton_cg(objective: Objective, params: list[torch.Tensor], tol: float, max_steps: int) -> dict:
    """Minimise objective() over params by Newton steps theta -= H^{-1} grad.

    H^{-1} grad is solved by `conjugate_gradient` on exact Hessian-vector products (double
    backward) to a relative residual of min(1e-2, sqrt|grad|). Stops when |grad| <= tol, after
    `max_steps` steps, where the Hessian is not positive definite (not yet in a convex basin), or
    where no step helps: a step that does not reduce |grad| is halved, up to 10 times, and if none
    does the parameters are restored. Returns {"grad_norm", "steps", "cg_iterations"}.
    """
    n = sum(p.numel() for p in params)
    cg_iterations = 0
    steps = 0

    def gradient(create_graph: bool):
        grads = torch.autograd.grad(objective(), params, create_graph=create_graph)
        return grads, flat(grads).detach()

    grads, g = gradient(True)
    gnorm = float(g.norm())
    while gnorm > tol and steps < max_steps:
        steps += 1

        def hvp(v: torch.Tensor, grads=grads) -> torch.Tensor:
            vs = unflat(v, params)
            hv = torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=True)
            return flat(hv).detach()

        d, its = conjugate_gradient(hvp, g, rtol=min(1e-2, gnorm**0.5), max_iter=n)
        cg_iterations += its
        if d is None:  # not yet in a convex basin: leave it to more L-BFGS
            break
        old = flat(params).detach().clone()
        scale = 1.0
        for _ in range(11):
            with torch.no_grad():
                for p, value in zip(params, unflat(old - scale * d, params), strict=True):
                    p.copy_(value)
            new_grads, new_g = gradient(True)
            new_norm = float(new_g.norm())
            if new_norm < gnorm:
                break
            scale *= 0.5
        else:  # no step reduced the gradient: restore and give up
            with torch.no_grad():
                for p, value in zip(params, unflat(old, params), strict=True):
                    p.copy_(value)
            break
        grads, g, gnorm = new_grads, new_g, new_norm
    return {"grad_norm": gnorm, "steps": steps, "cg_iterations": cg_iterations}


def lbfgs(
    objective: Objective,
    params: list[torch.Tensor],
    max_iter: int,
    history: int = 30,
    tolerance_change: float = 1e-16,
) -> tuple[torch.optim.LBFGS, Callable[[], torch.Tensor]]:
    """(optimizer, closure) of full-batch L-BFGS (strong Wolfe line search, step 1) on
    objective(): each opt.step(closure) runs up to `max_iter` iterations. No gradient
    tolerance: the caller decides when to stop, on the true gradient norm."""
    opt = torch.optim.LBFGS(
        params,
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=0.0,
        tolerance_change=tolerance_change,
        history_size=history,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        value = objective()
        value.backward()
        return value.detach()

    return opt, closure


def lbfgs_newton(
    objective: Objective,
    params: list[torch.Tensor],
    tol: float,
    *,
    newton_from: float = 1e-2,
    chunk: int = 50,
    max_iter: int = 3000,
    newton_steps: int = 8,
    history: int = 30,
) -> dict:
    """Minimise objective() over params to a gradient 2-norm <= tol, for non-convex models.

    Full-batch L-BFGS (strong Wolfe) in chunks of `chunk` iterations until |grad| <
    `newton_from`, then `newton_cg` (exact Hessian-vector products, under
    precompute.objective.second_order), which converges quadratically where L-BFGS slows down.
    Where Newton stops short (the Hessian not yet positive definite there), more L-BFGS to a
    tenth of the gradient norm reached, then Newton again; where Newton gains a factor of 10,
    Newton again. Stops at tol, when L-BFGS stalls or after `max_iter` L-BFGS iterations.
    Returns {"grad_norm", "lbfgs_iterations", "newton_steps", "cg_iterations"}.
    """
    info = {"lbfgs_iterations": 0, "newton_steps": 0, "cg_iterations": 0}
    opt, closure = lbfgs(objective, params, chunk, history)
    norm = grad_norm(objective, params)
    value = float(objective().detach())
    handover = newton_from
    while norm > tol:
        stalled = False
        while norm > handover and info["lbfgs_iterations"] < max_iter:
            before = int(opt.state[params[0]].get("n_iter", 0))
            opt.step(closure)
            done = int(opt.state[params[0]].get("n_iter", 0)) - before
            info["lbfgs_iterations"] += done
            previous, value = value, float(objective().detach())
            norm = grad_norm(objective, params)
            if done == 0 or value >= previous:  # L-BFGS can no longer make progress
                stalled = True
                break
        before = norm
        with second_order():
            newton = newton_cg(objective, params, tol, newton_steps)
        info["newton_steps"] += newton["steps"]
        info["cg_iterations"] += newton["cg_iterations"]
        norm = newton["grad_norm"]
        if norm < 0.1 * before:  # Newton is getting there: more Newton
            handover = norm
        elif stalled or info["lbfgs_iterations"] >= max_iter:
            break
        else:  # not yet in Newton's basin: more L-BFGS first
            handover = min(handover, norm) / 10
    for p in params:
        p.grad = None
    info["grad_norm"] = norm
    return info


def warn_if_unconverged(gnorm: float, tol: float, what: str, stacklevel: int = 1) -> None:
    """RuntimeWarning "{what} training stopped at gradient norm ..." unless gnorm <= tol.

    `stacklevel` counts from the caller, as if it had called warnings.warn itself.
    """
    if not gnorm <= tol:
        warnings.warn(
            f"{what} training stopped at gradient norm {gnorm:.3g} "
            f"(target {tol:g}); influence estimates may be off",
            RuntimeWarning,
            stacklevel=stacklevel + 1,
        )
