"""SEEDBench_IMG (VLMEvalKit `SEEDBench_IMG.tsv`, or lmms-lab/SEED-Bench image rows): 14,233 questions.

Prompt and scoring: lmms_eval/tasks/seedbench/utils.py: the question, "A. .." to "D. .." lines, then
"Answer with the option's letter from the given choices directly."; the prediction's first character
(after stripping) must equal the answer letter, case-insensitively. Score: accuracy over all rows
(`seed_all`); categories: VLMEvalKit's `category` (lmms-eval's `data_type`).
"""

from __future__ import annotations

from typing import Any

from ..data import column
from ..mcq import options, options_block
from ..sample import Sample, accuracy_summary, conversation, group_key

NAME = "seedbench"
COLUMNS = ("question", "answer")
MAX_NEW_TOKENS = 16
METRIC = "accuracy (%)"


def prompt(row: dict[str, Any]) -> str:
    return f"{row['question']}\n{options_block(options(row))}\nAnswer with the option's letter from the given choices directly."


def samples(rows: list[dict], images: list[list], ids: list[str]) -> list[Sample]:
    return [Sample(i, conversation(imgs, prompt(r)), {"answer": str(r["answer"]), "category": column(r, "category")},
                   group_key(imgs)) for r, imgs, i in zip(rows, images, ids)]


def score(record: dict[str, Any]) -> float:
    pred = record["prediction"].strip()
    pred = pred[0] if len(pred) > 1 else pred
    return float(pred.lower().strip() == record["answer"].lower().strip())


def aggregate(records: list[dict]) -> dict[str, Any]:
    return accuracy_summary(records)
