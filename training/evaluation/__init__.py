"""What every evaluation shares: the evaluation split, the local `evaluate` metric
modules (`metrics/`), sliding-window inference, eval_results.json, pictures of predictions.

Imports `modeling`, `training.data`, `training.interop` and `training.engine`; the task protocols live
with their tasks.
"""
