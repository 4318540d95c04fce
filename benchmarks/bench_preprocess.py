"""Preprocessing speed: lfm2vl's Processor against transformers' Lfm2VlProcessor on one image.

Both start from the same decoded PIL image and produce the same tensors (tested bit for bit in
tests/test_processing_parity.py). Reports the median of N timed runs after warm-up, for the image
path alone and for the whole call (image + prompt expansion + tokenization). Prints a table, then
one JSON line.

    python benchmarks/bench_preprocess.py [--size 1024] [--runs 30] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # reference.py (test-only)


def median_ms(fn, runs: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def make_folder(folder: Path, resample: int) -> None:
    """Tokenizer + transformers' own processor files, as tests/conftest.py saves them."""
    import reference
    from lfm2vl.train.tokenizer import CHAT_TEMPLATE, save_tokenizer_files

    tf = reference.transformers()
    save_tokenizer_files(reference.tokenizer(), folder)
    tok = tf.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), bos_token="<|startoftext|>",
                                     eos_token="<|im_end|>", pad_token="<|pad|>", padding_side="left")
    tf.Lfm2VlProcessor(image_processor=tf.Lfm2VlImageProcessor(resample=resample), tokenizer=tok,
                       chat_template=CHAT_TEMPLATE).save_pretrained(folder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=1024, help="square image side in pixels")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch intra-op thread counts")
    args = ap.parse_args()

    import reference
    from lfm2vl.processing import Processor, load_image, plan_tiles
    from lfm2vl.processing.image import make_crops
    from lfm2vl.processing.patches import crops_to_padded

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (args.size, args.size, 3), dtype=np.uint8))
    rows = []
    for name, resample in (("bilinear", 2), ("bicubic", 3)):
        with tempfile.TemporaryDirectory() as tmp:
            make_folder(Path(tmp), resample)
            ours, ref = Processor.from_pretrained(tmp), reference.load_reference_processor(tmp)
        s = ours.settings

        def ours_image():
            rgb = load_image(image, s.max_image_pixels)
            plan = plan_tiles(rgb.shape[2], rgb.shape[1], s)
            return crops_to_padded(make_crops(rgb, plan, s.resample), s)

        def ref_image():
            return ref.image_processor([image], return_tensors="pt", return_row_col_info=True)

        for threads in args.threads:
            torch.set_num_threads(threads)
            rows.append({
                "resample": name, "threads": threads,
                "image_ours_ms": median_ms(ours_image, args.runs),
                "image_ref_ms": median_ms(ref_image, args.runs),
                "call_ours_ms": median_ms(lambda: ours(text="Describe <image>.", images=[image]), args.runs),
                "call_ref_ms": median_ms(lambda: ref(text="Describe <image>.", images=[image], return_tensors="pt"),
                                         args.runs),
            })

    print(f"{args.size}x{args.size} image, median of {args.runs} runs, {platform.machine()} "
          f"({os.cpu_count()} CPUs), torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}")
    print(f"{'resample':<10}{'threads':>8}  {'part':<12}{'lfm2vl ms':>11}{'reference ms':>14}{'speed-up':>10}")
    for r in rows:
        for part, key in (("image only", "image"), ("full call", "call")):
            o, f = r[f"{key}_ours_ms"], r[f"{key}_ref_ms"]
            print(f"{r['resample']:<10}{r['threads']:>8}  {part:<12}{o:>11.2f}{f:>14.2f}{f / o:>9.2f}x")
    print(json.dumps({"bench": "preprocess", "size": args.size, "runs": args.runs,
                      "results": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}
                                  for r in rows]}))


if __name__ == "__main__":
    main()
