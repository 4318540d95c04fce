"""`lfm2vl generate`: one prompt (optionally about images) -> the reply, streamed, plain or as JSON."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .options import check_model_args, generation_options, load_model, read_image_file, read_prompt


def user_message(text: str, images: list[Any]) -> dict[str, Any]:
    parts: list[dict[str, Any]] = [{"type": "image", "image": image} for image in images]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def pick_budget(model: Any, messages: list[dict], opts: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """With --max-image-tokens auto: choose the budget for these messages now, and return the options that
    use exactly it, and the choice (`say_budget` reports it); otherwise the options as they are, and None."""
    if opts.get("max_image_tokens") != "auto":
        return opts, None
    fixed = {k: v for k, v in opts.items() if k in model.processor.settings.__dataclass_fields__}
    fixed.pop("max_image_tokens")
    budget = model.plan_budget(messages, opts["latency_target"], **fixed)
    rest = {k: v for k, v in opts.items() if k not in fixed and k not in ("max_image_tokens", "latency_target")}
    return rest | budget.settings, budget


def say_budget(budget: Any) -> None:
    """What the automatic image budget chose, and whether it is predicted to meet its target (stderr)."""
    verdict = "meets" if budget.meets_target else "is the fastest budget and still misses"
    print(f"image budget: {budget.image_tokens} image tokens ({budget.settings}); predicted time to first "
          f"token {budget.predicted_ttft_s:.2f} s {verdict} the {budget.latency_target_s:g} s target", file=sys.stderr)


def cmd_generate(args: argparse.Namespace) -> int:
    opts = generation_options(args)  # everything the user typed is checked before the weights load
    check_model_args(args)
    images = [read_image_file(path) for path in args.image or []]
    prompt = read_prompt(args.prompt)
    model = load_model(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    messages.append(user_message(prompt, images))
    opts, budget = pick_budget(model, messages, opts)  # pick it now, say what was picked, then use exactly that
    if budget is not None:
        say_budget(budget)
    if args.stream:
        for piece in model.stream(messages, **opts):
            print(piece, end="", flush=True)
        print()
        return 0
    result = model.complete(messages, **opts)[0]
    if args.json:
        print(json.dumps({
            "text": result.text, "finish_reason": result.finish_reason, "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens, "cached_tokens": result.cached_tokens,
            "ttft_s": round(result.ttft_s, 4), "total_s": round(result.total_s, 4),
            "tokens_per_s": round(result.generation_tps, 2),
        } | ({"image_budget": budget.settings, "predicted_ttft_s": round(budget.predicted_ttft_s, 4)}
             if budget is not None else {})))
    else:
        print(result.text)
    return 0
