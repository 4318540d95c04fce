"""Schedules: warmup + cosine LR, and the text/image mixture annealed 0.95 -> 0.30."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from lfm2vl.train.config import Stage, TrainConfig
from lfm2vl.train.schedule import MixturePlan, Stream, lr_factor, text_share


def test_lr_warmup_then_cosine():
    total, warmup = 100, 10
    assert [lr_factor(s, total, warmup, 0.1) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert lr_factor(10, total, warmup, 0.1) == pytest.approx(1.0)
    assert lr_factor(55, total, warmup, 0.1) == pytest.approx(0.55)  # halfway down the cosine
    assert lr_factor(100, total, warmup, 0.1) == pytest.approx(0.1)
    values = [lr_factor(s, total, warmup, 0.0) for s in range(warmup, total)]
    assert all(a >= b for a, b in itertools.pairwise(values))
    assert lr_factor(0, 10, 0, 0.0) == 1.0


def test_text_share_is_linear_between_its_ends():
    assert text_share(0, 101, 0.95, 0.30) == 0.95
    assert text_share(100, 101, 0.95, 0.30) == pytest.approx(0.30)
    assert text_share(50, 101, 0.95, 0.30) == pytest.approx(0.625)
    assert text_share(0, 1, 0.95, 0.30) == 0.95


def test_mixture_proportions_follow_the_annealing():
    steps, batch = 200, 64
    plan = MixturePlan({"main": 50, "text": 70}, batch, steps, seed=3, stage=0, share=(0.95, 0.30))
    is_text = np.array([[s == "text" for s, _ in plan.batch(step)] for step in range(steps)])  # (steps, batch)
    first, last = is_text[:20].mean(), is_text[-20:].mean()
    assert abs(first - np.mean([text_share(s, steps, 0.95, 0.30) for s in range(20)])) < 0.03
    assert abs(last - np.mean([text_share(s, steps, 0.95, 0.30) for s in range(steps - 20, steps)])) < 0.03
    assert abs(is_text.mean() - 0.625) < 0.01  # 12,800 draws: the mean of the linear ramp
    # Positions advance by exactly the draws; each stream walks whole permutations.
    assert plan.positions == {"text": int(is_text.sum()), "main": int((~is_text).sum())}
    # Other ends are honoured too.
    flat = MixturePlan({"main": 5, "text": 5}, 1000, 1, seed=0, stage=0, share=(0.2, 0.2))
    assert abs(sum(s == "text" for s, _ in flat.batch(0)) / 1000 - 0.2) < 0.04


def test_mixture_is_seeded_and_resumable():
    def draws(seed: int, steps: int = 30) -> list:
        plan = MixturePlan({"main": 7, "text": 5}, 8, steps, seed=seed, stage=1, share=(0.95, 0.3))
        return [plan.batch(s) for s in range(steps)]

    assert draws(0) == draws(0) and draws(0) != draws(1)
    plan = MixturePlan({"main": 7, "text": 5}, 8, 30, seed=0, stage=1, share=(0.95, 0.3))
    head = [plan.batch(s) for s in range(12)]
    resumed = MixturePlan({"main": 7, "text": 5}, 8, 30, seed=0, stage=1, share=(0.95, 0.3))
    resumed.load_state(plan.state_after(11))
    assert head + [resumed.batch(s) for s in range(12, 30)] == draws(0)


def test_stream_epochs_are_permutations():
    stream = Stream(10, (0, 0, 0))
    epochs = [[stream.index(e * 10 + k) for k in range(10)] for e in range(3)]
    assert all(sorted(ep) == list(range(10)) for ep in epochs)
    assert epochs[0] != epochs[1]
    assert [Stream(10, (0, 0, 0), shuffle=False).index(k) for k in range(12)] == [*range(10), 0, 1]


def test_config_round_trip_and_validation(tmp_path):
    config = TrainConfig(output_dir="out", stages=(
        Stage(data=("a.jsonl",), steps=5, name="mid", text_data=("t.jsonl",), freeze=("vision_tower",)),
        Stage(data="b.jsonl", steps=3, name="sft", lr=2e-5, vision_lr=1e-6),
    ))
    config.save(tmp_path / "c.json")
    assert TrainConfig.load(tmp_path / "c.json") == config
    assert config.total_steps == 8 and config.stages[1].data == ("b.jsonl",)
    with pytest.raises(ValueError, match="cannot freeze"):
        Stage(data=("a",), steps=1, freeze=("vision",))
    with pytest.raises(ValueError, match="unknown TrainConfig field"):
        TrainConfig.from_dict({"output_dir": "x", "stages": [], "learning_rate": 1})
    assert math.isclose(config.stages[0].text_share[1], 0.30)
