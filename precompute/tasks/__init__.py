"""Built-in tasks, each a precompute.MultiStageTask named in precompute.task.BUILTIN_TASKS."""
