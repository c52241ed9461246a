"""Benchmark: the EK-FAC fit on the benchmark MLP (benchmarks/pretraining_pass.py), with the
eigenvalue pass's shortcut for layers called once at one position per example against squaring
materialised per-example rotated gradients [B, out, in], side by side in one run.

    python benchmarks/ekfac_fit.py --m 100000

Both fits give the same curvature (the solve of the same right-hand sides is printed).
"""

from __future__ import annotations

import argparse
import time

import torch
from pretraining_pass import loss_fn, model_and_data

from precompute.ekfac import EKFAC
from precompute.objective import Objective


def materialised(self, block, calls):
    """The obvious way: every example's rotated gradient, squared and summed."""
    rotated = sum(self._rotated_gradients(block, a, g) for a, g in calls)
    return (rotated**2).sum(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    model, data, space, s = model_and_data(args.m, 32, "cpu")
    objective = Objective(model, loss_fn, data, space, torch.full((space.size,), 1e-3), 256)
    shortcut = EKFAC._squared_rotated
    best: dict[str, float] = {}
    for _ in range(args.repeats):
        for name, method in (("materialised", materialised), ("shortcut", shortcut)):
            EKFAC._squared_rotated = method
            start = time.perf_counter()
            fitted = EKFAC(objective).fit()
            seconds = time.perf_counter() - start
            best[name] = min(best.get(name, seconds), seconds)
            norm = float(fitted.solve(s, 1e-3).norm())
            print(f"{name:<13} {seconds:8.2f} s   |solve(S)| = {norm:.6g}")
    EKFAC._squared_rotated = shortcut
    ratio = best["materialised"] / best["shortcut"]
    rate = args.m / best["shortcut"]
    print(f"m={args.m:,} p={space.size:,}: EK-FAC fit {rate:,.0f} examples/s; "
          f"materialised / shortcut = {ratio:.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
