"""Benchmark: one curvature product (Hessian and Gauss-Newton, Q rows over m examples) at several
sizes of the product's example batches (precompute.objective.PRODUCT_BUDGET: vectors x examples
x activations per example), side by side in one run, for the budget's choice.

Models: `scale`, the 32-64-16-10 tanh MLP of benchmarks/scale.py (3,322 parameters); `mlp`, the
51.6k-parameter MLP of benchmarks/pretraining_pass.py; `passages`, the news-shaped embedding
model there. Products do not depend on training, so the models are as initialised.

    python benchmarks/products.py --model scale --m 20000 --q 100
"""

from __future__ import annotations

import argparse
import time

import torch
from pretraining_pass import loss_fn, model_and_data
from torch import nn
from torch.utils.data import TensorDataset

import precompute.objective as objective_module
from precompute.gauss_newton import STANDARD_LOSSES
from precompute.objective import LossSplit, Objective, ParamSpace


def scale_model(m: int, q: int):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)
    )  # fmt: skip
    data = TensorDataset(torch.randn(m, 32), torch.randint(0, 10, (m,)))
    space = ParamSpace.of(model, [n for n, _ in model.named_parameters()])
    return model, data, space, torch.randn(q, space.size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("scale", "mlp", "passages"), default="scale")
    parser.add_argument("--m", type=int, default=20_000)
    parser.add_argument("--q", type=int, default=100)
    parser.add_argument("--budgets", default="20,22,24,27", help="log2 of PRODUCT_BUDGET")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if args.model == "scale":
        model, data, space, rows = scale_model(args.m, args.q)
    else:
        model, data, space, rows = model_and_data(args.m, args.q, "cpu", args.model)
    split = LossSplit(lambda mod, b: mod(b[0]), STANDARD_LOSSES["cross-entropy"], "benchmark")
    reg = torch.full((space.size,), 1e-3)
    print(f"{args.model}: p={space.size:,}, m={args.m:,}, Q={args.q}")
    for curvature in ("hessian", "ggn"):
        objective = Objective(
            model, loss_fn, data, space, reg, 256, curvature=curvature, split=split
        )
        objective.hvp(rows[:2])  # warm up
        best: dict[int, float] = {}
        batch: dict[int, int] = {}
        for _ in range(args.repeats):
            for power in [int(v) for v in args.budgets.split(",")]:
                objective_module.PRODUCT_BUDGET = 2**power
                batch[power] = objective.product_batch(len(rows))
                start = time.perf_counter()
                objective.hvp(rows)
                best[power] = min(best.get(power, float("inf")), time.perf_counter() - start)
        fastest = min(best.values())
        for power, seconds in best.items():
            print(f"  {curvature:<7} budget 2^{power} ({batch[power]:>6,} examples a batch): "
                  f"{seconds:7.3f} s, {seconds / fastest:.2f} x the fastest")  # fmt: skip


if __name__ == "__main__":
    main()
