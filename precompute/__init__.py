"""msif precompute: multi-stage influence of pretraining examples on finetuned predictions."""

from __future__ import annotations

from typing import TYPE_CHECKING

__all__ = ["MultiStageTask", "TaskError", "load_task"]

if TYPE_CHECKING:
    from precompute.task import MultiStageTask, TaskError, load_task


def __getattr__(name: str):
    # lazy (PEP 562): `import precompute.rundir` (the explorer's reader) does not import torch
    if name in __all__:
        from precompute import task

        return getattr(task, name)
    raise AttributeError(f"module 'precompute' has no attribute {name!r}")
