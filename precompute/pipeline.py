"""`msif precompute`: from a task to a run directory of influence scores.

Stages: load and check the task, finetuned predictions, test-side vectors u_t per scenario, one
pretraining-side solve s_t = H_G^{-1} [u_t; 0] for all scenarios and tests together, one
streaming pass over the pretraining set, the embedding map, then the run directory. Every solve
and the pass are checked (precompute.health) before the next stage starts.
"""

from __future__ import annotations

import contextlib
import json
import platform
import time
from contextlib import contextmanager
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from precompute.agreement import solver_agreement
from precompute.config import PrecomputeConfig
from precompute.curvature import SolveConfig
from precompute.health import Solves, check_finite, check_scores
from precompute.influence import Spaces, pretrain_vectors, scenario_vectors, trainable_names
from precompute.objective import ParamSpace, batches
from precompute.resume import Checkpoints, ResumeError, run_key
from precompute.rundir import RunWriter
from precompute.scoring import ShardStore, score_pretraining
from precompute.tables import describe_to, predictions_table, top_table, with_map, write_scores
from precompute.task import (
    MultiStageTask,
    TaskError,
    call,
    check_data,
    check_models,
    check_outputs,
)

__all__ = ["PrecomputeConfig", "StageError", "precompute"]

FULL_SCORES_AUTO_LIMIT = 20_000_000  # rows of scores.parquet written by --full-scores auto


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is available")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r} is unknown: use auto, cpu or cuda")
    return torch.device(name)


class StageError(RuntimeError):
    """A stage of the computation failed; the message names the stage and the cause."""


