"""Training: fine-tune LFM2-VL (full or LoRA) on conversations, in stages, on one or many processes.

    from lfm2vl.train import Stage, TrainConfig, run
    run(TrainConfig(output_dir="runs/a", model="LiquidAI/LFM2-VL-450M",
                    stages=(Stage(data=("train.jsonl",), steps=200),)))

Names are imported lazily, so `lfm2vl.train.tokenizer` (used to build test and bundled
checkpoints) stays cheap to import. See docs/training.md.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "run": "trainer", "TrainResult": "trainer", "Trainer": "trainer",
    "TrainConfig": "config", "Stage": "config",
    "LoraConfig": "lora", "LoraLinear": "lora", "apply_lora": "lora", "merge_lora": "lora",
    "save_adapter": "lora", "load_adapter": "lora",
    "open_data": "data", "DataError": "data",
    "encode": "batch", "collate": "batch", "assistant_labels": "batch",
    "init_checkpoint": "init",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'lfm2vl.train' has no attribute {name!r}")
