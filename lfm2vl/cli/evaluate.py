"""`lfm2vl eval`: score a model on a benchmark with its official rules (docs/evaluation.md); prints a table,
then the summary as one JSON object on the last stdout line."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from .options import UsageError, add_model_args, check_model_args, load_model, positive


def add_parser(make: Any) -> None:
    from ..eval.tasks import TASKS

    e = make("eval", help="score a model on a benchmark (last stdout line: one JSON object)",
             description="Score a model on a benchmark with its official prompt, answer extraction and metric "
             "(docs/evaluation.md); the last stdout line is the summary as JSON.")
    add_model_args(e)
    e.add_argument("--task", required=True, choices=sorted(TASKS), help="the benchmark")
    e.add_argument("--data", default=None, metavar="PATH",
                   help="the benchmark file: a VLMEvalKit .tsv, .jsonl, .parquet or a datasets.save_to_disk folder "
                   "(easyvqa is built in)")
    e.add_argument("--split", default="test", help="easyvqa's split (default: %(default)s)")
    e.add_argument("--limit", type=int, default=None, help="the first N samples only (default: all)")
    e.add_argument("--batch-size", type=int, default=64,
                   help="requests in flight on the engine at once (default: %(default)s)")
    e.add_argument("--max-new-tokens", type=int, default=None, help="per answer (default: the task's)")
    e.add_argument("--out", default=None, metavar="DIR",
                   help="write DIR/predictions.jsonl, DIR/summary.json (and DIR/judgments.jsonl); a rerun with the "
                   "same DIR resumes")
    e.add_argument("--predictions", default=None, metavar="FILE",
                   help="the per-sample predictions JSONL (default: DIR/predictions.jsonl with --out)")
    e.add_argument("--score-only", action="store_true", help="score the predictions file without generating")
    e.add_argument("--generate-only", action="store_true",
                   help="for judged tasks: write predictions now, score later with --score-only --judge-endpoint")
    r = e.add_argument_group("remote model (instead of --model)")
    r.add_argument("--endpoint", default=None, metavar="URL",
                   help="an OpenAI-compatible server (lfm2vl serve, vLLM, llama-server), e.g. http://host:8000/v1")
    r.add_argument("--endpoint-model", default=None, metavar="NAME", help="its model name (default: the first served)")
    r.add_argument("--concurrency", type=int, default=8, help="requests at once to the endpoint / judge (default: 8)")
    j = e.add_argument_group("LLM judge (MMVet, MM-IFEval)")
    j.add_argument("--judge-endpoint", default=None, metavar="URL", help="an OpenAI-compatible server for the judge")
    j.add_argument("--judge-model", default=None, metavar="NAME", help="the judge's model name (default: the first served)")
    e.set_defaults(func=cmd_eval)


def _check_args(args: argparse.Namespace, task: Any) -> None:
    if getattr(task, "BUILTIN", False) and args.data is not None:
        raise UsageError(f"--data: {args.task} is built in (its data comes with the easy-vqa package); drop --data")
    splits = getattr(task, "SPLITS", None)
    if splits is not None and args.split not in splits:
        raise UsageError(f"--split {args.split}: {args.task} has the splits {', '.join(splits)}")
    for name, value in (("--limit", args.limit), ("--batch-size", args.batch_size),
                        ("--max-new-tokens", args.max_new_tokens), ("--concurrency", args.concurrency)):
        positive(name, value)
    if args.predictions is not None and not Path(args.predictions).expanduser().resolve().parent.is_dir():
        raise UsageError(f"--predictions {args.predictions}: its folder does not exist")
    if args.out is not None and Path(args.out).expanduser().is_file():
        raise UsageError(f"--out {args.out}: is a file; give a folder (it is created if missing)")
    if args.score_only and args.generate_only:
        raise UsageError("--score-only and --generate-only exclude each other")
    if args.score_only and args.out is None and args.predictions is None:
        raise UsageError("--score-only needs the predictions: --out DIR (of the run that wrote them) or --predictions FILE")
    if args.score_only:
        path = Path(args.predictions or Path(args.out) / "predictions.jsonl").expanduser()
        if not path.is_file():
            raise UsageError(f"--score-only: no predictions file at {path}")
    judged = getattr(task, "JUDGE", False)
    if judged and args.judge_endpoint is None and not args.generate_only:
        raise UsageError(f"--task {args.task} is graded by an LLM judge: give --judge-endpoint URL (any "
                         "OpenAI-compatible server; --judge-model NAME), or --generate-only --out DIR now and "
                         f"lfm2vl eval --task {args.task} --score-only --out DIR --judge-endpoint URL later")
    if args.generate_only and not judged:
        raise UsageError(f"--generate-only is for judged tasks (mmvet, mmifeval); {args.task} scores by rules")
    if args.generate_only and args.out is None and args.predictions is None:
        raise UsageError("--generate-only needs --out DIR (or --predictions FILE) to keep the predictions")
    if args.endpoint is not None and (args.model is not None or args.adapter is not None or args.quantize is not None):
        raise UsageError("--endpoint evaluates the server's model: drop --model/--adapter/--quantize")


def _client(url: str, model: str | None, key_env: str, what: str):
    from ..eval.openai_http import ChatClient, EndpointError

    if not url.startswith(("http://", "https://")):
        raise UsageError(f"{what} {url}: give an http(s):// URL, e.g. http://127.0.0.1:8000/v1")
    key = os.environ.get(key_env) or os.environ.get("OPENAI_API_KEY") or None
    client = ChatClient(url, model or "", key)
    try:
        served = client.models()
    except EndpointError as e:
        raise UsageError(f"{what} {url}: {e}") from e
    if model is None:
        if not served:
            raise UsageError(f"{what} {url}: the server lists no model; give its name with "
                             f"{'--endpoint-model' if what == '--endpoint' else '--judge-model'}")
        client = ChatClient(url, served[0], key)
    return client


def cmd_eval(args: argparse.Namespace) -> int:
    from ..eval import harness
    from ..eval.data import DataError
    from ..eval.report import table
    from ..eval.tasks import get_task

    task = get_task(args.task)
    _check_args(args, task)
    try:
        prepared = harness.plan(args.task, args.data, args.split, args.limit)
    except DataError as e:
        raise UsageError(str(e)) from e
    judge = None
    if args.judge_endpoint is not None and not args.generate_only:
        judge = _client(args.judge_endpoint, args.judge_model, "LFM2VL_JUDGE_API_KEY", "--judge-endpoint")
    backend = model = None
    if args.endpoint is not None:
        from ..eval.backends import EndpointBackend

        backend = EndpointBackend(_client(args.endpoint, args.endpoint_model, "LFM2VL_ENDPOINT_API_KEY", "--endpoint"),
                                  args.concurrency)
    elif not args.score_only:
        check_model_args(args)
        model = load_model(args)
    try:
        if args.generate_only:
            summary = _generate_only(harness, model, backend, args, prepared)
        else:
            summary = harness.evaluate(model, args.task, split=args.split, limit=args.limit,
                                       batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                                       predictions=args.predictions, out=args.out, backend=backend, judge=judge,
                                       judge_concurrency=args.concurrency, score_only=args.score_only,
                                       prepared=prepared)
    except DataError as e:
        raise UsageError(str(e)) from e
    print(table(summary))
    print(json.dumps(summary))
    return 0


def _generate_only(harness: Any, model: Any, backend: Any, args: argparse.Namespace, prepared: Any) -> dict:
    path = Path(args.predictions).expanduser() if args.predictions else Path(args.out).expanduser() / "predictions.jsonl"
    done = harness.rec_io.read(path)
    todo = [s for s in prepared.samples if s.id not in done]
    if todo:
        if backend is None:
            from ..eval.backends import EngineBackend

            backend = EngineBackend(model, window=args.batch_size)
        harness._generate(prepared.task, backend, prepared.samples, todo, done, path, args.max_new_tokens, True)
    missing = sum(1 for s in prepared.samples if s.id not in done)
    return {"task": prepared.task.NAME, "n": len(prepared.samples) - missing, "score": None,
            "metric": "not scored yet: lfm2vl eval --score-only --judge-endpoint URL", "predictions": str(path)}
