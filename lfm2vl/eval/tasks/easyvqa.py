"""easy-VQA (PyPI `easy-vqa`): 64x64 shapes, 13 one-word answers; exact match after normalising case/space.

Test split: 1,000 images / 9,673 questions. The same conversation format feeds training (SFT)
and evaluation, so what the bundled model learns is exactly what is scored here. Built in: no --data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..sample import Sample, accuracy_summary

NAME = "easyvqa"
BUILTIN = True
COLUMNS = ()
MAX_NEW_TOKENS = 8
METRIC = "accuracy (%)"
SPLITS = ("train", "test")


@dataclass(frozen=True)
class Example:
    id: str
    messages: list[dict]
    answer: str


def _dataset():
    try:
        import easy_vqa
    except ImportError as e:
        raise ImportError("the easyvqa task needs the `easy-vqa` package: pip install easy-vqa") from e
    return easy_vqa


def conversation(image: str, question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]


def examples(split: str = "test", limit: int | None = None) -> list[Example]:
    ev = _dataset()
    if split not in SPLITS:
        raise ValueError(f"easyvqa has splits 'train' and 'test', not {split!r}")
    questions, answers, image_ids = ev.get_train_questions() if split == "train" else ev.get_test_questions()
    paths = ev.get_train_image_paths() if split == "train" else ev.get_test_image_paths()
    out = [
        Example(f"{split}-{i}", conversation(paths[image_id], q), a)
        for i, (q, a, image_id) in enumerate(zip(questions, answers, image_ids))
    ]
    return out[:limit] if limit else out


def builtin_samples(split: str = "test") -> list[Sample]:
    return [Sample(ex.id, ex.messages, {"answer": ex.answer}, ex.messages[0]["content"][0]["image"])
            for ex in examples(split)]


def normalize(text: str) -> str:
    return " ".join(text.lower().split()).strip(" .!")


def match(prediction: str, answer: str) -> float:
    return float(normalize(prediction) == normalize(answer))


def score(record: dict[str, Any]) -> float:
    return match(record["prediction"], record["answer"])


def aggregate(records: list[dict]) -> dict[str, Any]:
    return accuracy_summary(records, key="_none")
