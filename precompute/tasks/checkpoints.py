"""On-disk cache of the built-in tasks' trained models.

Each task keeps its checkpoints in a folder of its own under `cache_root()`: one state_dict file
`<name>.pt` per model and its training record (gradient norm, iterations, seconds) in
`<name>.json` beside it. Files are written atomically (a temporary file in the same folder, then
renamed), so a crash or a concurrent run never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn


def cache_root() -> Path:
    """$MSIF_CACHE if set (and not empty), else ~/.cache/msif."""
    root = os.environ.get("MSIF_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "msif"


def atomic_save(state: dict, path: Path) -> None:
    """torch.save(state) to `path` atomically (mode 0644), creating its folder if needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(text: str, path: Path) -> None:
    """Write `text` to `path` atomically (mode 0644); its folder must exist."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def load_or_train(
    folder: Path,
    name: str,
    train: Callable[[], tuple[nn.Module, dict]],
    new_model: Callable[[], nn.Module],
    states: dict[str, dict[str, torch.Tensor]],
    fit_info: dict[str, dict],
    stacklevel: int = 1,
) -> dict[str, torch.Tensor]:
    """State dict of model `name`: from `states` (memory), else `folder/<name>.pt`, else train.

    A cache file is read with torch.load(weights_only=True) and checked by loading it into
    `new_model()`; a stale or foreign file fails that, draws a UserWarning ("ignoring unreadable
    cache file ...", `stacklevel` counted from the caller) and is retrained and overwritten.
    `train()` returns (model, training record); the record goes to `fit_info[name]` and to
    `folder/<name>.json`. A model loaded from the cache gets its record back from that JSON file,
    marked "cached": True. The state is remembered in `states` under the file's path.
    """
    path = folder / f"{name}.pt"
    key = str(path)
    if key not in states:
        state = None
        if path.is_file():
            try:
                state = torch.load(path, weights_only=True, map_location="cpu")
                new_model().load_state_dict(state)  # fails on a stale or foreign file
            except Exception as exc:  # unreadable cache entry: retrain and overwrite it
                warnings.warn(
                    f"ignoring unreadable cache file {path}: {exc}", stacklevel=stacklevel + 1
                )
                state = None
        if state is not None:
            record = path.with_suffix(".json")
            if record.is_file():
                try:
                    fit_info[name] = {**json.loads(record.read_text()), "cached": True}
                except ValueError:
                    pass
        else:
            model, info = train()
            fit_info[name] = info
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            atomic_save(state, path)
            atomic_write_text(json.dumps(info, indent=1), path.with_suffix(".json"))
        states[key] = state
    return states[key]
