"""Training checkpoints that resume exactly: weights, optimizer, schedule position, data position, RNGs.

Layout: `<output>/checkpoints/step_00000040/` holds `trainer.pt` (trained tensors, optimizer
state, stage, step, data-stream positions), one `rng_rank<R>.pt` per process (Python, NumPy and
torch generators, CUDA too) and `config.json`; `<output>/checkpoints/latest` names the newest.
A checkpoint is written into a `.tmp` folder and renamed into place only when complete, and
`latest` is replaced atomically, so a run killed at any instant (SIGKILL included) leaves the
previous checkpoint intact. Only tensors that can train in some stage are stored: the rest still
equal the base checkpoint the run starts from.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import dist
from .config import TrainConfig

LATEST = "latest"
log = logging.getLogger("lfm2vl.train")


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def save(
    output_dir: str | Path,
    step: int,
    trainer_state: dict[str, Any],
    config: TrainConfig,
    world: dist.World,
    keep: int,
) -> Path:
    """Write checkpoint `step` from every process (rank 0 writes the shared part); returns its folder."""
    root = checkpoint_dir(output_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f"step_{step:08d}.tmp"
    if world.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier(world)
    torch.save(rng_state(), tmp / f"rng_rank{world.rank}.pt")
    if world.is_main:
        torch.save(trainer_state, tmp / "trainer.pt")
        config.save(tmp / "config.json")
    dist.barrier(world)
    if world.is_main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _write_atomic(root / LATEST, final.name)
        _prune(root, keep)
    dist.barrier(world)
    return final


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _prune(root: Path, keep: int) -> None:
    done = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[: max(len(done) - max(keep, 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)


def latest(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder, or None."""
    root = checkpoint_dir(output_dir)
    pointer = root / LATEST
    if pointer.is_file():
        path = root / pointer.read_text().strip()
        if (path / "trainer.pt").is_file():
            return path
    done = sorted(p for p in root.glob("step_*") if (p / "trainer.pt").is_file() and not p.name.endswith(".tmp"))
    return done[-1] if done else None


def load(path: Path, config: TrainConfig, world: dist.World) -> dict[str, Any]:
    """The trainer state of a checkpoint; restores this process's RNGs. Refuses a changed recipe."""
    saved = TrainConfig.load(path / "config.json")
    changed = saved.differences(config)
    if changed:
        raise ValueError(
            f"cannot resume from {path}: the run's config differs in {changed}. Resume with the same recipe, "
            "or start a new output_dir"
        )
    state = torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)
    rng_file = path / f"rng_rank{world.rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    else:
        log.warning("%s has no RNG state for rank %d (another process count): keeping this run's seeding",
                    path, world.rank)
    return state
