"""MMMU (val) (VLMEvalKit `MMMU_DEV_VAL.tsv` rows of split `validation`, or MMMU/MMMU validation parquet):
900 questions, multiple choice and open, 1-7 images.

Prompt: lmms_eval/tasks/mmmu/utils.py `construct_prompt` (default kwargs): a choice question gets
"A. .." lines, a blank line and "Answer with the option's letter from the given choices directly.";
an open question a blank line and "Answer the question using a single word or phrase.". The
"<image N>" markers stay in the text and the images come first (upstream's non-interleaved default).
Scoring: the MMMU repository's eval_utils.py as lmms-eval runs it: `parse_multi_choice_response`
(random letter when none is found: seeded by the id here) and, for open questions,
`parse_open_response` + `eval_open` (numbers compared after rounding to 2 places, strings as
substrings). Score: accuracy over all questions (upstream's instance-level average); categories: the
subject (from ids like `validation_Art_12`).
"""

from __future__ import annotations

import re
from typing import Any

from ..data import column
from ..mcq import mmmu_letter, options, options_block
from ..sample import Sample, accuracy_summary, conversation, group_key

NAME = "mmmu"
COLUMNS = ("question", "answer")
MAX_NEW_TOKENS = 128
METRIC = "accuracy (%)"
MC_PROMPT = "Answer with the option's letter from the given choices directly."
OPEN_PROMPT = "Answer the question using a single word or phrase."


def subject(row: dict[str, Any]) -> str:
    rid = str(row.get("id", ""))
    m = re.match(rf"^{re.escape(rid.split('_')[0])}_(.+?)_\d+$", rid) if rid else None
    return m.group(1) if m else str(column(row, "category"))


def samples(rows: list[dict], images: list[list], ids: list[str]) -> list[Sample]:
    out = []
    for r, imgs, i in zip(rows, images, ids):
        if r.get("split") not in (None, "validation", "val"):
            continue  # MMMU_DEV_VAL.tsv also holds the 150 dev questions
        opts = options(r)
        is_mc = bool(opts) and r.get("question_type", "multiple-choice") == "multiple-choice"
        text = (f"{r['question']}\n{options_block(opts)}\n\n{MC_PROMPT}" if is_mc else f"{r['question']}\n\n{OPEN_PROMPT}")
        ref = {"answer": str(r["answer"]), "question_type": "multiple-choice" if is_mc else "open",
               "options": [t for _, t in opts], "category": subject(r)}
        out.append(Sample(i, conversation(imgs, text), ref, group_key(imgs)))
    return out


def score(record: dict[str, Any]) -> float:
    pred = record["prediction"]
    if record["question_type"] == "multiple-choice":
        index2ans = {chr(ord("A") + n): t for n, t in enumerate(record["options"])}
        return float(mmmu_letter(pred, index2ans, seed=str(record["id"])) == record["answer"])
    return float(eval_open(record["answer"], parse_open_response(pred)))


def aggregate(records: list[dict]) -> dict[str, Any]:
    return accuracy_summary(records)


# -- the MMMU repository's open-answer rules (eval/eval_utils.py) ---------------------------------

def extract_numbers(text: str) -> list[str]:
    commas = re.findall(r"-?\b\d{1,3}(?:,\d{3})+\b", text)
    scientific = re.findall(r"-?\d+(?:\.\d+)?[eE][+-]?\d+", text)
    simple = re.findall(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])", text)
    return commas + scientific + simple


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
        return True
    except ValueError:
        return False


def normalize_str(text: str) -> list:
    text = text.strip()
    if _is_number(text):
        return [round(float(text.replace(",", "")), 2)]
    text = text.lower()
    return [" " + text, text + " "] if len(text) == 1 else [text]  # a lone letter must not match everywhere


def _key_subresponses(response: str) -> list[str]:
    response = response.strip().strip(".").lower()
    parts = re.split(r"\.\s(?=[A-Z])|\n", response)
    indicators = ["could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result "]
    keys = []
    for n, part in enumerate(parts):
        if n == len(parts) - 1:
            indicators.append("=")  # the last sentence may be just an equation
        shortest = None
        for ind in indicators:
            if ind in part:
                tail = part.split(ind)[-1].strip()
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in (":", ",", ".", "!", "?", ";", "'"):
            keys.append(shortest)
    return keys or [response]


def parse_open_response(response: str) -> list:
    keys = _key_subresponses(response)
    preds = list(keys)
    for k in keys:
        preds.extend(extract_numbers(k))
    out = []
    for p in preds:
        out.extend(normalize_str(p))
    return list(dict.fromkeys(out))  # upstream: list(set(...)); order does not change the verdict


def eval_open(gold: str | list, preds: list) -> bool:
    norm: list = []
    for ans in gold if isinstance(gold, list) else [gold]:
        norm.extend(normalize_str(ans))
    for pred in preds:
        if isinstance(pred, str):
            if any(isinstance(a, str) and a in pred for a in norm):
                return True
        elif pred in norm:
            return True
    return False
