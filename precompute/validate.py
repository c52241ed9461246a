"""`msif validate`: compare scores with leave-one-out retraining of both stages.

For each chosen pretraining example z, the task's fit hooks retrain the pretraining stage
without z (`fit_pretrained(keep)`) and then each scenario's finetuning stage
(`fit_finetuned(model, scenario)`); actual = l_t(retrained without z) - l_t(retrained with all),
predicted = score(z, t). Chosen: the rank-1 helpful and harmful examples of a few tests, plus
random ones.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import stats
from torch.utils.data import Subset

from precompute.objective import batches
from precompute.rundir import (
    RunError,
    check_ids,
    manifest_json,
    read_manifest,
    read_table,
    read_test_scores_checked,
    to_table,
)
from precompute.task import MultiStageTask, TaskError, call, has_hook


def choose(top: pd.DataFrame, m: int, q: int, n: int, tests: int, seed: int):
    """(test ids, pretraining ids): rank-1 helpful/harmful of `tests` tests, then random ones."""
    rng = np.random.default_rng(seed)
    test_ids = sorted(rng.choice(q, size=min(tests, q), replace=False).tolist())
    strongest = top[(top["rank"] == 1) & top["test_id"].isin(test_ids)]
    chosen = list(dict.fromkeys(strongest["pretrain_id"].tolist()))[:n]
    others = [i for i in rng.permutation(m).tolist() if i not in chosen]
    return test_ids, chosen + others[: n - len(chosen)]


def check_positions(pretrain_ids: pd.Index, test_ids: pd.Index) -> tuple[int, int]:
    """(m, q) when the run's ids are the positions 0..m-1 and 0..q-1 of the task's data, which
    retraining without an example needs; RunError (one sentence) otherwise."""
    for name, ids in (("pretrain", pretrain_ids), ("test", test_ids)):
        if len(ids) and (ids.min() != 0 or ids.max() != len(ids) - 1):
            raise RunError(
                f"{name}.parquet holds {name}_id {ids.max() if ids.min() == 0 else ids.min()}: "
                f"msif validate needs the ids 0..{len(ids) - 1}, the positions in the task's data"
            )
    return len(pretrain_ids), len(test_ids)


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
        if not has_hook(task, hook):
            raise TaskError(f"task {task.name!r} has no {hook}() hook, needed to retrain")
    if manifest.get("task") != task.name:
        raise RunError(f"{run_dir} is a run of task {manifest.get('task')!r}, not {task.name!r}")
    scenarios = manifest.get("scenarios")
    if not isinstance(scenarios, list) or not all(isinstance(x, str) for x in scenarios):
        raise RunError(f"{run_dir}/manifest.json has no list of scenarios")
    top = read_table(run_dir, "top")
    # validation.parquet is about to be replaced, so an old one's ids do not matter
    known_pretrain, known_test = check_ids(run_dir, {"top": top, "validation": None}, manifest)
    m, q = check_positions(known_pretrain, known_test)
    all_tests = call(task, "finetune_test_data")
    if len(all_tests) != q:
        raise RunError(
            f"{run_dir} holds {q} tests but task {task.name!r} has {len(all_tests)}: "
            "it is not a run of this task's data"
        )
    test_ids, pretrain_ids = choose(top, m, q, n, tests, seed)
    predicted = {}
    for s in scenarios:
        for t in test_ids:
            scores = read_test_scores_checked(run_dir, s, t, known_pretrain)
            if scores is None:  # no full scores: only the top-k pairs are known
                scores = top[(top["scenario"] == s) & (top["test_id"] == t)]
            predicted.update(
                {
                    (s, t, int(z)): float(v)
                    for z, v in zip(scores["pretrain_id"], scores["score"], strict=True)
                }
            )
    test_data = Subset(all_tests, test_ids)
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
    tmp.write_text(manifest_json(manifest))
    os.replace(tmp, run_dir / "manifest.json")
