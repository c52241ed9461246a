"""Built-in tasks, each a precompute.MultiStageTask named in precompute.task.BUILTIN_TASKS.

`base.BuiltinTask` holds what they share (checkpoint caching, the fit hooks of msif validate);
`training` the optimisers and `checkpoints` the on-disk cache.
"""
