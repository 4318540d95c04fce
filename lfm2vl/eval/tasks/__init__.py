"""Evaluation tasks. Each module provides `NAME`, `examples(split, limit)` and `score(prediction, answer)`."""

from importlib import import_module

TASKS = {"easyvqa": "lfm2vl.eval.tasks.easyvqa"}


def get_task(name: str):
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {sorted(TASKS)}")
    return import_module(TASKS[name])
