"""BLINK (VLMEvalKit `BLINK.tsv`, or BLINK-Benchmark/BLINK val parquet): 1,901 questions, 1-4 images each.

Prompt and scoring: lmms_eval/tasks/blink (default kwargs): "Note: You only need to respond with A, B,
.. without providing any additional information.\\n" before the question and its "(A) .." options
(the HF rows' `prompt` field holds both; a TSV's question gets its options appended). The letter is
read by BLINK's `_extract_answer_letter` over the row's own option letters. Score: accuracy;
categories: the sub-task.
"""

from __future__ import annotations

from typing import Any

from ..data import column
from ..mcq import LETTERS, blink_letter, options, options_block
from ..sample import Sample, accuracy_summary, conversation, group_key

NAME = "blink"
COLUMNS = ("answer",)
MAX_NEW_TOKENS = 32
METRIC = "accuracy (%)"
PRE_PROMPT = "Note: You only need to respond with {} without providing any additional information.\n"


def prompt(row: dict[str, Any]) -> tuple[str, int]:
    opts = options(row)
    if row.get("prompt"):
        text = str(row["prompt"])
    else:
        text = str(row.get("question", "")).strip()
        if opts and "(A)" not in text:
            text += "\n" + options_block(opts, "({}) {}")
    return PRE_PROMPT.format(", ".join(LETTERS[i] for i in range(len(opts)))) + text, len(opts)


def samples(rows: list[dict], images: list[list], ids: list[str]) -> list[Sample]:
    out = []
    for r, imgs, i in zip(rows, images, ids):
        text, n = prompt(r)
        out.append(Sample(i, conversation(imgs, text), {"answer": str(r["answer"]).strip("()"), "n_options": n,
                          "category": column(r, "category")}, group_key(imgs)))
    return out


def score(record: dict[str, Any]) -> float:
    valid = LETTERS[: record.get("n_options") or 0] or LETTERS
    return float(blink_letter(record["prediction"], valid) == record["answer"])


def aggregate(records: list[dict]) -> dict[str, Any]:
    return accuracy_summary(records)
