"""`lfm2vl` command line: generate (one question), chat (an interactive session), eval (a task score),
train (fine-tuning; lfm2vl/train/command.py), serve (the HTTP server; lfm2vl/server/command.py).

Thin wrappers over `lfm2vl.load()` and `Model.generate` / `Model.stream`; every option maps to
one documented keyword. Without --model the bundled model is used.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from .engine import EngineError

SAMPLING_PRESETS = ("recommended", "greedy")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint folder or Hub id (default: the bundled model)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: as stored; fp32 on CPU)")


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    """Sampling and image-budget flags; each flag's dest is the keyword of `Model.generate`."""
    g = p.add_argument_group("sampling (defaults: the checkpoint's generation_config.json, i.e. greedy)")
    g.add_argument("--preset", choices=SAMPLING_PRESETS, default=None,
                   help="recommended = the model card's temperature 0.1, min_p 0.15, repetition_penalty 1.05")
    g.add_argument("--max-new-tokens", type=int, default=None,
                   help="default: the checkpoint's generation_config.json, else 256")
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--min-p", type=float, default=None)
    g.add_argument("--repetition-penalty", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, type=str,
                   help="stop string (repeatable); cut from the output")
    i = p.add_argument_group("image budget (defaults: the checkpoint's processor settings)")
    i.add_argument("--min-image-tokens", type=int, default=None)
    i.add_argument("--max-image-tokens", type=int, default=None,
                   help="also sets the tiling threshold: a smaller budget can tile sooner (docs/processing.md)")
    i.add_argument("--tiling", dest="do_image_splitting", action=argparse.BooleanOptionalAction, default=None,
                   help="split large images into 512x512 tiles")
    i.add_argument("--min-tiles", type=int, default=None)
    i.add_argument("--max-tiles", type=int, default=None)
    i.add_argument("--thumbnail", dest="use_thumbnail", action=argparse.BooleanOptionalAction, default=None,
                   help="add a downscaled thumbnail after the tiles")
    p.set_defaults(_option_dests=tuple(a.dest for group in (g, i) for a in group._group_actions))


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """The generation keywords the user set (unset flags leave the checkpoint's defaults in force)."""
    opts = {k: getattr(args, k) for k in args._option_dests if getattr(args, k) is not None}
    if "stop" in opts:
        opts["stop"] = tuple(opts["stop"])
    return opts


def _load(args: argparse.Namespace):
    import lfm2vl

    return lfm2vl.load(args.model, device=args.device, dtype=args.dtype)


def _user_message(text: str, images: list[str]) -> dict[str, Any]:
    parts: list[dict[str, Any]] = [{"type": "image", "image": path} for path in images]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def cmd_generate(args: argparse.Namespace) -> int:
    model = _load(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    messages.append(_user_message(args.prompt, args.image or []))
    opts = _options(args)
    if args.stream:
        for piece in model.stream(messages, **opts):
            print(piece, end="", flush=True)
        print()
        return 0
    result = model.complete(messages, **opts)[0]
    if args.json:
        print(json.dumps({"text": result.text, "finish_reason": result.finish_reason,
                          "prompt_tokens": result.prompt_tokens, "completion_tokens": len(result.token_ids)}))
    else:
        print(result.text)
    return 0


CHAT_HELP = "commands: /image PATH (attach to your next message), /reset, /quit"


def cmd_chat(args: argparse.Namespace) -> int:
    model = _load(args)
    opts = _options(args)
    tty = sys.stdin.isatty()
    history: list[dict[str, Any]] = [{"role": "system", "content": args.system}] if args.system else []
    pending: list[str] = []
    print(f"lfm2vl chat ({model.source}); {CHAT_HELP}", file=sys.stderr)
    while True:
        if tty:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            return 0
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.startswith("/"):
            cmd, _, rest = line.partition(" ")
            if cmd in ("/quit", "/exit"):
                return 0
            if cmd == "/reset":
                history, pending = history[:1] if args.system else [], []
                print("(conversation cleared)")
            elif cmd == "/image":
                path = os.path.expanduser(rest.strip())
                if not os.path.isfile(path):
                    print(f"error: no image file at {path!r}", file=sys.stderr)
                else:
                    pending.append(path)
                    print(f"(image attached: {path})")
            else:
                print(f"unknown command {cmd}; {CHAT_HELP}", file=sys.stderr)
            continue
        message = _user_message(line, pending)
        try:
            reply = ""
            for piece in model.stream([*history, message], **opts):
                reply += piece
                print(piece, end="", flush=True)
            print()
        except (ValueError, OSError, EngineError) as e:  # a bad image or an over-long conversation: keep the session
            print(f"\nerror: {e}", file=sys.stderr)
            continue
        history += [message, {"role": "assistant", "content": reply}]
        pending = []


def cmd_eval(args: argparse.Namespace) -> int:
    from .eval.harness import evaluate

    model = _load(args)
    summary = evaluate(model, args.task, split=args.split, limit=args.limit, batch_size=args.batch_size,
                       max_new_tokens=args.max_new_tokens, predictions=args.predictions)
    print(json.dumps(summary))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lfm2vl", description="LFM2-VL vision-language models")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="answer one prompt, optionally about images")
    _add_model_args(g)
    g.add_argument("--image", action="append", help="image path (repeatable; in order, before the prompt)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--system", default=None, help="optional system prompt")
    g.add_argument("--stream", action="store_true", help="print the reply as it is generated")
    g.add_argument("--json", action="store_true", help="print one JSON object with text and token counts")
    _add_generation_args(g)
    g.set_defaults(func=cmd_generate)
    c = sub.add_parser("chat", help="interactive chat; /image PATH attaches an image")
    _add_model_args(c)
    c.add_argument("--system", default=None)
    _add_generation_args(c)
    c.set_defaults(func=cmd_chat)
    e = sub.add_parser("eval", help="score a model on an evaluation task (last stdout line: one JSON object)")
    _add_model_args(e)
    e.add_argument("--task", required=True, help="easyvqa")
    e.add_argument("--split", default="test")
    e.add_argument("--limit", type=int, default=None, help="first N examples only")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--max-new-tokens", type=int, default=8)
    e.add_argument("--predictions", default=None, help="write per-sample predictions to this JSONL file")
    e.set_defaults(func=cmd_eval)
    from .server.command import add_parser as add_serve_parser

    add_serve_parser(sub, _add_model_args)
    from .train.command import add_parser as add_train_parser

    add_train_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, TypeError, OSError, EngineError) as e:
        if os.environ.get("LFM2VL_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
