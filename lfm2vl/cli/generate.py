"""`lfm2vl generate`: one prompt (optionally about images) -> the reply, streamed, plain or as JSON."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .options import check_model_args, generation_options, load_model, read_image_file, read_prompt


def user_message(text: str, images: list[Any]) -> dict[str, Any]:
    parts: list[dict[str, Any]] = [{"type": "image", "image": image} for image in images]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def cmd_generate(args: argparse.Namespace) -> int:
    opts = generation_options(args)  # everything the user typed is checked before the weights load
    check_model_args(args)
    images = [read_image_file(path) for path in args.image or []]
    prompt = read_prompt(args.prompt)
    model = load_model(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    messages.append(user_message(prompt, images))
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
        }))
    else:
        print(result.text)
    return 0
