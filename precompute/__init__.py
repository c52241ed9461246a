"""msif precompute: multi-stage influence of pretraining examples on finetuned predictions."""

from precompute.task import MultiStageTask, TaskError, load_task

__all__ = ["MultiStageTask", "TaskError", "load_task"]
