"""A randomly initialised LFM2-VL checkpoint folder: the starting point for training from scratch.

`init_checkpoint` writes everything `lfm2vl.load` reads (config.json, safetensors, generation
config, tokenizer files, chat template, processor_config.json), so a freshly initialised model
trains, saves and loads through exactly the same paths as a downloaded one. Weights follow the
reference's `initializer_range` scheme: normal(0, std) for linear and embedding weights, zero
biases, unit norms.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from torch import nn

from .. import api
from ..config import Lfm2VlConfig
from ..model.lfm2vl import Lfm2Vl
from .tokenizer import CHAT_TEMPLATE, save_tokenizer_files


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """Re-initialise every parameter in place (normal(0, std) weights, zero biases, unit norms)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if "norm" in name:
                p.fill_(1.0 if leaf == "weight" else 0.0)
            elif leaf == "bias":
                p.zero_()
            else:
                p.normal_(0.0, std)


def init_checkpoint(
    folder: str | Path,
    cfg: Lfm2VlConfig,
    tokenizer: Tokenizer,
    image_settings: dict[str, Any] | None = None,
    seed: int = 0,
    std: float = 0.02,
    chat_template: str = CHAT_TEMPLATE,
) -> Path:
    """Write a random LFM2-VL (seeded) with its tokenizer and processor settings; returns the folder."""
    folder = Path(folder)
    if tokenizer.get_vocab_size() > cfg.text.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.get_vocab_size()} entries but vocab_size={cfg.text.vocab_size}")
    if tokenizer.token_to_id("<image>") != cfg.image_token_id:
        raise ValueError(f"the tokenizer's <image> id {tokenizer.token_to_id('<image>')} != image_token_id {cfg.image_token_id}")
    torch.manual_seed(seed)
    module = Lfm2Vl(cfg)
    init_weights(module, std)
    api.Model(module).save_pretrained(folder)
    save_tokenizer_files(tokenizer, folder, chat_template)
    processor = {"processor_class": "Lfm2VlProcessor",
                 "image_processor": {"image_processor_type": "Lfm2VlImageProcessor", **(image_settings or {})}}
    (folder / "processor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    return folder
