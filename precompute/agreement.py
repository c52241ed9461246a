"""How far an approximate solver's scores are from well-converged conjugate gradients.

On the first few test examples, the scores of every pretraining example are computed twice,
with the run's solver and with `cg` at a tight tolerance, and compared: Spearman over all
scores, and the mean overlap of the top-10 helpful and top-10 harmful lists per test.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from scipy import stats
from torch.utils.data import Subset

from precompute.curvature import SolveConfig
from precompute.influence import Spaces, pretrain_vectors, scenario_vectors
from precompute.scoring import score_pretraining
from precompute.task import MultiStageTask


def scores_for(task, pretrained, finetuned, spaces, scenarios, config, tests, batch_size):
    """[len(scenarios) * len(tests), m] scores of the chosen tests with one solver config."""
    u = torch.cat(
        [
            scenario_vectors(task, s, finetuned[s], spaces.shared, config, batch_size, tests)[0]
            for s in scenarios
        ]
    )
    s_vectors, _ = pretrain_vectors(task, pretrained, spaces, u, config, batch_size)
    columns = {}
    score_pretraining(
        pretrained,
        task.pretrain_loss,
        task.pretrain_data(),
        spaces.shared + spaces.pretrain_only,
        s_vectors,
        top_k=1,
        batch_size=batch_size,
        sink=lambda start, scores: columns.__setitem__(start, scores.double().cpu()),
    )
    return torch.cat([columns[k] for k in sorted(columns)], 1).numpy()


def top_overlap(a: np.ndarray, b: np.ndarray, k: int = 10) -> float:
    """Mean over rows of |top-k(a) & top-k(b)| / k, for the helpful (largest) and the harmful
    (smallest) ends."""
    overlaps = []
    for row_a, row_b in zip(a, b, strict=True):
        for sign in (1.0, -1.0):
            top_a = set(np.argsort(-sign * row_a)[:k].tolist())
            top_b = set(np.argsort(-sign * row_b)[:k].tolist())
            overlaps.append(len(top_a & top_b) / k)
    return float(np.mean(overlaps))


def solver_agreement(
    task: MultiStageTask,
    pretrained,
    finetuned: dict,
    spaces: Spaces,
    scenarios: list[str],
    config: SolveConfig,
    tests: int,
    batch_size: int,
    cg_tol: float = 1e-8,
    cg_max_iter: int = 2000,
) -> dict:
    """Spearman and top-10 overlap of `config`'s scores against well-converged cg's."""
    chosen = Subset(task.finetune_test_data(), range(min(tests, len(task.finetune_test_data()))))
    reference = replace(config, solver="cg", cg_tol=cg_tol, cg_max_iter=cg_max_iter)
    args = (task, pretrained, finetuned, spaces, scenarios)
    approx = scores_for(*args, config, chosen, batch_size)
    exact = scores_for(*args, reference, chosen, batch_size)
    return {
        "against": f"cg, tol {cg_tol:g}",
        "tests": len(chosen),
        "spearman": float(stats.spearmanr(approx.reshape(-1), exact.reshape(-1))[0]),
        "top10_overlap": top_overlap(approx, exact),
    }
