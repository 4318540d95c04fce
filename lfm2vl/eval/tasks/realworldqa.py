"""RealWorldQA (VLMEvalKit `RealWorldQA.tsv`, or xai-org/RealworldQA parquet): 765 questions.

Prompt and scoring: lmms_eval/tasks/realworldqa/utils.py (default kwargs): the question as given (it
already ends with the instruction to answer with the letter). A letter answer is read with
`extract_mcq_answer` over A-D; other answers (numbers, words) must equal the prediction after
lower-casing and dropping a final period. Score: accuracy.
"""

from __future__ import annotations

from typing import Any

from ..mcq import extract_letter, options, options_block
from ..sample import Sample, accuracy_summary, conversation, group_key

NAME = "realworldqa"
COLUMNS = ("question", "answer")
MAX_NEW_TOKENS = 16
METRIC = "accuracy (%)"


def prompt(row: dict[str, Any]) -> str:
    question = str(row["question"]).strip()
    opts = options(row)
    if opts and "\nA" not in question:  # VLMEvalKit puts the options in A.. columns only for some rows
        question += "\n" + options_block(opts)
    return question


def samples(rows: list[dict], images: list[list], ids: list[str]) -> list[Sample]:
    return [Sample(i, conversation(imgs, prompt(r)), {"answer": str(r["answer"]).strip()}, group_key(imgs))
            for r, imgs, i in zip(rows, images, ids)]


def score(record: dict[str, Any]) -> float:
    gold = record["answer"].strip()
    if gold.upper() in ("A", "B", "C", "D"):
        return float(extract_letter(record["prediction"], ["A", "B", "C", "D"]) == gold.upper())
    return float(record["prediction"].lower().strip().rstrip(".") == gold.lower())


def aggregate(records: list[dict]) -> dict[str, Any]:
    return accuracy_summary(records, key="_none")
