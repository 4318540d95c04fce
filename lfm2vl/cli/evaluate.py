"""`lfm2vl eval`: score a model on a task; the last stdout line is the summary as one JSON object."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .options import UsageError, add_model_args, check_model_args, load_model, positive


def add_parser(make: Any) -> None:
    from ..eval.tasks import TASKS

    e = make("eval", help="score a model on an evaluation task (last stdout line: one JSON object)",
             description="Score a model on an evaluation task; the last stdout line is the summary as JSON.")
    add_model_args(e)
    e.add_argument("--task", required=True, choices=sorted(TASKS), help="the task")
    e.add_argument("--split", default="test", help="(default: %(default)s)")
    e.add_argument("--limit", type=int, default=None, help="the first N examples only (default: all)")
    e.add_argument("--batch-size", type=int, default=64, help="requests in flight at once (default: %(default)s)")
    e.add_argument("--max-new-tokens", type=int, default=8, help="per answer (default: %(default)s)")
    e.add_argument("--predictions", default=None, metavar="FILE", help="write per-sample predictions (JSONL) here")
    e.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from ..eval.harness import evaluate
    from ..eval.tasks import get_task

    splits = getattr(get_task(args.task), "SPLITS", None)
    if splits is not None and args.split not in splits:
        raise UsageError(f"--split {args.split}: {args.task} has the splits {', '.join(splits)}")
    for name, value in (("--limit", args.limit), ("--batch-size", args.batch_size),
                        ("--max-new-tokens", args.max_new_tokens)):
        positive(name, value)
    if args.predictions is not None and not Path(args.predictions).expanduser().resolve().parent.is_dir():
        raise UsageError(f"--predictions {args.predictions}: its folder does not exist")
    check_model_args(args)
    model = load_model(args)
    summary = evaluate(model, args.task, split=args.split, limit=args.limit, batch_size=args.batch_size,
                       max_new_tokens=args.max_new_tokens, predictions=args.predictions)
    print(json.dumps(summary))
    return 0
