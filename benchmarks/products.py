"""Benchmark: one curvature product (Hessian and Gauss-Newton, Q rows over m examples), side by
side in one run: at several activation budgets (precompute.objective.PRODUCT_BUDGET: vectors x
examples x activations per example), and at the budget in force by the engine's shape
(`Objective.product_shape`: fewer vectors at a time before batches under batch_size examples)
against the earlier rule (as many vectors as budget / p allows, batches of at least batch_size
examples whatever the budget). For the Gauss-Newton matrix, also the product from stored layer
factors (precompute.factors, what solves use where it applies) against forward and reverse
mode at the budget in force, alternating, with the one pass that records the factors.

Models: `scale`, the 32-64-16-10 tanh MLP of benchmarks/scale.py (3,322 parameters); `mlp`, the
51.6k-parameter MLP of benchmarks/pretraining_pass.py; `passages`, the news-shaped embedding
model there; `news`, the built-in task's UPDATED finetuning system itself (102,565 parameters,
its 300 articles of 256 tokens, float64; --m is ignored). The synthetic models are as
initialised: products do not depend on training.

    python benchmarks/products.py --model scale --m 20000 --q 100
    python benchmarks/products.py --model news --q 100 --budgets 22
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


def synthetic_objectives(args) -> dict[str, Objective]:
    if args.model == "scale":
        model, data, space, _ = scale_model(args.m, args.q)
    else:
        model, data, space, _ = model_and_data(args.m, args.q, "cpu", args.model)
    split = LossSplit(lambda mod, b: mod(b[0]), STANDARD_LOSSES["cross-entropy"], "benchmark")
    reg = torch.full((space.size,), 1e-3)
    return {
        curvature: Objective(
            model, loss_fn, data, space, reg, 256, curvature=curvature, split=split
        )
        for curvature in ("hessian", "ggn")
    }


def news_objectives() -> dict[str, Objective]:
    """The news task's UPDATED system, as precompute.influence.scenario_vectors builds it."""
    from precompute.curvature import SolveConfig
    from precompute.influence import curvature_objective, trainable_names
    from precompute.objective import batches
    from precompute.task import load_task

    task = load_task("news")
    model = task.finetuned_model("updated")
    shared = ParamSpace.of(model, task.shared_parameters())
    train = task.finetune_train_data()
    first = next(batches(train, 2, torch.device("cpu")))
    names = trainable_names(model, list(shared.names), task.finetune_loss, first)
    joint = shared + ParamSpace.of(model, names)
    reg = torch.full((joint.size,), 1e-3, dtype=torch.float64)
    return {
        curvature: curvature_objective(
            task, "finetune", model, train, joint, reg, SolveConfig(curvature=curvature), 256
        )
        for curvature in ("hessian", "ggn")
    }


def earlier_shape(objective: Objective, rows: int) -> tuple[int, int]:
    """The shape before `product_shape`: min(256, budget / p) vectors at a time, batches of at
    least batch_size examples, more while the budget allows."""
    vectors = max(1, min(256, objective_module.PRODUCT_BUDGET // objective.size))
    fits = objective_module.PRODUCT_BUDGET // (min(rows, vectors) * objective._activations)
    return min(rows, vectors), max(objective.batch_size, min(objective.n, fits))


def timed(objective: Objective, rows: torch.Tensor) -> float:
    start = time.perf_counter()
    objective.hvp(rows)
    return time.perf_counter() - start


def factors_against_forward_reverse(objective: Objective, rows: torch.Tensor, repeats: int):
    """Best-of-`repeats` seconds of the GGN product from stored factors and by forward and
    reverse mode, the two alternating, and their largest relative difference."""
    from precompute.factors import GGNFactors

    start = time.perf_counter()
    factors, how = GGNFactors.record(objective)
    recorded = time.perf_counter() - start
    if factors is None:
        print(f"  ggn     stored factors: not used here ({how})")
        return
    products = {"stored factors": factors.product, "forward/reverse": objective.data_ggn}
    best = dict.fromkeys(products, float("inf"))
    results = {}
    for _ in range(repeats):
        for key, product in products.items():
            start = time.perf_counter()
            results[key] = product(rows)
            best[key] = min(best[key], time.perf_counter() - start)
    a, b = results["stored factors"], results["forward/reverse"]
    difference = ((a - b).norm() / b.norm()).item()
    print(f"  ggn     stored factors {best['stored factors']:.3f} s "
          f"(recorded in {recorded:.3f} s), forward/reverse {best['forward/reverse']:.3f} s: "
          f"{best['forward/reverse'] / best['stored factors']:.2f} x; relative difference "
          f"{difference:.1e}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("scale", "mlp", "passages", "news"), default="scale")
    parser.add_argument("--m", type=int, default=20_000)
    parser.add_argument("--q", type=int, default=100)
    parser.add_argument("--budgets", default="20,22,24,27", help="log2 of PRODUCT_BUDGET")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    objectives = news_objectives() if args.model == "news" else synthetic_objectives(args)
    first = objectives["hessian"]
    rows = torch.randn(args.q, first.size, dtype=first.theta.dtype)
    print(f"{args.model}: p={first.size:,}, m={first.n:,}, Q={args.q}")
    default_budget = objective_module.PRODUCT_BUDGET
    for curvature, objective in objectives.items():
        objective.hvp(rows[:2])  # warm up, and measure the activations per example
        best: dict[str, float] = {}
        shapes: dict[str, tuple[int, int]] = {}
        engine_shape = objective.product_shape
        for _ in range(args.repeats):
            for power in [int(v) for v in args.budgets.split(",")]:
                objective_module.PRODUCT_BUDGET = 2**power
                key = f"budget 2^{power}"
                shapes[key] = objective.product_shape(len(rows))
                best[key] = min(best.get(key, float("inf")), timed(objective, rows))
            objective_module.PRODUCT_BUDGET = default_budget
            key = f"earlier rule, 2^{default_budget.bit_length() - 1}"
            shapes[key] = earlier_shape(objective, len(rows))
            objective.product_shape = lambda n, objective=objective: earlier_shape(objective, n)
            best[key] = min(best.get(key, float("inf")), timed(objective, rows))
            objective.product_shape = engine_shape
        fastest = min(best.values())
        for key, seconds in best.items():
            vectors, examples = shapes[key]
            print(f"  {curvature:<7} {key:<18} ({vectors:>3} vectors x {examples:>6,} examples): "
                  f"{seconds:7.3f} s, {seconds / fastest:.2f} x the fastest")  # fmt: skip
        if curvature == "ggn":
            factors_against_forward_reverse(objective, rows, args.repeats)


if __name__ == "__main__":
    main()
