"""`lfm2vl train ...`: the argparse front of `lfm2vl.train.run` (wired into the CLI by `add_parser`).

Flags describe a one-stage run; `--recipe recipe.json` (a `TrainConfig` as JSON) describes any
number of stages, and flags given with it override the recipe (stage flags only for a one-stage
recipe); the effective overrides are printed. `python -m lfm2vl.train ...` takes the same flags
and is what torchrun launches:

    torchrun --nproc_per_node 2 -m lfm2vl.train --data train.jsonl --output runs/a --steps 100
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from .config import Stage, TrainConfig
from .lora import DEFAULT_TARGETS, LoraConfig

DESCRIPTION = ("Fine-tune an LFM2-VL checkpoint (full or LoRA) on JSONL conversations (docs/training.md). "
               "One stage from flags, or a multi-stage --recipe; flags given with a recipe override it.")
# Flag defaults live here, not in argparse (which gets None), so flags given with --recipe are known.
DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(TrainConfig) if f.name not in ("output_dir", "stages")}
DEFAULTS.update({f.name: f.default for f in fields(Stage) if f.name not in ("data", "name", "aux_loss", "steps")})
DEFAULTS["steps"] = 100
DEFAULTS.update(lora_r=LoraConfig.r, lora_alpha=LoraConfig.alpha, lora_dropout=LoraConfig.dropout,
                lora_targets=",".join(DEFAULT_TARGETS))
# flag dest -> Stage field / TrainConfig field
STAGE_FLAGS = {"steps": "steps", "lr": "lr", "vision_lr": "vision_lr", "warmup": "warmup_steps",
               "min_lr_ratio": "min_lr_ratio", "text_data": "text_data", "text_share": "text_share"}
CONFIG_FLAGS = {"model": "model", "eval_data": "eval_data", "eval_every": "eval_every",
                "eval_max_samples": "eval_max_samples", "batch_size": "batch_size", "grad_accum": "grad_accum",
                "max_length": "max_length", "weight_decay": "weight_decay", "grad_clip": "grad_clip", "seed": "seed",
                "save_every": "save_every", "keep_checkpoints": "keep_checkpoints", "resume": "resume",
                "device": "device", "dtype": "dtype", "autocast": "autocast",
                "gradient_checkpointing": "gradient_checkpointing", "save_dtype": "save_dtype",
                "padding_side": "padding_side", "log_every": "log_every", "output": "output_dir"}
LORA_FLAGS = {"lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "lora_targets": "targets"}
FREEZE_FLAGS = {"freeze_vision": "vision_tower", "freeze_projector": "multi_modal_projector",
                "freeze_text": "language_model"}


def configure(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    d = DEFAULTS
    g = p.add_argument_group("model and data")
    g.add_argument("--model", help="checkpoint folder or Hub id to start from (default: the bundled model)")
    g.add_argument("--data", action="append", help="training JSONL file or datasets folder (repeatable)")
    g.add_argument("--text-data", action="append", help="text-only stream mixed into --data (repeatable)")
    g.add_argument("--text-share", nargs=2, type=float, metavar=("START", "END"),
                   help=f"share of text-only samples at the first and last step (default: {d['text_share'][0]} "
                   f"{d['text_share'][1]})")
    g.add_argument("--eval-data", action="append", help="held-out JSONL / datasets folder (repeatable)")
    g.add_argument("--output", "-o", help="output folder: checkpoints, metrics.jsonl, loss.png, model/")
    g.add_argument("--recipe", help="a TrainConfig JSON file (multi-stage recipes; docs/training.md)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, help=f"optimizer steps (default: {d['steps']})")
    g.add_argument("--lr", type=float, help=f"peak learning rate (default: {d['lr']})")
    g.add_argument("--vision-lr", type=float, help="learning rate of the vision tower (default: --lr)")
    g.add_argument("--warmup", type=int, help=f"warmup steps (default: {d['warmup_steps']})")
    g.add_argument("--min-lr-ratio", type=float, help=f"cosine floor as a fraction of --lr (default: {d['min_lr_ratio']})")
    g.add_argument("--batch-size", type=int, help=f"examples per micro-batch per process (default: {d['batch_size']})")
    g.add_argument("--grad-accum", type=int, help=f"micro-batches per optimizer step (default: {d['grad_accum']})")
    g.add_argument("--max-length", type=int, help=f"tokens per example, longer ones are cut (default: {d['max_length']})")
    g.add_argument("--weight-decay", type=float, help=f"(default: {d['weight_decay']})")
    g.add_argument("--grad-clip", type=float, help=f"max gradient norm, 0 = off (default: {d['grad_clip']})")
    g.add_argument("--seed", type=int, help=f"(default: {d['seed']})")
    g = p.add_argument_group("what trains")
    g.add_argument("--lora", action="store_true", default=None, help="train LoRA adapters instead of all weights")
    g.add_argument("--lora-r", type=int, help=f"LoRA rank (default: {d['lora_r']})")
    g.add_argument("--lora-alpha", type=float, help=f"LoRA alpha (default: {d['lora_alpha']})")
    g.add_argument("--lora-dropout", type=float, help=f"(default: {d['lora_dropout']})")
    g.add_argument("--lora-targets", help="comma-separated layer names, optionally scoped (vision_tower.fc1) "
                   "(default: every language-model linear)")
    g.add_argument("--freeze-vision", action="store_true", default=None, help="freeze the vision tower")
    g.add_argument("--freeze-projector", action="store_true", default=None, help="freeze the multimodal projector")
    g.add_argument("--freeze-text", action="store_true", default=None, help="freeze the language model")
    g.add_argument("--no-merge", action="store_true", default=None,
                   help="LoRA: save only the adapter, not the merged model")
    g = p.add_argument_group("run")
    g.add_argument("--save-every", type=int, help="checkpoint every N steps (default: 0 = at the end only)")
    g.add_argument("--keep-checkpoints", type=int, help=f"(default: {d['keep_checkpoints']})")
    g.add_argument("--resume", action="store_true", default=None,
                   help="continue from the latest checkpoint in --output")
    g.add_argument("--eval-every", type=int, help="evaluate every N steps (default: 0 = at the end only)")
    g.add_argument("--eval-max-samples", type=int, help="(default: all)")
    g.add_argument("--device", help="auto, cpu, cuda, cuda:N (default: auto = the GPU if there is one)")
    g.add_argument("--dtype", help=f"parameter dtype; float32 keeps fp32 master weights (default: {d['dtype']})")
    g.add_argument("--autocast", choices=("auto", "bf16", "none"), help=f"(default: {d['autocast']})")
    g.add_argument("--gradient-checkpointing", action="store_true", default=None,
                   help="recompute activations in the backward pass (less memory)")
    g.add_argument("--save-dtype", help="dtype of the saved model (default: the source checkpoint's)")
    g.add_argument("--padding-side", choices=("left", "right"), help=f"(default: {d['padding_side']})")
    g.add_argument("--log-every", type=int, help=f"(default: {d['log_every']})")
    g.add_argument("--no-progress", action="store_true", default=None, help="no progress bar")
    return p


def add_parser(make: Any) -> argparse.ArgumentParser:
    """Register `train` with `make(name, **kw)` (an argparse subparsers' add_parser); `func` is `main`."""
    p = make("train", help="fine-tune a model (full or LoRA) on conversations", description=DESCRIPTION)
    configure(p)
    p.set_defaults(func=main)
    return p


def build_config(args: argparse.Namespace) -> TrainConfig:
    config, _ = build_config_and_overrides(args)
    return config


def build_config_and_overrides(args: argparse.Namespace) -> tuple[TrainConfig, list[str]]:
    """Flags (and the recipe, if any) -> the run's TrainConfig, plus the flags that changed a recipe."""
    given = {k: v for k, v in vars(args).items() if v is not None}
    if "lora_targets" in given:
        given["lora_targets"] = tuple(t.strip() for t in given["lora_targets"].split(",") if t.strip())
    if args.recipe:
        if args.data:
            raise ValueError("give either --recipe or --data, not both (the recipe names its own data)")
        if not Path(args.recipe).is_file():
            raise ValueError(f"--recipe {args.recipe}: no such file")
        config = TrainConfig.load(args.recipe)
    else:
        if not args.data or not args.output:
            raise ValueError("lfm2vl train needs --data FILE and --output DIR (or --recipe FILE); see lfm2vl train "
                             "--help")
        stage = Stage(data=tuple(args.data), **{f: DEFAULTS[f] for f in STAGE_FLAGS.values()})
        config = TrainConfig(output_dir=args.output, stages=(stage,),
                             **{f: DEFAULTS[f] for f in CONFIG_FLAGS.values() if f != "output_dir"})
    overrides: list[str] = []
    stage_changes = {STAGE_FLAGS[k]: tuple(v) if isinstance(v, list) else v for k, v in given.items() if k in STAGE_FLAGS}
    freeze = tuple(FREEZE_FLAGS[k] for k in FREEZE_FLAGS if given.get(k))
    if stage_changes or freeze:
        if len(config.stages) > 1:
            flags = sorted({*(f"--{k.replace('_', '-')}" for k in given if k in STAGE_FLAGS),
                            *(f"--{k.replace('_', '-')}" for k in FREEZE_FLAGS if given.get(k))})
            raise ValueError(f"{', '.join(flags)} would change every stage of this {len(config.stages)}-stage recipe: "
                             "edit the recipe's stages instead")
        stage = config.stages[0]
        if freeze:
            stage_changes["freeze"] = tuple(dict.fromkeys((*stage.freeze, *freeze)))
        config = replace(config, stages=(replace(stage, **stage_changes),))
        overrides += [f"{k}={v}" for k, v in stage_changes.items()]
    config_changes = {CONFIG_FLAGS[k]: tuple(v) if isinstance(v, list) else v for k, v in given.items()
                      if k in CONFIG_FLAGS}
    if given.get("no_progress"):
        config_changes["progress"] = False
    if given.get("no_merge"):
        config_changes["save_merged"] = False
    lora_changes = {LORA_FLAGS[k]: v for k, v in given.items() if k in LORA_FLAGS}
    if given.get("lora") or lora_changes:
        if not given.get("lora") and config.lora is None:
            flags = ", ".join(f"--{k.replace('_', '-')}" for k in given if k in LORA_FLAGS)
            raise ValueError(f"{flags} configure LoRA: add --lora (this run trains all weights)")
        config_changes["lora"] = replace(config.lora or LoraConfig(), **lora_changes)
    config = replace(config, **config_changes)
    if args.recipe:
        overrides += [f"{k}={v}" for k, v in config_changes.items()]
    return config, overrides if args.recipe else []


def check_paths(config: TrainConfig) -> None:
    """What can be checked before the model loads: the device and that every data path exists."""
    from ..api import check_device

    if config.device != "auto":
        check_device(config.device)
    from ..weights import checkpoint_quantization

    if config.model is not None and checkpoint_quantization(config.model) is not None:
        raise ValueError(f"--model {config.model} is an int8 checkpoint (lfm2vl quantize): training needs the "
                         "float checkpoint it came from")
    for stage in config.stages:
        for path in (*stage.data, *stage.text_data):
            if not Path(path).expanduser().exists():
                raise ValueError(f"training data {path}: no such file or folder")
    for path in config.eval_data:
        if not Path(path).expanduser().exists():
            raise ValueError(f"evaluation data {path}: no such file or folder")


def main(args: argparse.Namespace) -> int:
    from .trainer import run  # torch and the model load only when a run starts

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    config, overrides = build_config_and_overrides(args)
    check_paths(config)
    if overrides:
        print(f"recipe {args.recipe}, overridden by flags: {', '.join(overrides)}", file=sys.stderr)
    result = run(config)  # errors (bad data, targets, checkpoint) propagate: the CLI prints them in one line
    if result.model_dir is not None or result.adapter_dir is not None:
        loss = "n/a" if result.final_loss is None else f"{result.final_loss:.4f}"
        print(f"trained {result.steps} steps, final loss {loss}")
        for what, path in (("model", result.model_dir), ("adapter", result.adapter_dir), ("metrics", result.metrics)):
            if path is not None:
                print(f"{what}: {path}")
    return 0


def cli(argv: list[str] | None = None) -> int:
    """`python -m lfm2vl.train ...` (and torchrun's `-m lfm2vl.train`)."""
    parser = configure(argparse.ArgumentParser(prog="python -m lfm2vl.train", description=DESCRIPTION))
    try:
        return main(parser.parse_args(argv))
    except (ValueError, OSError) as e:  # as the lfm2vl CLI does: one line, no traceback
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
