"""Flags shared by the subcommands, and their checks: everything a user can get wrong in the arguments
is refused here, before any weights are read (docs/generation.md lists the options)."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

SAMPLING_PRESETS = ("recommended", "greedy")


class UsageError(ValueError):
    """A problem in the command line; the message names the flag and what to do."""


def one_line(e: BaseException) -> str:
    """An error's message on one line (the CLI prints every error as one `error:` line)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text.removeprefix("error: ")


def add_model_args(p: argparse.ArgumentParser, model_default: str = "the bundled model") -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help=f"checkpoint folder or Hub id (default: {model_default})")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default: cpu)")
    g.add_argument("--dtype", default=None,
                   help="float32, bfloat16 or float16 (default: as stored, but float32 on the CPU; with --quantize, "
                   "bfloat16 where the CPU or GPU has it natively, float16 on older GPUs, else float32)")
    g.add_argument("--quantize", choices=("int8", "int4"), default=None,
                   help="int8: int8 weights for every linear layer, prompts and images multiplied int8 x int8 "
                   "(long prompts widened to bf16 on AMX CPUs, faster there): less memory, faster prefill and "
                   "decoding; int4: the language model's in 4 bits (faster decoding still), the vision tower's "
                   "in int8 (docs/performance.md)")
    g.add_argument("--adapter", default=None, metavar="DIR",
                   help="a LoRA adapter folder (adapter_config.json, from lfm2vl train --lora) applied at load")


def add_generation_args(p: argparse.ArgumentParser) -> None:
    """Sampling and image-budget flags; each flag's dest is a keyword of `Model.generate`."""
    g = p.add_argument_group("sampling (defaults: the checkpoint's generation_config.json; greedy without one)")
    g.add_argument("--preset", choices=SAMPLING_PRESETS, default=None,
                   help="recommended = the model card's temperature 0.1, min_p 0.15, repetition_penalty 1.05")
    g.add_argument("--max-new-tokens", type=int, default=None,
                   help="at most this many tokens (default: the checkpoint's, else 256)")
    g.add_argument("--min-new-tokens", type=int, default=None, help="no EOS before this many tokens (default: 0)")
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: 0)")
    g.add_argument("--top-k", type=int, default=None, help="0 = off (default: 0)")
    g.add_argument("--top-p", type=float, default=None, help="in (0, 1]; 1 = off (default: 1)")
    g.add_argument("--min-p", type=float, default=None, help="in [0, 1); 0 = off (default: 0)")
    g.add_argument("--repetition-penalty", type=float, default=None, help="1 = off (default: 1)")
    g.add_argument("--seed", type=int, default=None, help="makes sampling reproducible (default: random)")
    g.add_argument("--stop", action="append", default=None, type=str, metavar="TEXT",
                   help="stop string, cut from the output (repeatable)")
    g.add_argument("--stop-token-ids", type=int, nargs="+", default=None, metavar="ID",
                   help="token ids that end the reply, besides EOS")
    g.add_argument("--ignore-eos", action="store_true", default=None, help="keep generating past EOS")
    i = p.add_argument_group("image budget (defaults: the checkpoint's processor settings; docs/processing.md)")
    i.add_argument("--min-image-tokens", type=int, default=None, help="(default: 64)")
    i.add_argument("--max-image-tokens", type=_int_or_auto, default=None, metavar="N|auto",
                   help="also sets the tiling threshold: a smaller budget can tile sooner; auto (with "
                   "--latency-target): the largest budget predicted to meet the target (default: 256)")
    i.add_argument("--latency-target", type=float, default=None, metavar="SECONDS",
                   help="with --max-image-tokens auto: the time to first token to aim for; the first use on a "
                   "device calibrates it (a few seconds, cached) (default: none)")
    i.add_argument("--tiling", dest="do_image_splitting", action=argparse.BooleanOptionalAction, default=None,
                   help="split large images into tiles (default: on)")
    i.add_argument("--min-tiles", type=int, default=None, help="(default: 2)")
    i.add_argument("--max-tiles", type=int, default=None, help="(default: 10)")
    i.add_argument("--thumbnail", dest="use_thumbnail", action=argparse.BooleanOptionalAction, default=None,
                   help="add a downscaled thumbnail after the tiles (default: on)")
    i.add_argument("--tile-size", type=int, default=None, help="tile side in pixels (default: 512)")
    i.add_argument("--resample", choices=("bilinear", "bicubic"), default=None,
                   help="resize filter (default: the checkpoint's, bilinear)")
    i.add_argument("--max-pixels-tolerance", type=float, default=None,
                   help="how far past the tile area an image may be before it is tiled (default: 2.0)")
    actions = [a for group in (g, i) for a in group._group_actions]
    p.set_defaults(_option_dests=tuple(a.dest for a in actions),
                   _option_flags={a.dest: a.option_strings[0] for a in actions})


