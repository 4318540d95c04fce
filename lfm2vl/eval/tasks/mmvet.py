"""MMVet (VLMEvalKit `MMVet.tsv`, or lmms-lab/MMVet parquet): 218 open questions graded by an LLM judge.

Prompt: the question as is (VLMEvalKit; lmms-eval's default adds a "think step by step" preamble).
Grading: lmms_eval/tasks/mmvet/utils.py (MM-Vet's own few-shot prompt): the judge completes
"question | ground truth | prediction |" with a correctness in [0, 1]; the first token is read as a
float; an unreadable reply is retried with temperature raised by 0.5 up to 2, then scores 0. Score:
the mean x100; categories: the six capabilities (a question counts for each it needs). The number
depends on the judge model (the MM-Vet paper used GPT-4); docs/evaluation.md.
"""

from __future__ import annotations

from typing import Any

from ..data import column
from ..sample import Sample, conversation, group_key, mean

NAME = "mmvet"
COLUMNS = ("question", "answer")
MAX_NEW_TOKENS = 512
METRIC = "judge score (%)"
JUDGE = True
CAPABILITIES = ("rec", "ocr", "know", "gen", "spat", "math")
PROMPT = """Compare the ground truth and prediction from AI models, to give a correctness score for the prediction. <AND> in the ground truth means it is totally right only when all elements in the ground truth are present in the prediction, and <OR> means it is totally right when any one element in the ground truth is present in the prediction. The correctness score is 0.0 (totally wrong), 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, or 1.0 (totally right). Just complete the last space of the correctness score.
gpt_query_prompt | Ground truth | Prediction | Correctness
--- | --- | --- | ---
What is x in the equation? | -1 <AND> -5 | x = 3 | 0.0
What is x in the equation? | -1 <AND> -5 | x = -1 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -5 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -5 or 5 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -1 or x = -5 | 1.0
Can you explain this meme? | This meme is poking fun at the fact that the names of the countries Iceland and Greenland are misleading. Despite its name, Iceland is known for its beautiful green landscapes, while Greenland is mostly covered in ice and snow. The meme is saying that the person has trust issues because the names of these countries do not accurately represent their landscapes. | The meme talks about Iceland and Greenland. It's pointing out that despite their names, Iceland is not very icy and Greenland isn't very green. | 0.4
Can you explain this meme? | This meme is poking fun at the fact that the names of the countries Iceland and Greenland are misleading. Despite its name, Iceland is known for its beautiful green landscapes, while Greenland is mostly covered in ice and snow. The meme is saying that the person has trust issues because the names of these countries do not accurately represent their landscapes. | The meme is using humor to point out the misleading nature of Iceland's and Greenland's names. Iceland, despite its name, has lush green landscapes while Greenland is mostly covered in ice and snow. The text 'This is why I have trust issues' is a playful way to suggest that these contradictions can lead to distrust or confusion. The humor in this meme is derived from the unexpected contrast between the names of the countries and their actual physical characteristics. | 1.0
"""  # noqa: E501  (the judge sees it exactly as MM-Vet wrote it)


def samples(rows: list[dict], images: list[list], ids: list[str]) -> list[Sample]:
    return [Sample(i, conversation(imgs, str(r["question"])), {"question": str(r["question"]), "answer": str(r["answer"]),
                   "capability": str(column(r, "category", ""))}, group_key(imgs)) for r, imgs, i in zip(rows, images, ids)]


def judge_prompt(record: dict[str, Any]) -> str:
    answer = record["answer"].replace("<AND>", " <AND> ").replace("<OR>", " <OR> ")
    return f"{PROMPT}\n{record['question']} | {answer} | {record['prediction']} |"


def score(record: dict[str, Any], judge: Any, context: Any = None) -> tuple[float, list[str]]:
    """(score, the judge's replies)."""
    messages = [{"role": "user", "content": judge_prompt(record)}]
    replies = []
    temperature = 0.0
    while temperature < 2:
        reply = judge.complete(messages, temperature=temperature, max_tokens=128).strip()
        replies.append(reply)
        if not reply:
            return 0.0, replies
        try:
            value = float(reply.split(" ")[0].strip())
            if 0.0 <= value <= 1.0:
                return value, replies
        except ValueError:
            pass
        temperature += 0.5
    return 0.0, replies


def aggregate(records: list[dict]) -> dict[str, Any]:
    cats = {}
    for cap in CAPABILITIES:
        hits = [r["score"] for r in records if cap in r["capability"]]
        if hits:
            cats[cap] = round(100 * mean(hits), 4)
    return {"score": 100 * mean([r["score"] for r in records]), "categories": cats}
