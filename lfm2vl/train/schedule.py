"""Schedules: warmup + cosine learning rate, and the seeded text/image data mixture.

The mixture follows LFM2-VL's mid-training recipe (announcement: "the ratio of text to image data
is gradually adjusted from 95% to 30%"): each sample slot of a step comes from the text-only
stream with probability `text_share(step)`, annealed linearly between two configurable ends.

Everything here is a pure function of (seed, step) plus two integer stream positions, which is
what makes resuming exact: the draws of step s use their own generator seeded by (seed, stage,
s), and each stream walks a fresh seeded permutation per epoch.
"""

from __future__ import annotations

import math

import numpy as np


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Multiplier of the peak LR at 0-based `step`: linear warmup, then cosine down to `min_ratio`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(total - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def text_share(step: int, total: int, start: float, end: float) -> float:
    """Probability that a sample of `step` is text-only: `start` at step 0, `end` at the last step."""
    if total <= 1:
        return start
    return start + (end - start) * min(step / (total - 1), 1.0)


class Stream:
    """Position k -> example index: a seeded permutation per epoch, so order never depends on history."""

    def __init__(self, size: int, seed: tuple[int, ...], shuffle: bool = True):
        if size < 1:
            raise ValueError("a data stream needs at least one example")
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self._epoch, self._perm = -1, np.arange(size)

    def index(self, position: int) -> int:
        epoch, offset = divmod(position, self.size)
        if not self.shuffle:
            return offset
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = np.random.default_rng([*self.seed, epoch]).permutation(self.size)
        return int(self._perm[offset])


class MixturePlan:
    """Which examples make up each global batch of a stage.

    `batch(step)` must be called once per step, in order (it advances the stream positions);
    `state_after(step)` is the position snapshot a checkpoint of that step stores.
    """

    def __init__(
        self,
        sizes: dict[str, int],
        batch_size: int,
        steps: int,
        seed: int,
        stage: int,
        share: tuple[float, float] | None = None,
    ):
        if share is not None and set(sizes) != {"main", "text"}:
            raise ValueError("a mixture needs exactly a 'main' (image) stream and a 'text' stream")
        self.batch_size, self.steps, self.seed, self.stage, self.share = batch_size, steps, seed, stage, share
        names = sorted(sizes)
        self.streams = {n: Stream(sizes[n], (seed, stage, names.index(n))) for n in names}
        self.positions = {n: 0 for n in names}
        self._snapshots: dict[int, dict[str, int]] = {}

    def draw(self, step: int) -> list[str]:
        """Stream name of each of the step's sample slots."""
        if self.share is None:
            return ["main"] * self.batch_size
        p = text_share(step, self.steps, *self.share)
        u = np.random.default_rng([self.seed, self.stage, step, 7]).random(self.batch_size)
        return ["text" if x < p else "main" for x in u]

    def batch(self, step: int) -> list[tuple[str, int]]:
        """(stream, example index) for every sample of the step's global batch, in slot order."""
        out = []
        for name in self.draw(step):
            out.append((name, self.streams[name].index(self.positions[name])))
            self.positions[name] += 1
        self._snapshots[step] = dict(self.positions)
        for old in [s for s in self._snapshots if s < step - 4]:
            del self._snapshots[old]
        return out

    def state_after(self, step: int) -> dict[str, int]:
        return dict(self._snapshots[step])

    def load_state(self, positions: dict[str, int]) -> None:
        if set(positions) != set(self.positions):
            raise ValueError(f"checkpoint data streams {sorted(positions)} != this stage's {sorted(self.positions)}")
        self.positions = {k: int(v) for k, v in positions.items()}
