"""Shared helpers for the training tests: a tiny random checkpoint and a small colour-naming dataset.

Each test module declares its own fixtures from these (module scope; building both takes well under
a second), so no fixture has to be imported across modules.

No transformers needed: the checkpoint comes from `lfm2vl.train.weight_init.init_checkpoint` with the same tiny
shapes as tests/reference.py, and images are 64x64 solid colours (4 image tokens each).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import reference
from PIL import Image

from lfm2vl.config import Lfm2VlConfig

REPO = Path(__file__).parent.parent
COLORS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "yellow": (230, 220, 20)}
# Small images, no tiling: a 64x64 image becomes one 4x4-patch crop = 4 image tokens.
IMAGE_SETTINGS = {"min_image_tokens": 4, "max_image_tokens": 16, "do_image_splitting": False, "use_thumbnail": False}


def tiny_config() -> Lfm2VlConfig:
    return Lfm2VlConfig.from_hf({
        "model_type": "lfm2_vl", "text_config": {**reference.TINY_TEXT, "vocab_size": 1024},
        "vision_config": reference.TINY_VISION, "projector_hidden_size": 80, "image_token_id": 396,
    })


def make_tiny_checkpoint(folder: Path, seed: int = 0) -> Path:
    from lfm2vl.train.weight_init import init_checkpoint

    return init_checkpoint(folder, tiny_config(), reference.tokenizer(), IMAGE_SETTINGS, seed=seed)


def write_images(folder: Path) -> None:
    (folder / "imgs").mkdir(parents=True, exist_ok=True)
    for name, rgb in COLORS.items():
        Image.new("RGB", (64, 64), rgb).save(folder / "imgs" / f"{name}.png")


def color_records() -> list[dict]:
    """One image question per colour, plus two text-only conversations."""
    out = [
        {"messages": [
            {"role": "user", "content": [{"type": "image", "image": f"imgs/{c}.png"}, {"type": "text", "text": "What color?"}]},
            {"role": "assistant", "content": f"The color is {c}."},
        ]}
        for c in COLORS
    ]
    out.append({"messages": [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hello! How are you?"}]})
    out.append({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Numbers?"},
                             {"role": "assistant", "content": "0 1 2 3 42"}]})
    return out


def write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def make_color_data(folder: Path) -> Path:
    write_images(folder)
    return write_jsonl(folder / "train.jsonl", color_records())


def make_text_data(folder: Path) -> Path:
    texts = ["The cat sits on a red sofa.", "Two dogs play in the snow.", "Numbers: 0 1 2 3 42 1000."]
    return write_jsonl(folder / "text.jsonl", [{"text": t} for t in texts])


# A training run in a fresh interpreter: `python SCRIPT config.json [kill_after_step]`.
RUN_SCRIPT = """
import json, os, signal, sys
import torch
torch.set_num_threads(1)
from lfm2vl.train import TrainConfig, run
config = TrainConfig.load(sys.argv[1])
kill_at = int(sys.argv[2]) if len(sys.argv) > 2 else None
def on_step(step, record):
    if kill_at is not None and step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no flush: as if the machine died
run(config, on_step=on_step)
"""


def run_script(tmp: Path) -> Path:
    path = tmp / "run_train.py"
    path.write_text(RUN_SCRIPT)
    return path


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return env


def python() -> str:
    return sys.executable


def start(args: list[str], tmp: Path, name: str) -> subprocess.Popen:
    """Start a command in `tmp`, its output going to `tmp/<name>.log` (read back on failure)."""
    with open(tmp / f"{name}.log", "w") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=subprocess_env(), cwd=tmp)
