"""Evaluation tasks, one module each (the interface: lfm2vl/eval/sample.py). easyvqa is built in; the others
read a benchmark file the user has (docs/evaluation.md says where each comes from)."""

from __future__ import annotations

from importlib import import_module
from types import ModuleType

TASKS = {name: f"lfm2vl.eval.tasks.{name}" for name in (
    "easyvqa", "mmstar", "seedbench", "blink", "mmmu", "realworldqa", "mmlu", "mme", "ocrbench", "infovqa",
    "mathvista", "mmvet", "mmifeval")}


def get_task(name: str) -> ModuleType:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {sorted(TASKS)}")
    return import_module(TASKS[name])
