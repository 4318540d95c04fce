"""What both sides of a benchmark share: the workload, a full-size checkpoint with random weights
(speed does not depend on weight values), the test image, and the machine's description."""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..cpu import cache_root, cpu_name, vector_flags

PROMPT = "Describe this image in detail."
NEW_TOKENS = 100
IMAGE_SIDE = 1024
INSTALL_REFERENCE = ("--compare transformers needs transformers, and torchvision for its image processor: "
                     "pip install transformers torchvision")
PRESETS = {"450M": "LFM2-VL-450M", "1.6B": "LFM2-VL-1.6B"}
# Default LFM2-VL image settings (transformers' processor defaults: 64-256 tokens, tiling, thumbnail).
PRESET_PROCESSOR = {"processor_class": "Lfm2VlProcessor", "image_processor": {"image_processor_type": "Lfm2VlImageProcessor"}}


def cache_dir() -> Path:
    return cache_root() / "bench"


def preset_checkpoint(preset: str, seed: int = 0, progress: bool = True) -> Path:
    """A full-size LFM2-VL (450M or 1.6B) with random weights in the Hugging Face layout, built once and
    cached (the bundled model's tokenizer and chat template; LFM2-VL's default image settings)."""
    from ..api import Model
    from ..bundled import bundled_path
    from ..config import model_config
    from ..model.lfm2vl import Lfm2Vl
    from ..processing.processor import Processor

    if preset not in PRESETS:
        raise ValueError(f"--preset {preset!r}: choose from {sorted(PRESETS)}")
    folder = cache_dir() / f"{PRESETS[preset]}-random-seed{seed}"
    weights = (folder / "model.safetensors").exists() or (folder / "model.safetensors.index.json").exists()
    if (folder / "config.json").exists() and weights:  # the 1.6B is saved in shards (an index)
        return folder
    if progress:
        print(f"(building {PRESETS[preset]} with random weights in {folder}; once)", file=sys.stderr, flush=True)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    bundled = bundled_path()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (bundled / name).exists():
            shutil.copyfile(bundled / name, tmp / name)
    (tmp / "processor_config.json").write_text(json.dumps(PRESET_PROCESSOR, indent=2) + "\n")
    processor = Processor.from_pretrained(tmp)
    cfg = model_config(PRESETS[preset])
    cfg = type(cfg)(**{**cfg.__dict__, "image_token_id": processor.image_token_id})
    torch.manual_seed(seed)
    with torch.device("meta"):
        module = Lfm2Vl(cfg)
    module = module.to_empty(device="cpu")
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.02)
    Model(module.eval(), processor, None).save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def workload_image(path: str | None, folder: Path, side: int = IMAGE_SIDE) -> Path:
    """The image both sides read: the user's, or a fixed random side x side PNG."""
    if path is not None:
        return Path(path)
    from PIL import Image

    out = folder / f"bench-{side}.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(out)
    return out


def warm_file_cache(folder: Path, chunk: int = 16 << 20) -> None:
    """Read the checkpoint's weight files once, so that each side loads them from the OS's file cache:
    otherwise the side that runs first also pays the disk (a cold 1.6B took 35 s to load against the
    reference's 2.6 s right after it) and the load times compare nothing."""
    buf = bytearray(chunk)
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def machine(device: str = "cpu") -> dict[str, Any]:
    """CPU model and its vector/matrix flags, cores, torch, and the GPU `device` names (benchmarks compare
    only within one machine)."""
    info: dict[str, Any] = {"torch": torch.__version__, "cores": os.cpu_count(), "platform": platform.platform()}
    info["cpu"] = cpu_name() or platform.processor() or platform.machine()
    if vector_flags():
        info["cpu_flags"] = " ".join(vector_flags())
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def peak_gpu_mb(device: torch.device) -> float | None:
    """The most GPU memory torch's allocator held for tensors in this process, in MB (None off CUDA):
    on a GPU the weights and activations live there, and host RSS says little."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM), in MB."""
    try:
        with open(f"/proc/{os.getpid()}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def conversation(image: str, prompt: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt}]}]


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median total time (its own numbers, so they add up)."""
    return sorted(runs, key=lambda r: r["total_s"])[len(runs) // 2]
