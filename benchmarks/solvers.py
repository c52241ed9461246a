"""Benchmark: pcg on the Gauss-Newton matrix against ekfac and well-converged cg on a briefly
trained two-stage task, whole runs side by side: issue 12's judged check.

benchmarks/scale.py's ScaleTask (32-64-16 tanh encoder, 3,322 pretrained parameters, 2,000
finetuning examples, 50 tests, both scenarios; Adam, 300 steps per model) at --m pretraining
examples. Each run is `msif precompute --no-maps --full-scores on` in its own process:
`--solver ekfac`, then `--solver pcg --curvature ggn`, alternating for --repeats rounds, then
`--solver cg --curvature ggn --cg-tol 1e-8` once, the reference. Per run it prints the solve
stages (test_vectors_fixed + test_vectors_updated + pretrain_solve, from the manifest's
timings) and each system's block steps or iterations; then, per round, pcg's solve stages over
ekfac's (goal: at most 3) and over cg's (goal: at most 1/3), and the Pearson correlation of
pcg's and ekfac's full scores with cg's, per scenario and over all (goal for pcg: >= 0.999).

    python benchmarks/solvers.py --m 20000 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

SOLVE_STAGES = ("test_vectors_fixed", "test_vectors_updated", "pretrain_solve")
CONFIGS = {
    "ekfac": ["--solver", "ekfac"],
    "pcg": ["--solver", "pcg", "--curvature", "ggn"],
    "cg": ["--solver", "cg", "--curvature", "ggn", "--cg-tol", "1e-8"],
}


def run(solver: str, m: int, out: Path) -> dict:
    """One `msif precompute` of ScaleTask in its own process: {seconds, steps, scores}."""
    command = [
        sys.executable, "-m", "precompute.cli", "precompute",
        "--task", f"{Path(__file__).resolve().parent / 'scale.py'}:ScaleTask",
        "--out", str(out), "--no-maps", "--full-scores", "on", *CONFIGS[solver],
    ]  # fmt: skip
    env = {**os.environ, "MSIF_SCALE_M": str(m)}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{solver} failed:\n{done.stderr[-2000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    scores = pd.read_parquet(out / "scores.parquet")
    return {
        "seconds": sum(manifest["timings_s"][stage] for stage in SOLVE_STAGES),
        "stages": {stage: manifest["timings_s"][stage] for stage in SOLVE_STAGES},
        "steps": {k: v.get("iterations") for k, v in manifest["solver"].items()},
        "scores": scores.sort_values(["scenario", "test_id", "pretrain_id"], ignore_index=True),
    }


def pearson(scores: pd.DataFrame, reference: pd.DataFrame) -> dict[str, float]:
    """Pearson of the scores with the reference's, per scenario and over all."""
    out = {}
    for scenario in [*sorted(reference.scenario.unique()), None]:
        a = scores if scenario is None else scores[scores.scenario == scenario]
        b = reference if scenario is None else reference[reference.scenario == scenario]
        out[scenario or "all"] = float(np.corrcoef(a.score, b.score)[0, 1])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, default=20000, help="pretraining examples")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of ekfac then pcg")
    args = parser.parse_args()
    results: dict[str, list[dict]] = {"ekfac": [], "pcg": [], "cg": []}
    with tempfile.TemporaryDirectory() as tmp:
        order = [*(["ekfac", "pcg"] * args.repeats), "cg"]
        for i, solver in enumerate(order):
            result = run(solver, args.m, Path(tmp) / f"run-{i}")
            results[solver].append(result)
            stages = ", ".join(f"{k} {v:.2f}" for k, v in result["stages"].items())
            print(f"{solver:<6} solve stages {result['seconds']:6.2f} s ({stages}); "
                  f"steps {result['steps']}", flush=True)  # fmt: skip
    reference = results["cg"][0]
    print(f"m={args.m:,}; reference: cg --curvature ggn --cg-tol 1e-8, "
          f"{reference['seconds']:.2f} s")  # fmt: skip
    for r, (ekfac, pcg) in enumerate(zip(results["ekfac"], results["pcg"], strict=True)):
        print(f"round {r + 1}: pcg / ekfac {pcg['seconds'] / ekfac['seconds']:.2f}x (goal <= 3), "
              f"pcg / cg {pcg['seconds'] / reference['seconds']:.2f} (goal <= 1/3)")  # fmt: skip
    for solver in ("pcg", "ekfac"):
        agreement = pearson(results[solver][-1]["scores"], reference["scores"])
        print(f"Pearson of {solver} with cg: "
              + ", ".join(f"{k} {v:.10f}" for k, v in agreement.items()))  # fmt: skip


if __name__ == "__main__":
    main()
