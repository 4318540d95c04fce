"""OCRBench (VLMEvalKit `OCRBench.tsv`, or echo840/OCRBench parquet): 1,000 questions.

Prompt: the question as is (lmms_eval/tasks/ocrbench default kwargs). Scoring: lmms_eval/tasks/
ocrbench/utils.py (OCRBench's own rule): a question is right when one of its answers is a substring
of the prediction, after folding full-width ASCII, lower-casing and turning newlines into spaces; for
handwritten mathematical expressions (HME100k) after removing every space instead, case kept. The
score is the number right, out of 1,000; categories: the count right in each of the 10 types.
"""

from __future__ import annotations

from typing import Any

from ..data import column, parse_list
from ..sample import Sample, conversation, group_key

NAME = "ocrbench"
COLUMNS = ("question", "answer", "category")
MAX_NEW_TOKENS = 128
METRIC = "questions right (out of 1000)"
HMER = "Handwritten Mathematical Expression Recognition"


def samples(rows: list[dict], images: list[list], ids: list[str]) -> list[Sample]:
    out = []
    for r, imgs, i in zip(rows, images, ids):
        category = str(column(r, "category"))
        hme = r.get("dataset") == "HME100k" if r.get("dataset") is not None else category == HMER
        ref = {"answer": [str(a) for a in parse_list(r["answer"])], "category": category, "hme": hme}
        out.append(Sample(i, conversation(imgs, str(r["question"]).strip()), ref, group_key(imgs)))
    return out


def _fold(text: str) -> str:
    """Full-width ASCII and the ideographic space -> ASCII (nothing else of NFKC)."""
    return "".join(chr(ord(c) - 0xFEE0) if 0xFF01 <= ord(c) <= 0xFF5E else " " if c == "\u3000" else c for c in text)


def score(record: dict[str, Any]) -> float:
    pred = record["prediction"].strip()
    for ans in record["answer"]:
        if record["hme"]:
            if ans.strip().replace("\n", " ").replace(" ", "") in pred.strip().replace("\n", " ").replace(" ", ""):
                return 1.0
        elif _fold(ans).lower().strip().replace("\n", " ") in _fold(pred).lower().strip().replace("\n", " "):
            return 1.0
    return 0.0


def aggregate(records: list[dict]) -> dict[str, Any]:
    cats: dict[str, float] = {}
    for r in records:
        cats[r["category"]] = cats.get(r["category"], 0) + r["score"]
    return {"score": sum(r["score"] for r in records), "categories": dict(sorted(cats.items()))}
