"""The run engine every task shares: options and the command line (`config`), run setup
(`setup`), the training loop, guards (preemption, non-finite steps), checkpoints, the optimiser and
schedules, run records (`runlog`, `run_end`, `curves`) and the CLI exit status (`exits`).

Imports `modeling`, `training.data` and `training.interop`; never a task.
"""
