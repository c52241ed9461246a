"""Benchmark: the EK-FAC fit on the benchmark MLP (benchmarks/pretraining_pass.py), side by side
in one run: the eigenvalue pass's shortcut for layers called once at one position per example
against squaring materialised per-example rotated gradients [B, out, in] (the empirical
Fisher); with `--fisher ggn`, the exact Gauss-Newton fit's one forward for every column of the
loss Hessian's root (10 classes: 10 columns) against a forward per column, and the root in
closed form (cross-entropy's diag(sqrt p) - p sqrt(p)^T, as a recognised loss brings it) against
K forward-over-reverse products and an eigendecomposition per batch (as task hooks get it).

    python benchmarks/ekfac_fit.py --m 100000
    python benchmarks/ekfac_fit.py --m 20000 --fisher ggn
    python benchmarks/ekfac_fit.py --m 20000 --fisher ggn --classes 2

The closed-form root of cross-entropy has K - 1 columns (the Hessian's rank), the general one
K: with two classes the closed form takes one backward pass per batch where products took two.

Both fits give the same curvature (the solve of the same right-hand sides is printed).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch
from pretraining_pass import loss_fn, model_and_data

from precompute.ekfac import EKFAC, network_outputs
from precompute.gauss_newton import STANDARD_LOSSES, STANDARD_ROOTS
from precompute.layers import layer_calls
from precompute.objective import LossSplit, Objective


def materialised(self, block, calls):
    """The obvious way: every example's rotated gradient, squared and summed."""
    rotated = sum(self._rotated_gradients(block, a, g) for a, g in calls)
    return (rotated**2).sum(0)


def a_forward_per_column(self, item):
    """The GGN fit's obvious way: a forward and a backward for each output weighting."""
    batch, weights_of = item
    for w in weights_of(network_outputs(self.objective.split, self.model, batch), batch):
        yield layer_calls(self.model, self.loss_fn, [batch, w], self.modules)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--fisher", choices=("empirical", "ggn"), default="empirical")
    parser.add_argument("--classes", type=int, default=10, help="the MLP's outputs")
    args = parser.parse_args()
    model, data, space, s = model_and_data(args.m, 32, "cpu", classes=args.classes)
    ce = STANDARD_LOSSES["cross-entropy"]
    split = LossSplit(
        lambda mod, b: mod(b[0]), ce, "benchmark", root=STANDARD_ROOTS["cross-entropy"]
    )
    reg = torch.full((space.size,), 1e-3)
    objective = Objective(model, loss_fn, data, space, reg, 256, split=split)
    if args.fisher == "ggn":
        attribute, methods = "_calls", [("per column", a_forward_per_column, objective)]
        by_products = Objective(
            model, loss_fn, data, space, reg, 256, split=replace(split, root=None)
        )
        methods.append(("root by products", EKFAC._calls, by_products))
        fast = "one forward"
    else:
        attribute, methods = "_squared_rotated", [("materialised", materialised, objective)]
        fast = "shortcut"
    methods.append((fast, getattr(EKFAC, attribute), objective))
    best: dict[str, float] = {}
    for _ in range(args.repeats):
        for name, method, system in methods:
            setattr(EKFAC, attribute, method)
            start = time.perf_counter()
            fitted = EKFAC(system, fisher=args.fisher).fit()
            seconds = time.perf_counter() - start
            best[name] = min(best.get(name, seconds), seconds)
            norm = float(fitted.solve(s, 1e-3).norm())
            print(f"{name:<16} {seconds:8.2f} s   |solve(S)| = {norm:.6g}")
    setattr(EKFAC, attribute, methods[-1][1])
    ratios = "; ".join(
        f"{name} / {fast} = {best[name] / best[fast]:.2f}" for name, *_ in methods[:-1]
    )
    print(f"m={args.m:,} p={space.size:,}: EK-FAC fit ({args.fisher}) "
          f"{args.m / best[fast]:,.0f} examples/s; {ratios}")  # fmt: skip


if __name__ == "__main__":
    main()
