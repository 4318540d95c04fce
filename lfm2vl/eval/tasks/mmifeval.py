"""MM-IFEval (VLMEvalKit `MM-IFEval.tsv`): instruction following, graded by an LLM judge and by rules.

Rows are `main` (scored) or `aux_cmp_gpt` (the same question with one constraint removed, whose answer
the judge compares against); every row is generated, only `main` rows are scored. Grading follows
VLMEvalKit vlmeval/dataset/mmifeval.py:
- P-Level (perception): the judge says "right" or "wrong" for the answer against the ground-truth list;
- C-Level (compose): `direct_gpt` constraints in one judged prompt with the image ("Score of
  constraint_i: x/1"), `rule_based` ones by rules (mmifeval_rules.py), `cmp_gpt` ones by a judged
  comparison with the aux answer ("Summary: True/False"); the row scores the mean over its constraints.
Score: the overall accuracy (mean over all main rows) in percent; also the P- and C-level ones. The
number depends on the judge model (docs/evaluation.md).
"""

from __future__ import annotations

import json
import re
from typing import Any

from ..data import parse_list
from ..openai_http import image_part
from ..sample import Sample, conversation, group_key, mean
from .mmifeval_rules import check

NAME = "mmifeval"
COLUMNS = ("question", "tag")
MAX_NEW_TOKENS = 1024
METRIC = "judge score (%)"
JUDGE = True


def samples(rows: list[dict], images: list[list], ids: list[str]) -> list[Sample]:
    out = []
    for r, imgs, i in zip(rows, images, ids):
        ref = {"question": str(r["question"]), "tag": r.get("tag"), "main_id": str(r.get("id", i)),
               "infer_type": r.get("infer_type") or "main", "del_cons": r.get("del_cons"),
               "answer": r.get("answer"), "constraints": r.get("constraints")}
        out.append(Sample(i, conversation(imgs, str(r["question"])), ref, group_key(imgs)))
    return out


def c_level_prompt(constraints: list[dict], prediction: str) -> str:
    listed = "\n".join(f"Constraint_{i + 1}: {c['value']}" for i, c in enumerate(constraints))
    return (
        "Your task is to evaluate whether the response from an AI assistant adheres to all of the given constraints. "
        "Please follow the requirements below to make the judgment:\n1. Be strict and consistent in your assessment.\n"
        "2. You should refer to the content of image to make the judgment.\n3. For each constraint, if the response "
        "fails to fully meet the constraint, give it a score of 0. Otherwise, give it a score of 1.\n\n"
        f"<start of response>\n{prediction}\n<end of response>\n\n<start of constraint list>\n{listed}\n"
        "<end of constraint list>\n\nYou must evaluate and provide an explanation for each constraint listed, ensuring "
        "no constraint is omitted. At the end, summarize the scores for all constraints in one sentence.\n\n"
        "Your output should strictly follow the format below:\nJudgement: ...\nSummary: Score of constraint_1: x/1, "
        "Score of constraint_2: x/1, Score of constraint_3: x/1, ..., Score of constraint_n: x/1.\n")


def p_level_prompt(question: str, prediction: str, truth: list) -> str:
    return (
        "You are an expert evaluator. Your task is to extract the answer from the model output and compare it with the "
        "ground truth list to determine whether the model answer covers all the points in the ground truth list. The "
        "ground truth list is provided as a JSON array of strings, and the model answer is a text string. An answer is "
        "considered correct if every element from the ground truth list appears in the model answer (substring "
        "matching is acceptable). The order does not matter. \nYour response should only be 'right' if the model "
        "answer fully covers the ground truth, or 'wrong' if it does not. Do not provide any additional commentary.\n\n"
        f"Question: {question}\nResponse from the model: {prediction}\nGround Truth List: {truth}\n")


def cmp_prompt(constraint: str, with_c: str, without_c: str) -> str:
    return (
        "You are an expert in judging whether the respone follow the given constraint. Your task is to assess whether "
        "the model's response satisfies the given constraint and return True or False. I will provide you with the "
        "constraint and the model's response under this constraint. To assist with your evaluation, I will also "
        "provide you with the model's response to the same question without the constraint.\n\n"
        f"<start of constraint>\n{constraint}\n<end of constraint>\n\n<start of response under the constraint>\n"
        f"{with_c}\n<end of response under the constraint>\n\n<start of response without the constraint>\n{without_c}\n"
        "<end of response without the constraint>\n\n**Please follow the steps below to evaluate**:\nStep 1. Compare the "
        "model's response under the constraint with its response without the constraint. If you believe these two "
        "answers are very similar, it means the model has not fully considered the impact of the constraint on the "
        "answer. Please return False.\nStep 2. Compare the model's response under the constraint with the content of "
        "the constraint. If you believe the model's response does not meet the requirements specified in the "
        "constraint, return False. Otherwise, if the response effectively satisfies the constraint, return True.\n\n"
        "Start by briefly explaining your reasoning based on the above steps. At the end, provide a one-sentence "
        "summary of your evaluation.\n\nYour output must strictly follow this format:\nReasoning: ...\n"
        'Summary: "True" / "False".\n')


