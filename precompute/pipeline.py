"""`msif precompute`: from a task to a run directory of influence scores.

Stages: load and check the task, finetuned predictions, test-side vectors u_t per scenario, one
pretraining-side solve s_t = H_G^{-1} [u_t; 0] for all scenarios and tests together, one
streaming pass over the pretraining set, the embedding map, then the run directory.
"""

from __future__ import annotations

import io
import platform
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from precompute.agreement import solver_agreement
from precompute.curvature import SOLVERS, SolveConfig
from precompute.influence import Spaces, pretrain_vectors, scenario_vectors, trainable_names
from precompute.objective import ParamSpace, batches
from precompute.rundir import RunWriter, to_table
from precompute.scoring import score_pretraining
from precompute.task import (
    SCENARIOS,
    MultiStageTask,
    TaskError,
    call,
    check_data,
    check_models,
    check_outputs,
)

FULL_SCORES_AUTO_LIMIT = 20_000_000  # rows of scores.parquet written by --full-scores auto
SCORES_ROWS_PER_GROUP = 2**17  # row groups of about this many rows: one test reads one group


@dataclass
class PrecomputeConfig:
    """Settings of one run; written into the manifest."""

    scenarios: tuple[str, ...] | None = None  # None: the task's own
    solver: str = "auto"
    damping: float | str = "auto"
    top_k: int = 20
    full_scores: str = "auto"  # auto | on | off
    device: str = "auto"  # auto | cpu | cuda
    batch_size: int = 256
    cg_tol: float = 1e-6
    cg_max_iter: int = 500
    maps: bool = True
    overwrite: bool = False
    agreement_tests: int = 0  # > 0: compare the solver with well-converged cg on these tests
    extra: dict = field(default_factory=dict)

    def check(self) -> None:
        if self.solver not in SOLVERS:
            raise ValueError(f"--solver {self.solver!r} is unknown: use {', '.join(SOLVERS)}")
        if self.full_scores not in ("auto", "on", "off"):
            raise ValueError(f"--full-scores {self.full_scores!r} is unknown: use auto, on or off")
        if self.damping != "auto" and not float(self.damping) >= 0:
            raise ValueError(f"--damping must be 'auto' or a number >= 0, got {self.damping!r}")
        if self.top_k < 1:
            raise ValueError(f"--top-k must be at least 1, got {self.top_k}")
        for s in self.scenarios or ():
            if s not in SCENARIOS:
                raise ValueError(f"--scenarios has unknown scenario {s!r}: use fixed, updated")


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


def png_bytes(image) -> bytes | None:
    """An HxW or HxWxC uint8 array as PNG bytes (None stays None)."""
    if image is None:
        return None
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def describe_rows(task: MultiStageTask, split: str, count: int, id_column: str) -> pd.DataFrame:
    rows = []
    for i in range(count):
        info = call(task, "describe", split, i)
        if not isinstance(info, dict):
            raise TaskError(f"task {task.name!r}: describe({split!r}, {i}) must return a dict")
        label = info.get("label")
        rows.append(
            {
                id_column: i,
                "label": None if label is None else int(label),
                "label_name": info.get("label_name"),
                "text": info.get("text"),
                "image_png": png_bytes(info.get("image")),
            }
        )
    frame = pd.DataFrame(rows)
    frame["label"] = frame["label"].astype("Int64")
    return frame


def predictions(task, scenario, model, test_data, batch_size, device, class_names) -> pd.DataFrame:
    logits, losses = [], []
    with torch.no_grad():
        for batch in batches(test_data, batch_size, device):
            logits.append(call(task, "finetune_logits", model, batch).float().cpu())
            losses.append(call(task, "finetune_loss", model, batch).float().cpu())
    logits, losses = torch.cat(logits), torch.cat(losses)
    probs = logits.softmax(1)
    confidence, pred = probs.max(1)
    frame = pd.DataFrame(
        {
            "scenario": scenario,
            "test_id": np.arange(len(pred)),
            "pred": pred.numpy().astype(np.int64),
            "pred_name": [class_names.get(int(p), str(int(p))) for p in pred],
            "confidence": confidence.numpy(),
            "loss": losses.numpy(),
        }
    )
    return frame


