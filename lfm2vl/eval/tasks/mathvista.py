"""MathVista (testmini) (VLMEvalKit `MathVista_MINI.tsv`, or AI4Math/MathVista testmini parquet): 1,000 questions.

Prompt: lmms_eval/tasks/mathvista `create_one_query` with shot_type "format-prompt" (the
mathvista_testmini_format task): the question (with " (Unit: ..)"), "A. .." choice lines, and the
instruction for the answer type ("Answer with the option's letter from the given choices directly.",
"Answer the question using a single integer number.", ".. floating-point number with one/two decimal
place(s).", ".. using a Python list.").

Scoring: lmms_eval/tasks/mathvista/mathvista_evals.py. Extraction: a choice given verbatim, an
integer/float answer that parses whole; upstream then asks an LLM to extract the answer, which is
replaced here by rules (a "(B)"/"B." letter or "the answer is B"; the last number; the last [..] list) so
the score needs no judge. Normalisation as upstream: a letter -> its choice, otherwise the choice with
the least edit distance; integers via int(float(x)); floats rounded to `precision` places (int(precision),
as MathVista's own calculate_score.py; lmms-eval passes the float 1.0 to round(), which fails); lists
as their text. Right when the normalised text equals the answer. Score: accuracy; categories: task.
"""

from __future__ import annotations

import re
from typing import Any

from ..data import column, parse_list
from ..mcq import LETTERS, options
from ..sample import Sample, accuracy_summary, conversation, group_key
from .infovqa import levenshtein

NAME = "mathvista"
COLUMNS = ("question", "answer", "question_type", "answer_type")
MAX_NEW_TOKENS = 64
METRIC = "accuracy (%)"
HINTS = {"integer": "Answer the question using a single integer number.",
         1: "Answer the question using a single floating-point number with one decimal place.",
         2: "Answer the question using a single floating-point number with two decimal places.",
         "list": "Answer the question using a Python list."}


def _precision(row: dict[str, Any]) -> int:
    try:
        return int(float(row.get("precision") or 0))
    except (TypeError, ValueError):
        return 0


def prompt(row: dict[str, Any], choices: list[str]) -> str:
    text = str(row["question"])
    if row.get("unit"):
        text += f" (Unit: {row['unit']})"
    parts = [text]
    if choices:
        parts.append("\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices)))
    if row["question_type"] == "multi_choice":
        parts.append("Answer with the option's letter from the given choices directly.")
    elif row["answer_type"] == "float":
        parts.append(HINTS.get(_precision(row), ""))
    else:
        parts.append(HINTS.get(row["answer_type"], ""))
    return "\n".join(p for p in parts if p)


def samples(rows: list[dict], images: list[list], ids: list[str]) -> list[Sample]:
    out = []
    for r, imgs, i in zip(rows, images, ids):
        choices = [str(c) for c in parse_list(r["choices"])] if r.get("choices") is not None else [t for _, t in options(r)]
        ref = {"answer": str(r["answer"]), "question_type": r["question_type"], "answer_type": r["answer_type"],
               "choices": choices, "precision": _precision(r), "category": column(r, "category") if r.get("task") is None
               else r["task"]}
        out.append(Sample(i, conversation(imgs, prompt(r, choices)), ref, group_key(imgs)))
    return out


def extract(response: str, ref: dict[str, Any]) -> str:
    """Upstream's quick paths, then rules where upstream asks an LLM."""
    if not response:
        return ""
    if ref["question_type"] == "multi_choice" and response in ref["choices"]:
        return response
    for kind, cast in (("integer", int), ("float", float)):
        if ref["answer_type"] == kind:
            try:
                return str(cast(response))
            except ValueError:
                pass
    if ref["question_type"] == "multi_choice":
        letters = LETTERS[: len(ref["choices"])]
        m = (re.search(rf"answer is:?\s*\(?([{letters}])\b", response, re.IGNORECASE)
             or re.match(rf"^\s*\(?([{letters}])(?:[\).:]|\s|$)", response))
        return m.group(1).upper() if m else response
    if ref["answer_type"] == "list":
        lists = re.findall(r"\[[^\[\]]*\]", response)
        return lists[-1] if lists else response
    numbers = re.findall(r"-?\d+(?:,\d{3})*(?:\.\d+)?", response)
    return numbers[-1].replace(",", "") if numbers else response


def normalize(extraction: Any, ref: dict[str, Any]) -> str | None:
    """lmms-eval's `normalize_extracted_answer` (with int(precision))."""
    if ref["question_type"] == "multi_choice":
        text = extraction.strip() if isinstance(extraction, str) else str(extraction)
        letter = re.findall(r"\(([a-zA-Z])\)", text)
        if letter:
            text = letter[0].upper()
        choices = ref["choices"]
        letters = [LETTERS[i] for i in range(len(choices))]
        if text in letters:
            return choices[letters.index(text)]
        distances = [levenshtein(text, c) for c in choices]
        return choices[distances.index(min(distances))]
    try:
        if ref["answer_type"] == "integer":
            return str(int(float(extraction)))
        if ref["answer_type"] == "float":
            return str(round(float(extraction), int(ref["precision"])))
    except (TypeError, ValueError):
        return None
    return str(extraction) if ref["answer_type"] == "list" else extraction


def score(record: dict[str, Any]) -> float:
    pred = normalize(extract(record["prediction"].strip(), record), record)
    return float(str(pred).strip() == str(record["answer"]).strip())


def aggregate(records: list[dict]) -> dict[str, Any]:
    return accuracy_summary(records)
