"""`lfm2vl quantize IN OUT`: an int8 or int4 checkpoint that loads small and fast (docs/performance.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def add_parser(make: Any) -> None:
    q = make("quantize", help="write an int8 or int4 copy of a checkpoint (loads small and fast)",
             description="Write a quantized copy of a checkpoint (what --quantize does at load time): int8, every "
             "linear layer and the embedding as int8 with per-channel scales; int4, the language model's layers "
             "and head in 4 bits (groups of 32) and the rest as int8. The tokenizer and processor files are "
             "copied. Only lfm2vl reads the result.")
    q.add_argument("input", help="checkpoint folder or Hub id")
    q.add_argument("output", help="folder to write (created)")
    q.add_argument("--scheme", choices=("int8", "int4"), default="int8", help="(default: %(default)s)")
    q.set_defaults(func=cmd_quantize)


def cmd_quantize(args: argparse.Namespace) -> int:
    from ..api import quantize_checkpoint

    out = Path(args.output)
    if out.exists() and any(out.iterdir()) and not (out / "config.json").exists():
        raise ValueError(f"{out} exists and is not a checkpoint folder: give an empty or new folder")
    dst = quantize_checkpoint(args.input, out, args.scheme)
    size = sum(f.stat().st_size for f in dst.glob("*.safetensors")) / 2**20
    print(f"wrote {dst} ({size:.0f} MB of weights); load it with lfm2vl.load({str(dst)!r}) or --model {dst}",
          file=sys.stderr)
    return 0