def top_table(scenarios: list[str], q: int, top) -> pd.DataFrame:
    """Rows of the top-k per (scenario, test): helpful (score > 0) and harmful (score < 0)."""
    frames = []
    for kind, sign in (("helpful", 1.0), ("harmful", -1.0)):
        scores = getattr(top, f"{kind}_scores").float().cpu().numpy()
        ids = getattr(top, f"{kind}_ids").cpu().numpy()
        rows, ranks = np.nonzero(scores * sign > 0)
        frames.append(
            pd.DataFrame(
                {
                    "scenario": [scenarios[r // q] for r in rows],
                    "test_id": rows % q,
                    "kind": kind,
                    "rank": ranks + 1,
                    "pretrain_id": ids[rows, ranks],
                    "score": scores[rows, ranks],
                }
            )
        )
    return pd.concat(frames).sort_values(["scenario", "test_id", "kind", "rank"])


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
    """Compute every score of the task and write the run directory `out`; returns its path."""
    config.check()
    device = resolve_device(config.device)
    scenarios = list(config.scenarios or task.scenarios)
    unknown = [s for s in scenarios if s not in task.scenarios]
    if unknown:
        raise ValueError(f"task {task.name!r} does not provide scenario(s) {unknown}")
    timer = Timer(log)
    solve_config = SolveConfig(config.solver, config.damping, config.cg_tol, config.cg_max_iter)
    out = Path(out)
    with RunWriter(out, overwrite=config.overwrite) as writer:
        with timer.stage("load"):
            data, pretrained, finetuned, shared = load_checked(task, scenarios, device)
            pretrain_data = data["pretrain_data"]
            train_data, test_data = data["finetune_train_data"], data["finetune_test_data"]
            m, q = len(pretrain_data), len(test_data)
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
            pretrain_rows = describe_rows(task, "pretrain", m, "pretrain_id")
            test_rows = describe_rows(task, "test", q, "test_id")
            class_names = getattr(task, "finetune_class_names", None) or {
                int(r.label): r.label_name
                for r in test_rows.itertuples()
                if r.label is not pd.NA and r.label_name is not None
            }
        with timer.stage("predictions"):
            frames = [
                predictions(
                    task, s, finetuned[s], test_data, config.batch_size, device, class_names
                )
                for s in scenarios
            ]
            preds = pd.concat(frames, ignore_index=True)
            labels = test_rows["label"].to_numpy(dtype=np.float64, na_value=np.nan)
            preds["correct"] = preds["pred"].to_numpy() == np.tile(labels, len(scenarios))
        solves = {}
        u_rows = []
        for s in scenarios:
            with timer.stage(f"test_vectors_{s}"):
                u, info = scenario_vectors(
                    task, s, finetuned[s], spaces.shared, solve_config, config.batch_size
                )
                u_rows.append(u)
                solves[s] = info
        with timer.stage("pretrain_solve"):
            s_vectors, solves["pretrain"] = pretrain_vectors(
                task, pretrained, spaces, torch.cat(u_rows), solve_config, config.batch_size
            )
        full = config.full_scores == "on" or (
            config.full_scores == "auto" and len(scenarios) * q * m <= FULL_SCORES_AUTO_LIMIT
        )
        with timer.stage("pretraining_pass"), tempfile.TemporaryDirectory(dir=writer.tmp) as tmp:
            store = (
                np.lib.format.open_memmap(
                    Path(tmp) / "scores.npy", mode="w+", dtype=np.float32, shape=(len(s_vectors), m)
                )
                if full
                else None
            )

            def sink(start, scores):
                store[:, start : start + scores.shape[1]] = scores.float().cpu().numpy()

            with tqdm(
                total=m, desc="pretraining pass", unit="ex", leave=False, disable=None
            ) as bar:
                result = score_pretraining(
                    pretrained,
                    task.pretrain_loss,
                    pretrain_data,
                    spaces.shared + spaces.pretrain_only,
                    s_vectors,
                    config.top_k,
                    config.batch_size,
                    sink if full else None,
                    bar.update,
                )
            if full:
                write_scores(writer, store, scenarios, q, m)
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
                    config.batch_size,
                )
                log(f"[msif] scores against well-converged cg: {agreement}")
        with timer.stage("maps"):
            if config.maps:
                from precompute.maps import embedding_map

                pre_xy, test_xy = embedding_map(
                    task, pretrained, pretrain_data, test_data, config.batch_size, device
                )
            else:
                pre_xy, test_xy = np.full((m, 2), np.nan), np.full((q, 2), np.nan)
        with timer.stage("write"):
            pretrain_rows["umap_x"], pretrain_rows["umap_y"] = pre_xy[:, 0], pre_xy[:, 1]
            test_rows["umap_x"], test_rows["umap_y"] = test_xy[:, 0], test_xy[:, 1]
            writer.write_table("pretrain", pretrain_rows)
            writer.write_table("test", test_rows)
            writer.write_table("predictions", preds)
            writer.write_table("top", top_table(scenarios, q, result.top))
        manifest = {
            "task": task.name,
            "scenarios": scenarios,
            "solver": solves,
            "damping": {k: v.get("damping") for k, v in solves.items()},
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
            "pretraining_pass": {"path": result.path, "vmap_params": result.vmap_params},
            "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
            "dtype": str(s_vectors.dtype).removeprefix("torch."),
            "config": asdict(config),
            "timings_s": timer.times,
            "versions": versions(),
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        return writer.finish(manifest)


def write_scores(writer: RunWriter, store: np.ndarray, scenarios: list[str], q: int, m: int):
    """scores.parquet sorted by (scenario, test_id), a few tests per row group."""
    per_group = max(1, SCORES_ROWS_PER_GROUP // m)
    pretrain_ids = np.arange(m, dtype=np.int64)
    with writer.scores_writer() as parquet:
        for number, scenario in enumerate(scenarios):
            for first in range(0, q, per_group):
                last = min(first + per_group, q)
                block = np.asarray(store[number * q + first : number * q + last])
                frame = pd.DataFrame(
                    {
                        "scenario": scenario,
                        "test_id": np.repeat(np.arange(first, last, dtype=np.int64), m),
                        "pretrain_id": np.tile(pretrain_ids, last - first),
                        "score": block.reshape(-1),
                    }
                )
                parquet.write_table(to_table("scores", frame))


def _size(batch) -> int:
    leaves = torch.utils._pytree.tree_leaves(batch)
    return int(leaves[0].shape[0])


def _params(model: torch.nn.Module, names: list[str]):
    params = dict(model.named_parameters())
    return [params[n] for n in names]
