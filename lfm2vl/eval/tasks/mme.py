"""MME (VLMEvalKit `MME.tsv`, or lmms-lab/MME parquet): 2,374 yes/no questions, two per image.

Prompt: lmms_eval/tasks/mme (default kwargs): the question without its " Please answer yes or no.",
then "\\nAnswer the question using a single word or phrase.". Scoring: `parse_pred_ans` (from Otter):
"yes"/"no" exactly, "y"/"n", else whichever of yes/no appears in the first four characters.
Aggregate, per category: for each image the accuracy of its two questions (x100) plus accuracy+
(100 when both are right), averaged over the category's images; the perception score is the sum over
its 10 categories (out of 2000), cognition over its 4 (out of 800). The score is their sum, the number
the announcement's table reports. Pairs are keyed by `image_path` (VLMEvalKit) or `question_id`
(lmms-eval: the image file name), else by the shared image.
"""

from __future__ import annotations

from typing import Any

from ..sample import Sample, conversation, group_key

NAME = "mme"
COLUMNS = ("question", "answer", "category")
MAX_NEW_TOKENS = 16
METRIC = "perception + cognition (out of 2800)"
PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
POST_PROMPT = "\nAnswer the question using a single word or phrase."


def prompt(row: dict[str, Any]) -> str:
    return str(row["question"]).strip().replace(" Please answer yes or no.", "") + POST_PROMPT


def samples(rows: list[dict], images: list[list], ids: list[str]) -> list[Sample]:
    out = []
    for r, imgs, i in zip(rows, images, ids):
        pair = r.get("image_path") or (r.get("question_id") if r.get("question_id") != r.get("index") else None)
        ref = {"answer": str(r["answer"]), "category": str(r["category"]), "pair": str(pair or group_key(imgs))}
        out.append(Sample(i, conversation(imgs, prompt(r)), ref, group_key(imgs)))
    return out


def parse_pred_ans(pred: str) -> str:
    pred = pred.lower().strip().replace(".", "")
    if pred in ("yes", "no"):
        return pred
    if len(pred) == 1:
        return {"y": "yes", "n": "no"}.get(pred, "other")
    head = pred[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def score(record: dict[str, Any]) -> float:
    return float(parse_pred_ans(record["prediction"]) == record["answer"].lower().strip().replace(".", ""))


def category_scores(records: list[dict]) -> dict[str, float]:
    pairs: dict[str, dict[str, list[float]]] = {}
    for r in records:
        pairs.setdefault(r["category"], {}).setdefault(r["pair"], []).append(r["score"])
    out = {}
    for cat, by_image in pairs.items():
        bad = [k for k, s in by_image.items() if len(s) != 2]
        if bad:
            raise ValueError(f"MME scores question pairs: image {bad[0]!r} of {cat} has {len(by_image[bad[0]])} "
                             "question(s) (run the whole file, without --limit)")
        out[cat] = sum(100 * sum(s) / 2 + 100 * (sum(s) == 2) for s in by_image.values()) / len(by_image)
    return out


def aggregate(records: list[dict]) -> dict[str, Any]:
    cats = category_scores(records)
    perception = sum(v for k, v in cats.items() if k in PERCEPTION)
    cognition = sum(v for k, v in cats.items() if k not in PERCEPTION)
    return {"score": perception + cognition, "perception": perception, "cognition": cognition,
            "categories": {k: round(v, 4) for k, v in sorted(cats.items())}}
