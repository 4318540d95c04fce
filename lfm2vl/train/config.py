"""`TrainConfig` and `Stage`: a whole training recipe as frozen, JSON-round-trippable data.

A run is a list of stages executed in order; each stage has its own data, mixture, steps,
learning rates, frozen parts and optional auxiliary loss, so LFM2-VL's recipe (joint mid-training
with the text share annealed 0.95 -> 0.30, then supervised fine-tuning) is two `Stage`s. Settings
that shape the optimisation itself (batch, precision, LoRA, seed) are per run. The config is saved
in every checkpoint; resuming checks that the recipe did not change under it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from .lora import LoraConfig

FREEZABLE = ("vision_tower", "multi_modal_projector", "language_model")
# Fields that may differ between a checkpoint's config and the resuming run's.
RESUMABLE_CHANGES = frozenset({
    "resume", "progress", "device", "save_every", "keep_checkpoints", "log_every", "output_dir",
    "eval_data", "eval_every", "eval_max_samples",
})


@dataclass(frozen=True)
class Stage:
    data: tuple[str, ...]  # JSONL files / datasets folders: the main (image) stream
    steps: int  # optimizer steps
    name: str = "train"
    text_data: tuple[str, ...] = ()  # a text-only stream; when given, mixed in by `text_share`
    text_share: tuple[float, float] = (0.95, 0.30)  # text-only share at the first and last step
    lr: float = 1e-4  # peak learning rate (language model, projector, LoRA adapters)
    vision_lr: float | None = None  # peak learning rate of the vision tower (None = lr)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    freeze: tuple[str, ...] = ()  # parts that do not train: any of FREEZABLE
    aux_loss: str | None = None  # "package.module:function", see trainer.py

    def __post_init__(self) -> None:
        for name in ("data", "text_data", "freeze", "text_share"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        if not self.data:
            raise ValueError(f"stage {self.name!r} has no data")
        if self.steps < 1:
            raise ValueError(f"stage {self.name!r}: steps must be >= 1, got {self.steps}")
        bad = sorted(set(self.freeze) - set(FREEZABLE))
        if bad:
            raise ValueError(f"stage {self.name!r}: cannot freeze {bad}; choose from {list(FREEZABLE)}")
        if len(self.text_share) != 2 or not all(0.0 <= s <= 1.0 for s in self.text_share):
            raise ValueError(f"stage {self.name!r}: text_share must be two fractions (start, end), got {self.text_share}")
        if not 0.0 <= self.min_lr_ratio <= 1.0 or self.lr <= 0 or self.warmup_steps < 0:
            raise ValueError(f"stage {self.name!r}: need lr > 0, warmup_steps >= 0 and 0 <= min_lr_ratio <= 1")
        if self.aux_loss is not None and ":" not in self.aux_loss:
            raise ValueError(f"stage {self.name!r}: aux_loss must look like 'package.module:function'")


@dataclass(frozen=True)
class TrainConfig:
    output_dir: str
    stages: tuple[Stage, ...]
    model: str | None = None  # checkpoint folder or Hub id; None = the bundled model
    lora: LoraConfig | None = None  # None = full fine-tuning
    eval_data: tuple[str, ...] = ()
    eval_every: int = 0  # steps between evaluations (0 = only at the end of each stage)
    eval_max_samples: int | None = None
    batch_size: int = 4  # examples per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimizer step; global batch = batch_size * grad_accum * processes
    max_length: int = 2048
    padding_side: str = "right"
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0  # max global gradient norm (0 = no clipping)
    seed: int = 0
    save_every: int = 0  # steps between checkpoints (0 = only at the end of each stage)
    keep_checkpoints: int = 2
    resume: bool = False  # continue from the latest checkpoint in output_dir, if any
    device: str = "auto"  # "auto" = the local GPU under torchrun / cuda if present, else cpu
    dtype: str = "float32"  # parameter (master weight) dtype
    autocast: str = "auto"  # "auto" = bf16 where the device supports it, "bf16", or "none"
    gradient_checkpointing: bool = False
    save_merged: bool = True  # LoRA runs: also write the merged full model
    save_dtype: str | None = None  # dtype of the saved model (None = the source checkpoint's)
    log_every: int = 1
    progress: bool = True

    def __post_init__(self) -> None:
        stages = (self.stages,) if isinstance(self.stages, Stage) else tuple(self.stages)
        object.__setattr__(self, "stages", stages)
        for name in ("eval_data", "betas"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        if not stages:
            raise ValueError("a training run needs at least one stage")
        if len({s.name for s in stages}) != len(stages):
            raise ValueError(f"stage names must be unique, got {[s.name for s in stages]}")
        if self.batch_size < 1 or self.grad_accum < 1 or self.max_length < 2:
            raise ValueError("batch_size and grad_accum must be >= 1 and max_length >= 2")
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")
        if self.autocast not in ("auto", "bf16", "none"):
            raise ValueError(f"autocast must be 'auto', 'bf16' or 'none', got {self.autocast!r}")

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    # -- JSON ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {unknown}; valid: {sorted(known)}")
        d = dict(d)
        stage_fields = {f.name for f in fields(Stage)}
        stages = []
        for s in d.get("stages", ()):
            bad = sorted(set(s) - stage_fields)
            if bad:
                raise ValueError(f"unknown Stage field(s) {bad}; valid: {sorted(stage_fields)}")
            stages.append(Stage(**s))
        d["stages"] = tuple(stages)
        if d.get("lora") is not None:
            d["lora"] = LoraConfig(**d["lora"])
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def differences(self, other: TrainConfig) -> list[str]:
        """Fields (other than RESUMABLE_CHANGES) whose values differ."""
        a, b = self.to_dict(), other.to_dict()
        return [k for k in a if k not in RESUMABLE_CHANGES and a[k] != b[k]]
