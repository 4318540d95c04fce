"""MMLU, text only (cais/mmlu `test` parquet: question, subject, choices, answer 0-3; or a TSV/JSONL with
A-D columns): 14,042 questions, no image.

Prompt: lmms_eval/tasks/mmlu/generative (zero-shot): the subject's description line, the question,
"A. .." to "D. .." and "Answer:". Scoring: the letter is read with lmms-eval's shared
`extract_mcq_answer` over A-D (upstream's generative MMLU compares the raw generation with the letter,
which fails answers like " B" or "B. Paris"; docs/evaluation.md says so). Score: accuracy over all
questions (lmms-eval's `weight_by_size`); categories: subjects.
"""

from __future__ import annotations

from typing import Any

from ..data import column
from ..mcq import answer_letter, extract_letter, options, options_block
from ..sample import Sample, accuracy_summary, conversation

NAME = "mmlu"
COLUMNS = ("question", "answer")
MAX_NEW_TOKENS = 16
METRIC = "accuracy (%)"


def prompt(row: dict[str, Any]) -> str:
    subject = column(row, "category")
    head = (f"The following are multiple choice questions (with answers) about {str(subject).replace('_', ' ')}.\n\n"
            if subject else "")
    return f"{head}{str(row['question']).strip()}\n{options_block(options(row))}\nAnswer:"


def samples(rows: list[dict], images: list[list], ids: list[str]) -> list[Sample]:
    return [Sample(i, conversation(imgs, prompt(r)), {"answer": answer_letter(r, options(r)),
                   "category": column(r, "category")}) for r, imgs, i in zip(rows, images, ids)]


def score(record: dict[str, Any]) -> float:
    return float(extract_letter(record["prediction"], ["A", "B", "C", "D"]) == record["answer"])


def aggregate(records: list[dict]) -> dict[str, Any]:
    return accuracy_summary(records)
