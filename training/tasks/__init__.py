"""One training run each: pre-training, and fine-tuning (the shared `finetuning` run with
its segmentation and depth tasks, each with its evaluation protocol), plus how a task model starts
(`model_start`).

Imports the packages below it (`evaluation`, `engine`, `interop`, `data`) and
`modeling`; never `experiments`.
"""
