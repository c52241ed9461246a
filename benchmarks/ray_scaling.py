"""Benchmark: the pretraining pass on the local engine against `--engine ray` on this machine,
and a scaling estimate to N workers from what one run measures; with `--solve`, also the
pretraining solve's passes (the EK-FAC fit's statistics passes, and one Hessian-vector product
with the Q rows, the cost of a cg/pcg iteration) on both engines.

The same model, data and test-side vectors as benchmarks/pretraining_pass.py (the 51.6k-parameter
MLP, Q = 32), full scores returned to the driver as in a run. The Ray cluster is a local instance
with as many worker processes as CPUs (each one torch thread), or the cluster at RAY_ADDRESS.

    python benchmarks/ray_scaling.py --m 100000,1000000

Scaling model (printed with the measured numbers): each worker scores r examples per second; the
driver fetches and ships b bytes per example in and receives 4 Q bytes per example of scores
out, at its measured rate of d examples per second; so with N workers
    T(N) ~ T_setup + m / min(N r, d),
where T_setup (starting actors, shipping the model and S once) is measured too. Assumptions: the
workers are alike, shards are many more than workers, the network is not slower than what the
driver's own serialisation measures here, and nothing else runs on the machines.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from pretraining_pass import loss_fn, model_and_data

from precompute.ekfac import EKFAC
from precompute.objective import Objective, batches
from precompute.ray_engine import RayCluster, RayCurvature, ray_pass
from precompute.scoring import score_pretraining

SHARD = 16 * 1024


def local_pass(model, data, space, s, batch_size):
    columns = []
    start = time.perf_counter()
    score_pretraining(model, loss_fn, data, space, s, 10, batch_size,
                      sink=lambda first, sc: columns.append(sc.shape[1]))  # fmt: skip
    return time.perf_counter() - start


def ray_run(model, data, space, s, batch_size, cluster):
    got = []
    start = time.perf_counter()
    _, engine = ray_pass(model, loss_fn, data, space, s, 10, batch_size,
                         lambda first, sc: got.append(sc.shape[1]), None,
                         lambda b: SHARD, None, cluster)  # fmt: skip
    return time.perf_counter() - start, engine


def solve_passes(model, data, space, s, batch_size, cluster) -> dict[str, float]:
    """Seconds of the EK-FAC fit and of one curvature product with the rows of s, on the local
    engine and on Ray (RayCurvature: one shard per worker per pass), and the largest relative
    difference between the two engines' results."""
    reg = torch.full((space.size,), 1e-3, dtype=torch.float32)
    objective = Objective(model, loss_fn, data, space, reg, batch_size)
    out = {}
    for engine in ("local", "ray"):
        context = RayCurvature(cluster, objective, "cpu") if engine == "ray" else None
        if context is not None:
            context.__enter__()
        try:
            start = time.perf_counter()
            fitted = EKFAC(objective).fit()
            out[f"{engine} ekfac fit"] = time.perf_counter() - start
            start = time.perf_counter()
            product = objective.hvp(s)
            out[f"{engine} hvp"] = time.perf_counter() - start
        finally:
            if context is not None:
                context.__exit__(None, None, None)
        out[f"{engine} result"] = (fitted.solve(s, 1e-3), product)
    (a, b), (c, d) = out.pop("local result"), out.pop("ray result")
    out["max relative difference"] = max(
        float((a - c).abs().max() / a.abs().max()), float((b - d).abs().max() / b.abs().max())
    )
    return out


def driver_rate(data, batch_size, q) -> tuple[float, float]:
    """(examples per second the driver fetches and serialises, bytes per example in)."""
    import ray

    n = min(len(data), 8 * SHARD)
    start = time.perf_counter()
    shipped = 0
    for first in range(0, n, SHARD):
        part = [b for b in batches(data, batch_size, torch.device("cpu"),
                                   within=range(first, min(first + SHARD, n)))]  # fmt: skip
        ref = ray.put([[t.clone() for t in b] for b in part])
        shipped += sum(t.numel() * t.element_size() for b in part for t in b)
        del ref
    return n / (time.perf_counter() - start), shipped / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", default="100000,1000000")
    parser.add_argument("--q", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--solve", action="store_true", help="also the solve's passes")
    args = parser.parse_args()
    threads = torch.get_num_threads()
    with RayCluster(log=print) as cluster:
        for m in [int(v) for v in args.m.split(",")]:
            model, data, space, s = model_and_data(m, args.q, "cpu")
            torch.set_num_threads(threads)
            local = local_pass(model, data, space, s, args.batch_size)
            seconds, engine = ray_run(model, data, space, s, args.batch_size, cluster)
            small = min(2 * SHARD, m // 2)  # a short run: the setup time
            tiny, _ = ray_run(model, torch.utils.data.Subset(data, range(small)), space, s,
                              args.batch_size, cluster)  # fmt: skip
            d, bytes_in = driver_rate(data, args.batch_size, args.q)
            workers = engine["workers"]
            per_worker = (m - small) / max(seconds - tiny, 1e-9) / workers
            print(f"m={m:,} Q={args.q} p={space.size:,}  (this machine: {os.cpu_count()} CPUs)")
            print(f"  local engine   : {local:8.2f} s  {m / local:12,.0f} examples/s "
                  f"({threads} torch threads)")  # fmt: skip
            print(f"  ray engine     : {seconds:8.2f} s  {m / seconds:12,.0f} examples/s "
                  f"({workers} workers)   ray / local = {seconds / local:.2f}")  # fmt: skip
            setup = max(0.0, tiny - small / (workers * per_worker))
            print(f"  measured: r = {per_worker:,.0f} examples/s per worker, driver d = "
                  f"{d:,.0f} examples/s, {bytes_in:.0f} B in and {4 * args.q} B out per "
                  f"example, setup ~{setup:.1f} s")  # fmt: skip
            for n in (1, 2, 4, 8, 16, 64):
                estimate = m / min(n * per_worker, d)
                bound = "driver-bound" if n * per_worker > d else "worker-bound"
                print(f"  estimate N={n:<3} workers: {estimate:8.2f} s + setup ({bound})")
            if args.solve:
                t = solve_passes(model, data, space, s, args.batch_size, cluster)
                print(f"  EK-FAC fit     : local {t['local ekfac fit']:8.2f} s, ray "
                      f"{t['ray ekfac fit']:8.2f} s   ray / local = "
                      f"{t['ray ekfac fit'] / t['local ekfac fit']:.2f}")  # fmt: skip
                print(f"  one HVP (Q={args.q}): local {t['local hvp']:8.2f} s, ray "
                      f"{t['ray hvp']:8.2f} s   ray / local = "
                      f"{t['ray hvp'] / t['local hvp']:.2f}   (the ray fit includes starting "
                      f"the actors; results differ by at most "
                      f"{t['max relative difference']:.1e} relative)")  # fmt: skip


if __name__ == "__main__":
    main()
