"""Runs of runs: the end-to-end demo, the study (with its probes and report) and the
benchmark.

May import any package of `training`; nothing in `training` imports it.
"""
