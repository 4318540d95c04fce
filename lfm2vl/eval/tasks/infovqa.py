"""InfoVQA (val) (VLMEvalKit `InfoVQA_VAL.tsv`, or lmms-lab/DocVQA `InfographicVQA` validation): 2,801 questions.

Prompt: lmms_eval/tasks/infovqa (default kwargs): the question, then "\\nAnswer the question using a
single word or phrase.". Scoring: ANLS as lmms_eval/api/metrics.py `anls` (from Qwen-VL's
infographicsvqa_eval.py) and VLMEvalKit's `anls_compute` compute it: 1 - the smallest normalized
Levenshtein distance to any answer (both sides lower-cased, whitespace collapsed; the length is the
longer *unnormalized* string, as upstream), and 0 when that is below 0.5. Score: mean ANLS in percent.
"""

from __future__ import annotations

from typing import Any

from ..data import column, parse_list
from ..sample import Sample, conversation, group_key, mean

NAME = "infovqa"
COLUMNS = ("question", "answer")
MAX_NEW_TOKENS = 32
METRIC = "ANLS (%)"
POST_PROMPT = "\nAnswer the question using a single word or phrase."
THRESHOLD = 0.5


def samples(rows: list[dict], images: list[list], ids: list[str]) -> list[Sample]:
    return [Sample(i, conversation(imgs, f"{r['question']}{POST_PROMPT}"),
                   {"answer": [str(a) for a in parse_list(column(r, "answer"))]}, group_key(imgs))
            for r, imgs, i in zip(rows, images, ids)]


def levenshtein(a: str, b: str) -> int:
    if len(a) > len(b):
        a, b = b, a
    row = list(range(len(a) + 1))
    for i, cb in enumerate(b):
        new = [i + 1]
        for j, ca in enumerate(a):
            new.append(row[j] if ca == cb else 1 + min(row[j], row[j + 1], new[-1]))
        row = new
    return row[-1]


def anls(answers: list[str], prediction: str, threshold: float = THRESHOLD) -> float:
    values = []
    for ans in answers:
        gt, det = " ".join(ans.strip().lower().split()), " ".join(prediction.strip().lower().split())
        length = max(len(ans.upper()), len(prediction.upper()))
        values.append(0.0 if length == 0 else levenshtein(gt, det) / length)
    best = 1 - min(values)
    return 0.0 if best < threshold else best


def score(record: dict[str, Any]) -> float:
    return anls(record["answer"], record["prediction"])


def aggregate(records: list[dict]) -> dict[str, Any]:
    return {"score": 100 * mean([r["score"] for r in records]), "categories": {}}
