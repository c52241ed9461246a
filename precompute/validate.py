"""`msif validate`: compare scores with leave-one-out retraining of both stages.

For each chosen pretraining example z, the task's fit hooks retrain the pretraining stage
without z (`fit_pretrained(keep)`) and then each scenario's finetuning stage
(`fit_finetuned(model, scenario)`); actual = l_t(retrained without z) - l_t(retrained with all),
predicted = score(z, t). Chosen: the rank-1 helpful and harmful examples of a few tests, plus
random ones.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import stats
from torch.utils.data import Subset

from precompute.objective import batches
from precompute.rundir import RunError, read_manifest, read_table, read_test_scores, to_table
from precompute.task import MultiStageTask, TaskError, call


def choose(top: pd.DataFrame, m: int, q: int, n: int, tests: int, seed: int):
    """(test ids, pretraining ids): rank-1 helpful/harmful of `tests` tests, then random ones."""
    rng = np.random.default_rng(seed)
    test_ids = sorted(rng.choice(q, size=min(tests, q), replace=False).tolist())
    strongest = top[(top["rank"] == 1) & top["test_id"].isin(test_ids)]
    chosen = list(dict.fromkeys(strongest["pretrain_id"].tolist()))[:n]
    others = [i for i in rng.permutation(m).tolist() if i not in chosen]
    return test_ids, chosen + others[: n - len(chosen)]


def test_losses(task: MultiStageTask, model, dataset) -> torch.Tensor:
    """l_t of every test example in dataset, at `model`'s parameters."""
    device = next(model.parameters()).device
    with torch.no_grad():
        return torch.cat(
            [
                call(task, "finetune_loss", model, b).double().cpu()
                for b in batches(dataset, 512, device)
            ]
        )


def validate(
    task: MultiStageTask,
    run_dir: Path,
    n: int = 10,
    tests: int = 3,
    seed: int = 0,
    log=print,
) -> pd.DataFrame:
    """Retrain without each chosen example; write validation.parquet into the run; return it."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    for hook in ("fit_pretrained", "fit_finetuned"):
        if not callable(getattr(task, hook, None)):
            raise TaskError(f"task {task.name!r} has no {hook}() hook, needed to retrain")
    if manifest.get("task") != task.name:
        raise RunError(f"{run_dir} is a run of task {manifest.get('task')!r}, not {task.name!r}")
    scenarios = manifest["scenarios"]
    m, q = manifest["counts"]["pretrain"], manifest["counts"]["test"]
    top = read_table(run_dir, "top")
    test_ids, pretrain_ids = choose(top, m, q, n, tests, seed)
    predicted = {}
    for s in scenarios:
        for t in test_ids:
            scores = read_test_scores(run_dir, s, t)
            if scores is None:  # no full scores: only the top-k pairs are known
                scores = top[(top["scenario"] == s) & (top["test_id"] == t)]
            predicted.update(
                {
                    (s, t, int(z)): float(v)
                    for z, v in zip(scores["pretrain_id"], scores["score"], strict=True)
                }
            )
    test_data = Subset(call(task, "finetune_test_data"), test_ids)
    m_all = torch.ones(m, dtype=torch.bool)
    base_pretrained = call(task, "fit_pretrained", m_all)
    base = {
        s: test_losses(task, call(task, "fit_finetuned", base_pretrained, s), test_data)
        for s in scenarios
    }
    rows = []
    for number, z in enumerate(pretrain_ids, 1):
        keep = m_all.clone()
        keep[z] = False
        pretrained = call(task, "fit_pretrained", keep)
        for s in scenarios:
            losses = test_losses(task, call(task, "fit_finetuned", pretrained, s), test_data)
            for t, actual in zip(test_ids, (losses - base[s]).tolist(), strict=True):
                if (s, t, z) in predicted:
                    rows.append(
                        {
                            "scenario": s,
                            "test_id": t,
                            "pretrain_id": z,
                            "predicted": predicted[(s, t, z)],
                            "actual": actual,
                        }
                    )
        log(f"[msif] retrained without pretraining example #{z} ({number}/{len(pretrain_ids)})")
    frame = pd.DataFrame(
        rows, columns=["scenario", "test_id", "pretrain_id", "predicted", "actual"]
    )
    write_validation(run_dir, frame, manifest)
    return frame


def correlations(frame: pd.DataFrame) -> dict:
    """Pearson and Spearman of predicted vs actual, and the slope of actual on predicted."""
    if len(frame) < 3:
        return {"pairs": len(frame), "pearson": None, "spearman": None, "slope": None}
    p, a = frame["predicted"].to_numpy(), frame["actual"].to_numpy()
    return {
        "pairs": len(frame),
        "pearson": float(stats.pearsonr(p, a)[0]),
        "spearman": float(stats.spearmanr(p, a)[0]),
        "slope": float(p @ a / (p @ p)) if p @ p > 0 else None,
    }


def write_validation(run_dir: Path, frame: pd.DataFrame, manifest: dict) -> None:
    """validation.parquet and the manifest's "validation" entry, each replaced atomically."""
    import pyarrow.parquet as pq

    tmp = run_dir / ".validation.parquet.tmp"
    pq.write_table(to_table("validation", frame), tmp)
    os.replace(tmp, run_dir / "validation.parquet")
    summary = {"overall": correlations(frame)}
    summary.update({s: correlations(g) for s, g in frame.groupby("scenario")})
    manifest = {**manifest, "validation": summary}
    tmp = run_dir / ".manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, default=str))
    os.replace(tmp, run_dir / "manifest.json")
