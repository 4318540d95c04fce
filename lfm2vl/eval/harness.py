"""Run a task through `Model.complete` in batches: progress bar, per-sample JSONL, summary dict.

The CLI prints the summary as the last stdout line (one JSON object with task, n, score, ...).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .tasks import get_task


def evaluate(
    model: Any,
    task: str,
    split: str = "test",
    limit: int | None = None,
    batch_size: int = 32,
    max_new_tokens: int = 8,
    predictions: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Greedy answers for every example; returns {"task", "split", "n", "score", "seconds", ...}."""
    t = get_task(task)
    items = t.examples(split, limit)
    if not items:
        raise ValueError(f"task {task!r} split {split!r} has no examples")
    out = open(predictions, "w") if predictions else None  # noqa: SIM115 (closed below)
    total, start = 0.0, time.perf_counter()
    try:
        bar = tqdm(total=len(items), desc=f"eval {task}", unit="q", disable=not progress)
        for i in range(0, len(items), batch_size):
            chunk = items[i : i + batch_size]
            results = model.complete([ex.messages for ex in chunk], max_new_tokens=max_new_tokens, temperature=0.0)
            for ex, res in zip(chunk, results):
                s = t.score(res.text, ex.answer)
                total += s
                if out:
                    out.write(json.dumps({"id": ex.id, "prediction": res.text, "answer": ex.answer, "score": s}) + "\n")
            bar.update(len(chunk))
            bar.set_postfix(score=f"{total / min(i + batch_size, len(items)):.4f}")
        bar.close()
    finally:
        if out:
            out.close()
    return {
        "task": task, "split": split, "n": len(items), "score": total / len(items),
        "seconds": round(time.perf_counter() - start, 1), "model": str(getattr(model, "source", "")),
    }
