"""MMStar (VLMEvalKit `MMStar.tsv`, or the `Lin-Chen/MMStar` parquet): 1,500 four-option questions.

Prompt and scoring: lmms_eval/tasks/mmstar (default kwargs): the question (which already lists its
options), then "\\nAnswer with the option's letter from the given choices directly"; the letter is
read by `extract_mcq_answer` over A-D. The score is lmms-eval's `average`: the mean over the 18
l2-categories of their accuracies (each of the 6 categories is the same over its own l2-categories).
"""

from __future__ import annotations

from typing import Any

from ..data import column
from ..mcq import extract_letter, options, options_block
from ..sample import Sample, by_category, conversation, group_key, mean

NAME = "mmstar"
COLUMNS = ("question", "answer", "category", "l2-category")
MAX_NEW_TOKENS = 32
METRIC = "accuracy (%), mean over l2-categories"
POST_PROMPT = "\nAnswer with the option's letter from the given choices directly"


def prompt(row: dict[str, Any]) -> str:
    question = str(row["question"]).strip()
    opts = options(row)
    if opts and "Options:" not in question and "\nA" not in question:  # a TSV whose question lacks them
        question += "\nOptions:\n" + options_block(opts)
    return question + POST_PROMPT


def samples(rows: list[dict], images: list[list], ids: list[str]) -> list[Sample]:
    return [Sample(i, conversation(imgs, prompt(r)), {"answer": str(r["answer"]).strip(),
                   "category": column(r, "category"), "l2_category": column(r, "l2-category")}, group_key(imgs))
            for r, imgs, i in zip(rows, images, ids)]


def score(record: dict[str, Any]) -> float:
    return float(extract_letter(record["prediction"], ["A", "B", "C", "D"]) == record["answer"].upper())


def _l2_mean(records: list[dict]) -> float:
    return mean([mean([r["score"] for r in rs]) for rs in by_category(records, "l2_category").values()])


def aggregate(records: list[dict]) -> dict[str, Any]:
    cats = {name: round(100 * _l2_mean(rs), 4) for name, rs in sorted(by_category(records).items())}
    return {"score": 100 * _l2_mean(records), "categories": cats}