class Timer:
    """Times named stages; an unexpected error in one is re-raised as a StageError naming it."""

    def __init__(self, log):
        self.times: dict[str, float] = {}
        self.log = log

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        self.log(f"[msif] {name} ...")
        try:
            yield
        except (TaskError, ValueError, FloatingPointError, StageError):
            raise  # already one sentence that names what is wrong
        except Exception as exc:
            raise StageError(f"stage {name} failed: {type(exc).__name__}: {exc}") from exc
        self.times[name] = round(time.perf_counter() - start, 3)
        self.log(f"[msif] {name}: {self.times[name]:.2f} s")


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for package in ("msif", "torch", "numpy", "pandas", "pyarrow", "umap-learn"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            pass
    return out


def load_checked(task: MultiStageTask, scenarios: list[str], device: torch.device):
    """(datasets, pretrained model, finetuned models, shared names), each checked against the
    contract on a first batch, the models on `device` in eval mode."""
    data = check_data(task)
    # every model is fetched before any is moved: a task may build its finetuned models from
    # its own pretrained one, on its own device
    pretrained = call(task, "pretrained_model")
    finetuned = {s: call(task, "finetuned_model", s) for s in scenarios}
    pretrained = pretrained.to(device).eval()
    finetuned = {s: model.to(device).eval() for s, model in finetuned.items()}
    shared = check_models(task, pretrained, finetuned)
    first = next(batches(data["pretrain_data"], 2, device))
    check_outputs(task, "pretrain_loss", pretrained, first, _size(first), "pretrain_data")
    check_outputs(task, "represent", pretrained, first, _size(first), "pretrain_data")
    for model in finetuned.values():
        for name in ("finetune_train_data", "finetune_test_data"):
            batch = next(batches(data[name], 2, device))
            check_outputs(task, "finetune_loss", model, batch, _size(batch), name)
            check_outputs(task, "finetune_logits", model, batch, _size(batch), name)
    for p in _params(pretrained, shared):
        p.requires_grad_(True)
    return data, pretrained, finetuned, shared


def precompute(task: MultiStageTask, out: Path, config: PrecomputeConfig, log=print) -> Path:
    """Compute every score of the task and write the run directory `out`; returns its path.

    Every finished stage is checkpointed in the run's temporary folder (precompute.resume): a
    run interrupted by an error, Ctrl+C or `kill -9` continues with `config.resume`.
    """
    config.check()
    device = resolve_device(config.device)
    scenarios = list(config.scenarios or task.scenarios)
    unknown = [s for s in scenarios if s not in task.scenarios]
    if unknown:
        raise ValueError(f"task {task.name!r} does not provide scenario(s) {unknown}")
    if config.engine == "ray":
        from precompute.ray_engine import preflight

        preflight()
    timer = Timer(log)
    writer = RunWriter(Path(out), overwrite=config.overwrite, resume=config.resume)
    with writer, engine_cluster(config, log) as cluster:
        try:
            return _precompute(task, config, scenarios, device, writer, timer, log, cluster)
        except (KeyboardInterrupt, StageError, ResumeError):
            # kept for --resume; the next run at this path without --resume removes it
            # worth keeping when some stage finished beyond the load (key.json)
            writer.keep = len(list((writer.tmp / "state").glob("*.json"))) > 1
            if writer.keep:
                log(f"[msif] the finished stages are kept in {writer.tmp}: rerun with --resume")
            raise


def engine_cluster(config: PrecomputeConfig, log):
    """The Ray cluster the run's pretraining solve and pass use (`--engine ray`; connected
    once, left when the run ends), or a context giving None for the local engine."""
    if config.engine != "ray":
        return contextlib.nullcontext()
    from precompute.ray_engine import RayCluster

    return RayCluster(log)


def sharded_solve(cluster, device: torch.device):
    """For pretrain_vectors: its passes over the pretraining data on the cluster, or None."""
    if cluster is None:
        return None
    from precompute.ray_engine import RayCurvature

    return lambda objective: RayCurvature(cluster, objective, device.type)


def _precompute(task, config, scenarios, device, writer, timer, log, cluster) -> Path:
    solve_config = SolveConfig(
        config.solver, config.damping, config.cg_tol, config.cg_max_iter, config.curvature,
        config.preconditioner,
    )  # fmt: skip
    with timer.stage("load"):
        data, pretrained, finetuned, shared = load_checked(task, scenarios, device)
        pretrain_data = data["pretrain_data"]
        train_data, test_data = data["finetune_train_data"], data["finetune_test_data"]
        m, q = len(pretrain_data), len(test_data)
        full = config.full_scores == "on" or (
            config.full_scores == "auto" and len(scenarios) * q * m <= FULL_SCORES_AUTO_LIMIT
        )
        state = Checkpoints(writer.tmp)
        resumed = state.bind(run_key(task, config, scenarios, device, data, full, pretrained,
                                     finetuned))  # fmt: skip
        if writer.resume:
            log(f"[msif] {'resuming ' + str(writer.tmp) if resumed else 'nothing to resume'}")
    spaces = Spaces(
        shared=ParamSpace.of(pretrained, shared),
        pretrain_only=ParamSpace.of(
            pretrained,
            trainable_names(
                pretrained, shared, task.pretrain_loss, next(batches(pretrain_data, 2, device))
            ),
        ),
    )
    with timer.stage("describe"):
        for split, count, column in (("pretrain", m, "pretrain_id"), ("test", q, "test_id")):
            if not state.has(f"describe_{split}"):
                describe_to(task, split, count, column, state.path(f"{split}_rows.parquet"))
                state.mark(f"describe_{split}")
        test_rows = pq.read_table(state.path("test_rows.parquet")).to_pandas()
        class_names = getattr(task, "finetune_class_names", None) or {
            int(r.label): r.label_name
            for r in test_rows.itertuples()
            if r.label is not pd.NA and r.label_name is not None
        }
    with timer.stage("predictions"):
        frames = [
            predictions_table(
                task, s, finetuned[s], test_data, config.objective_batch, device, class_names
            )
            for s in scenarios
        ]
        preds = pd.concat(frames, ignore_index=True)
        labels = test_rows["label"].to_numpy(dtype=np.float64, na_value=np.nan)
        preds["correct"] = preds["pred"].to_numpy() == np.tile(labels, len(scenarios))
    solves = Solves(scenarios, q, config.allow_unconverged, log)
    u_rows = []
    for scenario in scenarios:
        stage = f"test_vectors_{scenario}"
        with timer.stage(stage):
            u, info = state.tensor(
                stage,
                lambda scenario=scenario: scenario_vectors(
                    task, scenario, finetuned[scenario], spaces.shared, solve_config,
                    config.objective_batch,
                ),
            )  # fmt: skip
            hessian = f"finetuning Hessian K of the {scenario} scenario"
            solves.add(stage, scenario, hessian, info, [scenario])
            check_finite(stage, "test-side vectors u_t", u, solves.labels([scenario]))
            u_rows.append(u.to(device))
    with timer.stage("pretrain_solve"):
        s_vectors, info = state.tensor(
            "pretrain_solve",
            lambda: pretrain_vectors(
                task,
                pretrained,
                spaces,
                torch.cat(u_rows),
                solve_config,
                config.objective_batch,
                sharded=sharded_solve(cluster, device),
            ),  # fmt: skip
        )
        s_vectors = s_vectors.to(device)
        solves.add("pretrain_solve", "pretrain", "pretraining Hessian H_G", info, scenarios)
        check_finite("pretrain_solve", "s-vectors", s_vectors, solves.labels(scenarios))
    log(f"[msif] full scores: {full_reason(config.full_scores, full, len(scenarios) * q * m)}")
    with timer.stage("pretraining_pass"):
        result = pretraining_pass(
            task, pretrained, pretrain_data, spaces, s_vectors, config, writer, state, full,
            scenarios, log, cluster,
        )  # fmt: skip
    agreement = None
    if config.agreement_tests:
        with timer.stage("solver_agreement"):
            agreement = solver_agreement(
                task,
                pretrained,
                finetuned,
                spaces,
                scenarios,
                solve_config,
                config.agreement_tests,
                config.objective_batch,
            )
            log(f"[msif] scores against well-converged cg: {agreement}")
    with timer.stage("maps"):
        pre_xy, test_xy, map_info = make_map(
            task, config, pretrained, pretrain_data, test_data, device, state
        )
    with timer.stage("write"):
        with_map(writer, "pretrain", state.path("pretrain_rows.parquet"), pre_xy)
        with_map(writer, "test", state.path("test_rows.parquet"), test_xy)
        writer.write_table("predictions", preds)
        writer.write_table("top", top_table(scenarios, q, result.top))
        state.clear()
    manifest = {
        "task": task.name,
        "scenarios": scenarios,
        "solver": solves.info,
        "damping": {k: v.get("damping") for k, v in solves.info.items()},
        "allow_unconverged": config.allow_unconverged,
        "unconverged_tests": solves.unconverged_tests(),
        "proximal_alpha": float(task.proximal_alpha) if "updated" in scenarios else None,
        "pretrain_l2": float(task.pretrain_l2),
        "finetune_l2": float(task.finetune_l2),
        "counts": {"pretrain": m, "finetune_train": len(train_data), "test": q},
        "parameters": {
            "shared": spaces.shared.size,
            "pretrain_only": spaces.pretrain_only.size,
        },
        "top_k": config.top_k,
        "solver_agreement": agreement,
        "full_scores": full,
        "pretraining_pass": {
            "path": result.path,
            "vmap_params": result.vmap_params,
            **result.engine,
        },
        "engine": config.engine,
        "map": map_info,
        "resumed": writer.resumed,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "dtype": str(s_vectors.dtype).removeprefix("torch."),
        "config": asdict(config),
        "timings_s": timer.times,
        "versions": versions(),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return writer.finish(manifest)


def make_map(task, config, pretrained, pretrain_data, test_data, device, state):
    """(pretrain xy, test xy, info) of the embedding map (precompute.maps), or NaN positions
    without maps; checkpointed."""
    m, q = len(pretrain_data), len(test_data)
    if not config.maps:
        return np.full((m, 2), np.nan), np.full((q, 2), np.nan), {"method": "none (--no-maps)"}
    if state.has("maps"):
        saved = torch.load(state.path("maps.pt"), weights_only=True)
        return (
            saved["pretrain"].numpy(),
            saved["test"].numpy(),
            json.loads(state.path("maps.json").read_text()),
        )
    from precompute.maps import embedding_map

    labels = pq.read_table(state.path("pretrain_rows.parquet"), columns=["label"])
    labels = labels.column("label").to_numpy(zero_copy_only=False).astype(np.float64)
    pre_xy, test_xy, info = embedding_map(
        task, pretrained, pretrain_data, test_data, config.objective_batch, device,
        labels=None if np.isnan(labels).all() else labels, layout=config.map_layout,
    )  # fmt: skip
    torch.save(
        {"pretrain": torch.from_numpy(pre_xy), "test": torch.from_numpy(test_xy)},
        state.path("maps.pt"),
    )
    state.mark("maps", info)
    return pre_xy, test_xy, info


def full_reason(setting: str, full: bool, rows: int) -> str:
    """Why scores.parquet is or is not written, for the log."""
    if setting != "auto":
        return f"{setting} (--full-scores {setting})"
    relation = "<=" if full else ">"
    return (
        f"{'on' if full else 'off'} (--full-scores auto: {rows:,} scores {relation} "
        f"{FULL_SCORES_AUTO_LIMIT:,}{'' if full else '; pass --full-scores on to write them'})"
    )


def pretraining_pass(task, pretrained, pretrain_data, spaces, s_vectors, config, writer, state,
                     full, scenarios, log=print, cluster=None):  # fmt: skip
    """The streaming pass (precompute.scoring) in shards, each finished shard checkpointed (its
    top lists; with `full`, its scores in a memory-mapped array), the scores checked (finite,
    not all zero) and, when `full`, written to scores.parquet."""
    m, rows = len(pretrain_data), len(s_vectors)
    store = None
    path = state.path("scores.npy")
    if full:
        mode = "r+" if path.is_file() else "w+"
        store = np.lib.format.open_memmap(path, mode=mode, dtype=np.float32, shape=(rows, m))

    def keep(start, scores):
        store[:, start : start + scores.shape[1]] = scores.float().cpu().numpy()

    shards = ShardStore(state.path("pass"), config.top_k, flush=store.flush if full else None)
    args = (
        pretrained,
        task.pretrain_loss,
        pretrain_data,
        spaces.shared + spaces.pretrain_only,
        s_vectors,
        config.top_k,
        config.pass_batch,
    )
    sizes = dict(shard_size=lambda batch_size: shard_size(m, batch_size), store=shards)
    with tqdm(total=m, desc="pretraining pass", unit="ex", leave=False, disable=None) as bar:
        if cluster is not None:
            from precompute.ray_engine import ray_pass

            result, engine = ray_pass(*args, keep if full else None, bar.update, **sizes,
                                      cluster=cluster)  # fmt: skip
        else:
            result = score_pretraining(*args, keep if full else None, bar.update, **sizes)
            engine = {"engine": "local"}
    result.engine = engine
    check_scores(result.top)
    if full:
        write_scores(writer, store, scenarios, rows // len(scenarios), m)
    return result


def shard_size(m: int, batch_size: int) -> int:
    """Examples per checkpointed shard of the pass: about 1% of the set, whole batches, at
    least 64 batches (a checkpoint costs a flush of the scores written so far)."""
    batches_per_shard = max(64, -(-m // (100 * batch_size)))
    return batches_per_shard * batch_size


def _size(batch) -> int:
    leaves = torch.utils._pytree.tree_leaves(batch)
    return int(leaves[0].shape[0])


def _params(model: torch.nn.Module, names: list[str]):
    params = dict(model.named_parameters())
    return [params[n] for n in names]
