"""What a task hands the harness: one `Sample` per question (conversation + what scoring needs).

Each task module (lfm2vl/eval/tasks/) provides:
- `NAME`, `COLUMNS` (columns its data must have), `MAX_NEW_TOKENS`, `METRIC` (what `score` means);
- `samples(rows, images, ids) -> list[Sample]`: the official prompt for each row;
- `score(record) -> float`: one prediction record (the sample's `ref` fields + "prediction") -> its score;
- `aggregate(records) -> dict`: {"score": the announcement's number, "categories": {name: score}, ...}.
Tasks scored by an LLM judge set `JUDGE = True` and take the judge in `score(record, judge)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Sample:
    id: str
    messages: list[dict]  # one user turn: images first, then the prompt (as lmms-eval's default layout)
    ref: dict[str, Any] = field(default_factory=dict)  # JSON fields scoring needs (answer, category, ...)
    group: str = ""  # samples with equal groups share their images: the harness runs the first one first
    max_new_tokens: int | None = None  # None: the task's MAX_NEW_TOKENS


def conversation(images: list[Any], text: str) -> list[dict]:
    """A user turn with the images first, then the text (the layout lmms-eval uses by default)."""
    content: list[dict] = [{"type": "image", "image": img.source if hasattr(img, "source") else img}
                           for img in images]
    content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


def group_key(images: list[Any]) -> str:
    return "|".join(getattr(img, "key", str(img)) for img in images)


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def by_category(records: list[dict], key: str = "category") -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in records:
        out.setdefault(str(r.get(key)), []).append(r)
    return out


def accuracy_summary(records: list[dict], key: str = "category") -> dict[str, Any]:
    """Mean score in percent, overall and per category (the common MCQ / exact-match aggregate)."""
    cats = {name: round(100 * mean([r["score"] for r in rs]), 4) for name, rs in sorted(by_category(records, key).items())}
    return {"score": 100 * mean([r["score"] for r in records]), "categories": cats if len(cats) > 1 else {}}
