"""Quality of int8 and int4 weights against fp32 (a benchmark, not a test): teacher-forced next-token
top-1 agreement and KL(fp32 || quantized) on a text corpus, and easy-VQA accuracy, for the bundled
model (the one trained model this workplace has; full-size checkpoints here carry random weights,
whose outputs mean nothing).

    python benchmarks/quant_quality.py [--texts 200] [--limit N] [--schemes int8 int4]

The corpus: docstrings of the standard library (the text the bundled model saw in training), cut
into 64-token windows, each scored twice: from one forward over the window (prompt rows, the kernels
of prefill) and token by token as decode steps (the kernels of generation). Prints a summary, then
one JSON line. LFM2VL_NATIVE=0 measures torch's decode kernels instead of lfm2vl's (lfm2vl/native).
"""

from __future__ import annotations

import argparse
import json

import torch

import lfm2vl
from lfm2vl.eval.harness import evaluate
from lfm2vl.train.bundled_recipe import stdlib_docstrings


def _decode_logits(model, ids: list[int]) -> torch.Tensor:
    """(T, V) logits with every token fed as a decode step (one row through the cache): the kernels of
    generation after the first token, which a whole-sequence forward (prompt rows) never runs."""
    net = model.module
    cache = net.make_cache(1, len(ids) + 1)
    rows = [net.forward(torch.tensor([[t]]), cache=cache.view([0], 1))[0, -1] for t in ids]
    return torch.stack(rows)


def teacher_forced(fp32, quantized, texts: list[str], window: int = 64, decode: bool = False) -> dict[str, float]:
    """Next-token top-1 agreement and KL(fp32 || quantized), the quantized model's logits from one forward
    over each window (prompt rows) or, with `decode`, from one decode step per token."""
    tok = fp32.processor.text_tokenizer
    agree = total = 0
    kl_sum = 0.0
    with torch.inference_mode():
        for text in texts:
            ids = tok.encode(text)[:window]
            if len(ids) < 8:
                continue
            x = torch.tensor([ids])
            a = fp32.module(x).float().log_softmax(-1)[0]  # (T, V)
            b = (_decode_logits(quantized, ids) if decode else quantized.module(x)[0]).float().log_softmax(-1)
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            kl_sum += float((a.exp() * (a - b)).sum(-1).sum())
            total += len(ids)
    return {"tokens": total, "top1_agreement": agree / total, "mean_kl": kl_sum / total}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--texts", type=int, default=200)
    ap.add_argument("--limit", type=int, default=None, help="easy-VQA questions (default: the whole test split)")
    ap.add_argument("--schemes", nargs="+", default=["int8", "int4"], choices=["int8", "int4"])
    args = ap.parse_args()
    fp32 = lfm2vl.load()
    texts = stdlib_docstrings()[: args.texts]
    out = {"model": "bundled", "easyvqa_fp32": _easyvqa(fp32, args.limit)}
    print(f"easy-VQA fp32: {out['easyvqa_fp32']['score']}% of {out['easyvqa_fp32']['n']} questions")
    for scheme in args.schemes:
        q = lfm2vl.load(quantize=scheme)
        t = teacher_forced(fp32, q, texts)
        d = teacher_forced(fp32, q, texts, decode=True)
        vqa = _easyvqa(q, args.limit)
        out[scheme] = {"dtype": str(q.dtype).removeprefix("torch."), "text": t, "text_decode_steps": d, "easyvqa": vqa,
                       "easyvqa_delta_points": round(vqa["score"] - out["easyvqa_fp32"]["score"], 2)}
        print(f"{scheme}: teacher-forced on {t['tokens']} tokens: top-1 agreement {100 * t['top1_agreement']:.2f}%, "
              f"mean KL {t['mean_kl']:.5f} nats; as decode steps {100 * d['top1_agreement']:.2f}%, "
              f"{d['mean_kl']:.5f} nats; easy-VQA {vqa['score']}% "
              f"({out[scheme]['easyvqa_delta_points']:+.2f} points)")
    print(json.dumps(out))


def _easyvqa(model, limit: int | None) -> dict[str, float]:
    s = evaluate(model, "easyvqa", limit=limit, progress=False)
    return {"score": round(s["score"], 2), "n": s["n"]}  # the summary score is in percent


if __name__ == "__main__":
    main()
