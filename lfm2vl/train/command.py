"""`lfm2vl train ...`: the argparse front of `lfm2vl.train.run` (wired into the CLI by `add_parser`).

Flags describe a one-stage run; `--recipe recipe.json` (a `TrainConfig` as JSON) describes any
number of stages, and then only --output, --resume, --device and --no-progress may be added.
The same flags work as `python -m lfm2vl.train ...`, which is what torchrun launches:

    torchrun --nproc_per_node 2 -m lfm2vl.train --data train.jsonl --output runs/a --steps 100
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from typing import Any

from .config import Stage, TrainConfig
from .lora import DEFAULT_TARGETS, LoraConfig

_RECIPE_OVERRIDES = ("output", "resume", "device", "no_progress")


def configure(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = p.add_argument_group("model and data")
    g.add_argument("--model", help="checkpoint folder or Hub id to start from (default: the bundled model)")
    g.add_argument("--data", action="append", help="training JSONL file or datasets folder (repeatable)")
    g.add_argument("--text-data", action="append", default=[], help="text-only stream mixed into --data (repeatable)")
    g.add_argument("--text-share", nargs=2, type=float, default=(0.95, 0.30), metavar=("START", "END"),
                   help="share of text-only samples at the first and last step (default 0.95 0.30)")
    g.add_argument("--eval-data", action="append", default=[], help="held-out JSONL / datasets folder (repeatable)")
    g.add_argument("--output", "-o", help="output folder: checkpoints, metrics.jsonl, loss.png, model/")
    g.add_argument("--recipe", help="a TrainConfig JSON file (multi-stage recipes)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=100)
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--vision-lr", type=float, help="learning rate of the vision tower (default: --lr)")
    g.add_argument("--warmup", type=int, default=0, help="warmup steps")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor as a fraction of --lr")
    g.add_argument("--batch-size", type=int, default=4, help="examples per micro-batch per process")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--max-length", type=int, default=2048)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0 = off)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("what trains")
    g.add_argument("--lora", action="store_true", help="train LoRA adapters instead of all weights")
    g.add_argument("--lora-r", type=int, default=8)
    g.add_argument("--lora-alpha", type=float, default=16.0)
    g.add_argument("--lora-dropout", type=float, default=0.0)
    g.add_argument("--lora-targets", default=",".join(DEFAULT_TARGETS),
                   help="comma-separated layer names, optionally scoped (vision_tower.fc1); default: all LM linears")
    g.add_argument("--freeze-vision", action="store_true", help="freeze the vision tower")
    g.add_argument("--freeze-projector", action="store_true", help="freeze the multimodal projector")
    g.add_argument("--freeze-text", action="store_true", help="freeze the language model")
    g.add_argument("--no-merge", action="store_true", help="LoRA: save only the adapter, not the merged model")
    g = p.add_argument_group("run")
    g.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0 = at the end only)")
    g.add_argument("--keep-checkpoints", type=int, default=2)
    g.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output")
    g.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0 = at the end only)")
    g.add_argument("--eval-max-samples", type=int)
    g.add_argument("--device", default="auto")
    g.add_argument("--dtype", default="float32", help="parameter dtype (float32 keeps fp32 master weights)")
    g.add_argument("--autocast", default="auto", choices=("auto", "bf16", "none"))
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--save-dtype", help="dtype of the saved model (default: the source checkpoint's)")
    g.add_argument("--padding-side", default="right", choices=("left", "right"))
    g.add_argument("--log-every", type=int, default=1)
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `train` on an argparse subparsers object; the parser's `func` default is `main`."""
    p = subparsers.add_parser("train", help="fine-tune a model (full or LoRA) on conversations",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    configure(p)
    p.set_defaults(func=main)
    return p


def build_config(args: argparse.Namespace) -> TrainConfig:
    if args.recipe:
        if args.data:
            raise SystemExit("give either --recipe or --data, not both (the recipe names its own data)")
        config = TrainConfig.load(args.recipe)
        changes = {"resume": args.resume or config.resume, "progress": config.progress and not args.no_progress}
        if args.output:
            changes["output_dir"] = args.output
        if args.device != "auto":
            changes["device"] = args.device
        return replace(config, **changes)
    if not args.data or not args.output:
        raise SystemExit("lfm2vl train needs --data and --output (or --recipe)")
    freeze = tuple(name for flag, name in ((args.freeze_vision, "vision_tower"),
                                           (args.freeze_projector, "multi_modal_projector"),
                                           (args.freeze_text, "language_model")) if flag)
    stage = Stage(data=tuple(args.data), steps=args.steps, text_data=tuple(args.text_data),
                  text_share=tuple(args.text_share), lr=args.lr, vision_lr=args.vision_lr,
                  warmup_steps=args.warmup, min_lr_ratio=args.min_lr_ratio, freeze=freeze)
    lora = None
    if args.lora:
        targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
        lora = LoraConfig(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout, targets=targets)
    return TrainConfig(
        output_dir=args.output, stages=(stage,), model=args.model, lora=lora, eval_data=tuple(args.eval_data),
        eval_every=args.eval_every, eval_max_samples=args.eval_max_samples, batch_size=args.batch_size,
        grad_accum=args.grad_accum, max_length=args.max_length, padding_side=args.padding_side,
        weight_decay=args.weight_decay, grad_clip=args.grad_clip, seed=args.seed, save_every=args.save_every,
        keep_checkpoints=args.keep_checkpoints, resume=args.resume, device=args.device, dtype=args.dtype,
        autocast=args.autocast, gradient_checkpointing=args.gradient_checkpointing, save_merged=not args.no_merge,
        save_dtype=args.save_dtype, log_every=args.log_every, progress=not args.no_progress,
    )


def main(args: argparse.Namespace) -> int:
    from .trainer import run  # torch and the model load only when a run starts

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        result = run(build_config(args))
    except (ValueError, FileNotFoundError) as e:  # bad data, recipe, targets, checkpoint: the message says what to fix
        print(f"lfm2vl train: error: {e}", file=sys.stderr)
        return 2
    if result.model_dir is not None or result.adapter_dir is not None:
        loss = "n/a" if result.final_loss is None else f"{result.final_loss:.4f}"
        print(f"trained {result.steps} steps, final loss {loss}")
        for what, path in (("model", result.model_dir), ("adapter", result.adapter_dir), ("metrics", result.metrics)):
            if path is not None:
                print(f"{what}: {path}")
    return 0


def cli(argv: list[str] | None = None) -> int:
    """`python -m lfm2vl.train ...` (and torchrun's `-m lfm2vl.train`)."""
    parser = configure(argparse.ArgumentParser(prog="python -m lfm2vl.train", description=__doc__,
                                               formatter_class=argparse.RawDescriptionHelpFormatter))
    return main(parser.parse_args(argv))
