"""Run a task: build its samples, generate what the predictions file lacks (resuming by id), score, summarise.

The CLI prints the summary as the last stdout line (one JSON object with task, n, score, ...); the
same summary goes to DIR/summary.json with --out DIR (DIR/predictions.jsonl holds one line per sample,
DIR/judgments.jsonl the judge's verdicts for judged tasks). Scores are recomputed from the stored
predictions at the end, so a resumed run's summary equals an uninterrupted one's.
"""

from __future__ import annotations

import concurrent.futures as cf
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from tqdm import tqdm

from . import records as rec_io
from .data import DataError, images, read_rows, require, row_ids
from .sample import Sample
from .tasks import get_task

TIMING = ("seconds", "questions_per_s", "generated")  # the summary fields that depend on the run, not the answers


@dataclass(frozen=True)
class Plan:
    task: ModuleType
    samples: list[Sample]
    data: str | None


def plan(task: str, data: str | Path | None = None, split: str = "test", limit: int | None = None) -> Plan:
    """The task's samples, with every data problem (missing file or column) raised now, before any model loads."""
    t = get_task(task)
    if getattr(t, "BUILTIN", False):
        samples = t.builtin_samples(split)
    else:
        if data is None:
            raise DataError(f"--task {task} needs --data FILE: the benchmark file (docs/evaluation.md says where "
                            "to get it)")
        path = Path(data).expanduser()
        rows = read_rows(path)
        require(rows, t.COLUMNS, f"{path} ({task})")
        base = path if path.is_dir() else path.parent
        samples = t.samples(rows, images(rows, base), row_ids(rows))
    if not samples:
        raise DataError(f"task {task}: no samples to evaluate")
    return Plan(t, samples[:limit] if limit else samples, None if data is None else str(data))


def evaluate(
    model: Any = None,
    task: str = "easyvqa",
    split: str = "test",
    limit: int | None = None,
    batch_size: int = 64,
    max_new_tokens: int | None = None,
    predictions: str | Path | None = None,
    progress: bool = True,
    *,
    data: str | Path | None = None,
    out: str | Path | None = None,
    backend: Any = None,
    judge: Any = None,
    judge_concurrency: int = 4,
    score_only: bool = False,
    prepared: Plan | None = None,
) -> dict[str, Any]:
    """Greedy answers for every sample, scored by the task's official rules; returns the summary dict.

    model: a `lfm2vl.Model` (run on its engine), or pass `backend` (e.g. EndpointBackend). score_only:
    score the predictions file as it is (nothing is generated; missing samples are an error).
    """
    p = prepared or plan(task, data, split, limit)
    t = p.task
    out_dir = Path(out).expanduser() if out is not None else None
    pred_path = Path(predictions).expanduser() if predictions else (out_dir / "predictions.jsonl" if out_dir else None)
    wanted = {s.id for s in p.samples}
    done = {k: v for k, v in rec_io.read(pred_path).items() if k in wanted}
    todo = [s for s in p.samples if s.id not in done]
    if score_only and todo:
        raise DataError(f"--score-only: {pred_path} has no prediction for {len(todo)} of {len(p.samples)} samples "
                        f"(first: {todo[0].id}); run without --score-only to generate them")
    start, generated = time.perf_counter(), 0
    if todo:
        if backend is None:
            from .backends import EngineBackend

            backend = EngineBackend(model, window=batch_size)
        generated = _generate(t, backend, p.samples, todo, done, pred_path, max_new_tokens, progress)
    seconds = time.perf_counter() - start
    records = [{**s.ref, "id": s.id, "prediction": done[s.id]["prediction"], "error": done[s.id].get("error")}
               for s in p.samples]
    if getattr(t, "JUDGE", False):
        _judge(t, records, p.samples, judge, out_dir, judge_concurrency, progress)
    else:
        for r in records:
            r["score"] = t.score(r)
    result = t.aggregate(records)
    summary = {"task": getattr(t, "NAME", task), "n": result.pop("n", len(records)), "score": round(result.pop("score"), 4),
               "metric": t.METRIC, **result, "errors": sum(1 for r in records if r.get("error")),
               "data": p.data, "split": split if getattr(t, "BUILTIN", False) else None,
               "model": getattr(backend, "name", None) or str(getattr(model, "source", "") or ""),
               "generated": generated, "seconds": round(seconds, 1),
               "questions_per_s": round(generated / seconds, 2) if generated and seconds > 0 else None}
    if out_dir is not None:
        import json

        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _generate(t: ModuleType, backend: Any, samples: list[Sample], todo: list[Sample], done: dict, path: Path | None,
              max_new_tokens: int | None, progress: bool) -> int:
    writer = rec_io.Writer(path, [done[s.id] for s in samples if s.id in done])
    bar = tqdm(total=len(samples), initial=len(samples) - len(todo), desc=f"eval {getattr(t, 'NAME', '')}",
               unit="q", disable=not progress)
    judged = getattr(t, "JUDGE", False)
    right = [0.0, 0]
    count = [0]

    def finished(s: Sample, text: str, error: str | None) -> None:
        rec: dict[str, Any] = {"id": s.id, "prediction": text, **{k: v for k, v in s.ref.items() if k not in ("id",)}}
        if error:
            rec["error"] = error
        if not judged:
            rec["score"] = t.score({**s.ref, "id": s.id, "prediction": text})
            right[0] += rec["score"]
            right[1] += 1
        done[s.id] = rec
        writer.write(rec)
        count[0] += 1
        bar.update(1)
        if right[1] and count[0] % 16 == 0:
            bar.set_postfix(score=f"{right[0] / right[1]:.4f}")

    try:
        backend.run(todo, lambda s: max_new_tokens or s.max_new_tokens or t.MAX_NEW_TOKENS, finished)
    finally:
        writer.close()
        bar.close()
    return count[0]


def _judge(t: ModuleType, records: list[dict], samples: list[Sample], judge: Any, out_dir: Path | None,
           concurrency: int, progress: bool) -> None:
    """Judge every record (resuming from DIR/judgments.jsonl); each record gets its "score"."""
    path = out_dir / "judgments.jsonl" if out_dir else None
    cached = rec_io.read(path)
    todo = [r for r in records if r["id"] not in cached]
    if todo and judge is None:
        raise DataError(f"{getattr(t, 'NAME', '')} is graded by an LLM judge: give --judge-endpoint URL "
                        "(--judge-model NAME) to score the predictions")
    ctx = t.context(records, {s.id: s for s in samples}) if hasattr(t, "context") else None
    writer = rec_io.Writer(path, [cached[r["id"]] for r in records if r["id"] in cached])
    try:
        with cf.ThreadPoolExecutor(concurrency) as pool, tqdm(total=len(todo), desc=f"judge {getattr(t, 'NAME', '')}",
                                                              unit="q", disable=not progress or not todo) as bar:
            futures = {pool.submit(t.score, r, judge, ctx): r for r in todo}
            for f in cf.as_completed(futures):
                r = futures[f]
                value, replies = f.result()
                cached[r["id"]] = {"id": r["id"], "score": value, "replies": replies, "judge": getattr(judge, "model", None)}
                writer.write(cached[r["id"]])
                bar.update(1)
    finally:
        writer.close()
    for r in records:
        r["score"] = cached[r["id"]]["score"]