def constraint_scores(reply: str) -> dict[str, float]:
    found = re.findall(r"Score\s+of\s+([a-zA-Z0-9_\-]+):\s*(\d+)\s*/\s*(\d+)", re.sub(r"\*", "", " ".join(reply.split())),
                       re.IGNORECASE)
    if not found:
        raise ValueError("no 'Score of constraint_i: x/1' in the judge's reply")
    return {name.strip().lower(): int(a) / int(b) for name, a, b in found}


def p_level_verdict(reply: str) -> float:
    if re.search("right", reply, re.IGNORECASE):
        return 1.0
    if re.search("wrong", reply, re.IGNORECASE):
        return 0.0
    raise ValueError("the judge said neither right nor wrong")


def cmp_verdict(reply: str) -> float:
    at = reply.lower().rfind("summary")
    m = re.search(r"\b(true|false)\b", reply[at + 7:], re.IGNORECASE) if at != -1 else None
    if m is None:
        raise ValueError("no 'Summary: True/False' in the judge's reply")
    return float(m.group(1).lower() == "true")


def score(record: dict[str, Any], judge: Any, context: dict[str, Any]) -> tuple[float | None, list[str]]:
    """(score, judge replies); aux rows score None. Upstream retries a row 3 times on unreadable replies."""
    if record["infer_type"] != "main":
        return None, []
    replies: list[str] = []
    for _ in range(3):
        try:
            return _score_once(record, judge, context, replies), replies
        except ValueError:
            continue
    return 0.0, replies  # upstream: a row that never parses counts 0 (`.get("total_score", 0.)`)


def _score_once(record: dict, judge: Any, context: dict, replies: list[str]) -> float:
    pred = record["prediction"]
    if record["tag"] == "P-Level":
        truth = json.loads(record["answer"]) if isinstance(record["answer"], str) else record["answer"]
        reply = judge.complete([{"role": "user", "content": p_level_prompt(record["question"], pred, truth)}],
                               temperature=0, max_tokens=4096)
        replies.append(reply)
        return p_level_verdict(reply)
    constraints = parse_list(json.loads(record["constraints"]) if isinstance(record["constraints"], str)
                             else record["constraints"])
    scores: list[float] = []
    direct = [c for c in constraints if c["judge"]["method"] == "direct_gpt"]
    if direct:
        image = [p for p in context["samples"][record["id"]].messages[0]["content"] if p["type"] == "image"]
        content = [{"type": "text", "text": c_level_prompt(direct, pred)}] + [image_part(p["image"]) for p in image[:1]]
        reply = judge.complete([{"role": "user", "content": content}], temperature=0, max_tokens=4096)
        replies.append(reply)
        got = constraint_scores(reply)
        scores += [got[f"constraint_{i + 1}"] for i in range(len(direct))]
    for c in constraints:
        if c["judge"]["method"] == "rule_based":
            scores.append(float(all(check(f["func"], str(pred), f["params"]) for f in c["judge"]["verify_funcs"])))
    for c in constraints:
        if c["judge"]["method"] == "cmp_gpt":
            aux = context["aux"].get((record["main_id"], c["key"]))
            if aux is None:
                raise KeyError(f"MM-IFEval row {record['id']}: no aux_cmp_gpt row for constraint {c['key']!r}")
            reply = judge.complete([{"role": "user", "content": cmp_prompt(c["value"], pred, aux)}],
                                   temperature=0, max_tokens=4096)
            replies.append(reply)
            scores.append(cmp_verdict(reply))
    return mean(scores)


def context(records: list[dict], samples_by_id: dict[str, Sample]) -> dict[str, Any]:
    aux = {(r["main_id"], r["del_cons"]): r["prediction"] for r in records if r["infer_type"] == "aux_cmp_gpt"}
    return {"samples": samples_by_id, "aux": aux}


def aggregate(records: list[dict]) -> dict[str, Any]:
    main = [r for r in records if r["infer_type"] == "main"]
    p = [r["score"] for r in main if r["tag"] == "P-Level"]
    c = [r["score"] for r in main if r["tag"] == "C-Level"]
    return {"score": 100 * mean(p + c), "n": len(main), "categories": {"P-Level": round(100 * mean(p), 4),
                                                                       "C-Level": round(100 * mean(c), 4)}}
