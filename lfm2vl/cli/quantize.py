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
    q.add_argument("output", help="folder to write: new, empty, or an earlier lfm2vl quantize output (replaced)")
    q.add_argument("--scheme", choices=("int8", "int4"), default="int8", help="(default: %(default)s)")
    q.set_defaults(func=cmd_quantize)


def cmd_quantize(args: argparse.Namespace) -> int:
    from ..api import quantize_checkpoint
    from ..weights import read_header

    dst = quantize_checkpoint(args.input, Path(args.output), args.scheme)  # refuses a folder it did not write
    files = list(dst.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files) / 2**20
    keys = [k for f in files for k in read_header(f)[0]]
    int4, int8 = sum(k.endswith(".scales_zeros") for k in keys), sum(k.endswith(".scale") for k in keys)
    layers = f"{int4} layers int4, {int8} int8" if args.scheme == "int4" else f"{int8} layers int8"
    print(f"wrote {dst} ({size:.0f} MB of weights; {layers}); load it with lfm2vl.load({str(dst)!r}) or "
          f"--model {dst}", file=sys.stderr)
    if args.scheme == "int4" and int4 == 0:
        print("warning: no layer of this model has a shape the int4 kernel takes (output features a multiple of "
              "64, input features of 32): every layer is int8, as --scheme int8 writes", file=sys.stderr)
    return 0