def _int_or_auto(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: a whole number or auto") from None


def generation_options(args: argparse.Namespace) -> dict[str, Any]:
    """The generation keywords the user set, checked now (unset flags keep the checkpoint's defaults)."""
    from ..budget import check_target
    from ..processing import ImageSettings
    from ..sampling import SamplingParams

    opts = {k: getattr(args, k) for k in args._option_dests if getattr(args, k) is not None}
    for key in ("stop", "stop_token_ids"):
        if key in opts:
            opts[key] = tuple(opts[key])
    image_keys = set(ImageSettings.__dataclass_fields__)
    sampling = {k: v for k, v in opts.items() if k not in image_keys and k not in ("preset", "latency_target")}
    image = {k: v for k, v in opts.items() if k in image_keys and v != "auto"}
    try:
        check_target(opts.get("max_image_tokens"), opts.get("latency_target"))
        SamplingParams(**sampling)
        ImageSettings().with_overrides(**image)
    except ValueError as e:
        raise UsageError(_flags_named(str(e), args._option_flags)) from e
    return opts


def _flags_named(message: str, flags: dict[str, str]) -> str:
    """'max_new_tokens must be >= 1' -> '--max-new-tokens must be >= 1' (what the user typed)."""
    for dest in sorted(flags, key=len, reverse=True):
        message = re.sub(rf"(?<![\w-]){dest}(?!\w)", flags[dest], message)
    return message


def check_model_args(args: argparse.Namespace) -> None:
    from ..api import check_device, parse_dtype
    from ..weights import checkpoint_quantization

    try:
        check_device(args.device)
        parse_dtype(args.dtype)
    except ValueError as e:
        flag = "--device" if "device" in str(e) else "--dtype"
        raise UsageError(f"{flag}: {e}") from e
    if args.model is not None and not Path(args.model).expanduser().exists() and "/" not in args.model:
        raise UsageError(f"--model {args.model}: no such folder, and not a Hub id (they look like org/name)")
    if args.adapter is not None and not (Path(args.adapter).expanduser() / "adapter_config.json").is_file():
        raise UsageError(f"--adapter {args.adapter}: no adapter_config.json there (lfm2vl train --lora --no-merge "
                         "writes adapter folders)")
    stop_ids = getattr(args, "stop_token_ids", None)
    vocab = _vocab_size(args.model) if stop_ids else None
    if vocab is not None and any(not 0 <= t < vocab for t in stop_ids):
        bad = [t for t in stop_ids if not 0 <= t < vocab]
        raise UsageError(f"--stop-token-ids {' '.join(map(str, bad))}: this model's vocabulary has {vocab} tokens "
                         f"(ids 0 to {vocab - 1})")
    stored = checkpoint_quantization(args.model) if args.model is not None else None
    if args.adapter is not None and stored is not None:
        raise UsageError(f"--adapter needs float weights to merge into, and {args.model} is an {stored} checkpoint: "
                         f"give the unquantized --model with --adapter (and --quantize {stored} if wanted)")
    if stored is not None and args.quantize not in (None, stored):
        raise UsageError(f"--quantize {args.quantize}: {args.model} is already an {stored} checkpoint (drop --quantize)")
    if args.quantize == "int4":
        from ..quant import int4_available

        if (why := int4_available()) is not None:
            raise UsageError(f"--quantize int4: {why}")


def _vocab_size(model: str | None) -> int | None:
    """The vocabulary size from a local checkpoint's config.json (None for a Hub id not yet resolved)."""
    import json

    from ..bundled import bundled_path

    folder = bundled_path() if model is None else Path(model).expanduser()
    try:
        config = json.loads((folder / "config.json").read_text())
        return int((config.get("text_config") or config)["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_model(args: argparse.Namespace):
    """lfm2vl.load, then the LoRA adapter if asked (merged into the weights: no inference cost)."""
    import lfm2vl

    if args.adapter is None:
        return lfm2vl.load(args.model, device=args.device, dtype=args.dtype, quantize=args.quantize)
    from ..train.lora import load_adapter, merge_lora

    model = lfm2vl.load(args.model, device=args.device, dtype=args.dtype)
    load_adapter(model.module, Path(args.adapter).expanduser())
    merge_lora(model.module)
    if args.quantize is not None:  # after merging: the adapter is folded into the weights first
        from ..quant import quantize_model

        quantize_model(model.module, args.quantize, model.dtype if args.dtype else None)
    return model


def read_image_file(path: str, flag: str = "--image"):
    """A path the user typed -> (3, H, W) uint8, or a UsageError saying what is wrong with it."""
    from ..processing import ImageError, load_image_file

    try:
        return load_image_file(path)
    except ImageError as e:
        raise UsageError(f"{flag} {path}: {e}") from e


def read_prompt(prompt: str) -> str:
    """--prompt TEXT, or --prompt - for standard input."""
    if prompt != "-":
        return prompt
    if sys.stdin.isatty():
        print("(reading the prompt from standard input; end it with Ctrl-D)", file=sys.stderr)
    text = sys.stdin.read().strip()
    if not text:
        raise UsageError("--prompt -: standard input was empty")
    return text


def positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise UsageError(f"{name} must be >= 1, got {value}")
