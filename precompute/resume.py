"""Checkpoints of a run's stages, kept in its temporary folder so `--resume` can continue it.

Every finished stage leaves its result in `TMP/state/`: the described rows (parquet), the
test-side vectors and s-vectors with their solves' infos (torch.save of plain tensors, read back
with weights_only=True; infos as JSON), the finished shards of the pretraining pass (their top
lists, and the full scores in a memory-mapped array) and the map. `key.json` holds what those
results depend on (task, data sizes, settings, a fingerprint of the models); resuming with
anything different is refused with one sentence naming what changed. The state folder is removed
before the run is renamed into place.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from precompute.rundir import manifest_json
from precompute.task import MultiStageTask

STATE = "state"


class ResumeError(ValueError):
    """A partial run cannot be continued with these settings; one sentence."""


def fingerprint(*models: torch.nn.Module) -> str:
    """A short hash of every parameter and buffer of the models (names, shapes, values)."""
    digest = hashlib.sha256()
    for model in models:
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            digest.update(name.encode())
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _flat(key: dict, prefix: str = "") -> dict:
    """Nested dicts as one level of dotted names, so a difference names the one setting."""
    out = {}
    for name, value in key.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = value
    return out


class Checkpoints:
    """The `state/` folder of a run being written."""

    def __init__(self, tmp: Path):
        self.folder = Path(tmp) / STATE
        self.folder.mkdir(exist_ok=True)

    def bind(self, key: dict) -> bool:
        """Tie the state to `key`; True when earlier results for this key are there to reuse.

        A state made under another key is refused (ResumeError naming the fields that differ).
        """
        path = self.folder / "key.json"
        key = _flat(json.loads(manifest_json(key)))  # as it will read back
        if path.is_file():
            old = json.loads(path.read_text())
            changed = sorted(k for k in set(old) | set(key) if old.get(k) != key.get(k))
            if changed:
                shown = "; ".join(f"{k}: {old.get(k)!r} then, {key.get(k)!r} now" for k in changed)
                raise ResumeError(
                    f"the partial run at {self.folder.parent} was made with other settings "
                    f"({shown}); rerun without --resume to start over"
                )
            return True
        self._write(path, manifest_json(key).encode())
        return False

    def has(self, name: str) -> bool:
        """Has stage `name` finished (in this run or the one resumed)?"""
        return (self.folder / f"{name}.json").is_file()

    def tensor(self, name: str, compute: Callable[[], tuple[torch.Tensor, dict]]):
        """(tensor, info) of a stage: loaded when finished before, else computed and saved."""
        if self.has(name):
            info = json.loads((self.folder / f"{name}.json").read_text())
            value = torch.load(self.folder / f"{name}.pt", weights_only=True)
            return value, info
        value, info = compute()
        self._write(self.folder / f"{name}.pt", None, tensor=value.cpu())
        self._write(self.folder / f"{name}.json", manifest_json(info).encode())  # marks it done
        return value, info

    def path(self, name: str) -> Path:
        return self.folder / name

    def mark(self, name: str, info: dict | None = None) -> None:
        """Record that a stage writing its own files under path(...) has finished."""
        self._write(self.folder / f"{name}.json", manifest_json(info or {}).encode())

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    @staticmethod
    def _write(path: Path, data: bytes | None, tensor: torch.Tensor | None = None) -> None:
        partial = path.with_name(path.name + ".partial")
        if tensor is not None:
            torch.save(tensor, partial)
        else:
            partial.write_bytes(data)
        os.replace(partial, path)


def run_key(task, config, scenarios, device, data, full, pretrained, finetuned) -> dict:
    """What the checkpoints of a run depend on: resuming under another key is refused."""
    settings = asdict(config)
    for volatile in ("overwrite", "resume", "allow_unconverged", "agreement_tests", "extra"):
        settings.pop(volatile, None)
    return {
        "task": task.name,
        "task_class": type(task).__qualname__,
        "task_source": source_hash(type(task)),
        "counts": {name: len(dataset) for name, dataset in data.items()},
        "scenarios": scenarios,
        "settings": settings,
        "full_scores": full,
        "device": device.type,
        "models": fingerprint(pretrained, *(finetuned[s] for s in scenarios)),
        "msif": _version(),
    }


def source_hash(cls: type) -> str | None:
    """A short hash of the source of a task class and its bases up to MultiStageTask: an edited
    task does not resume from results of its old code."""
    digest = hashlib.sha256()
    for klass in cls.__mro__:
        if klass is MultiStageTask or klass is object:
            continue
        try:
            digest.update(inspect.getsource(klass).encode())
        except (OSError, TypeError):  # defined interactively: nothing to hash
            return None
    return digest.hexdigest()[:16]


def _version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("msif")
    except PackageNotFoundError:
        return None
