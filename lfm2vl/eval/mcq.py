"""Multiple choice: the options of a row, and the option-letter extraction rules of lmms-eval 0.7.3.

Three extractors, because the tasks use different ones upstream (tests/test_eval_parity.py checks each
against lmms-eval on the same predictions):
- `extract_letter`: lmms_eval/tasks/_task_utils/mcq_extract.py `extract_mcq_answer` (MMStar,
  RealWorldQA): candidates in ten formats, the highest-priority format wins, the last one within it.
- `mmmu_letter`: the MMMU repository's `parse_multi_choice_response` (lmms_eval/tasks/_task_utils/
  mmmu_mcq_utils.py): "(A)", then "A ", then "A.", then option text; no candidate -> a random letter.
  Upstream draws from the global `random`; here the draw is seeded by the sample id, so a rerun and a
  resumed run give the same summary.
- `blink_letter`: lmms_eval/tasks/blink/utils.py `_extract_answer_letter`.
"""

from __future__ import annotations

import random
import re
import string
from typing import Any

from .data import parse_list

LETTERS = string.ascii_uppercase


def options(row: dict[str, Any]) -> list[tuple[str, str]]:
    """(letter, text) pairs: VLMEvalKit's A, B, .. columns, else a `choices`/`options` list, else choice_a.."""
    found = [(c, str(row[c])) for c in LETTERS if row.get(c) is not None and str(row[c]).strip() != ""]
    if found:
        return found
    for key in ("choices", "options"):
        if row.get(key) is not None:
            items = parse_list(row[key])
            return [(LETTERS[i], str(t)) for i, t in enumerate(items)]
    return [(c.upper(), str(row[f"choice_{c}"])) for c in "abcdefgh" if row.get(f"choice_{c}") is not None]


def answer_letter(row: dict[str, Any], opts: list[tuple[str, str]]) -> str:
    """The gold letter: a letter, "(B)", an index (MMLU's 0-3), or the text of one option."""
    ans = row.get("answer")
    if isinstance(ans, int) or (isinstance(ans, str) and ans.strip().isdigit() and len(opts) > int(ans.strip())
                                and ans.strip() not in LETTERS):
        return LETTERS[int(ans)]
    text = str(ans).strip()
    if text.strip("()") in LETTERS[: max(len(opts), 1)] and len(text.strip("()")) == 1:
        return text.strip("()")
    for letter, option in opts:
        if option.strip() == text:
            return letter
    return text


_ANSWER_PHRASES = (
    "the answer is", "answer is", "the correct answer is", "correct answer is", "the best answer is",
    "best answer is", "the correct option is", "correct option is", "the best option is", "best option is",
    "the choice is", "choice is", "the correct choice is", "correct choice is", "i choose", "i select", "i pick",
    "my answer is", "my choice is", "옵션", "정답은", "답은", "답:", "答案是", "答案为", "选", "答えは",
)
# format -> priority (higher wins); upstream's table
_PRIORITY = {"start": 10, "end": 9, "phrase": 7, "parentheses": 6, "period": 5, "colon": 4, "right_paren": 3,
             "space": 2, "fallback": 0}


def extract_letter(response: str, choices: list[str] | None = None) -> str:
    """lmms-eval's `extract_mcq_answer`: the chosen letter, or "" when there is none."""
    if not response or not response.strip():
        return ""
    letters = choices or list("ABCDEFGH")
    text = response.strip()
    for ch in ",.!?;:'\"":
        text = text.strip(ch)
    text = f" {text} "
    found: list[tuple[str, int, str]] = []  # (letter, position, format)
    for pattern, name in (("({})", "parentheses"), ("{}.", "period"), ("{}:", "colon"), ("{})", "right_paren"),
                          ("{} ", "space")):
        for ch in letters:
            token = pattern.format(ch)
            if token in text:
                found.append((ch, text.rfind(token), name))
    lower = text.lower()
    for phrase in _ANSWER_PHRASES:
        at = lower.find(phrase)
        if at != -1:
            for ch in letters:
                pos = text.find(ch, at + len(phrase))
                if pos != -1:
                    found.append((ch, pos, "phrase"))
    bare = text.strip()
    for ch in letters:
        if bare.startswith(ch) and (len(bare) == 1 or not bare[1].isalpha()):
            found.append((ch, 0, "start"))
        if bare.endswith(ch) and (len(bare) == 1 or not bare[-2].isalpha()):
            found.append((ch, len(text) - 1, "end"))
    if not found:
        found = [(ch, text.rfind(ch), "fallback") for ch in letters if ch in text]
    if not found:
        return ""
    return max(found, key=lambda c: (_PRIORITY[c[2]], c[1]))[0]


def mmmu_letter(response: str, index2ans: dict[str, str], seed: str) -> str:
    """MMMU's `parse_multi_choice_response` (random fallback seeded by `seed`)."""
    all_choices = list(index2ans)
    for ch in [",", ".", "!", "?", ";", ":", "'"]:
        response = response.strip(ch)
    response = f" {response} "
    by_index, bracketed = True, False
    candidates = [c for c in all_choices if f"({c})" in response]
    bracketed = bool(candidates)
    if not candidates:
        candidates = [c for c in all_choices if f"{c} " in response]
    if not candidates:
        candidates = [c for c in all_choices if f"{c}." in response]
    if not candidates and len(response.split()) > 5:
        candidates = [c for c, ans in index2ans.items() if ans.lower() in response.lower()]
        by_index = not candidates
    if not candidates:
        return random.Random(seed).choice(all_choices)
    if len(candidates) == 1:
        return candidates[0]
    if not by_index:
        starts = [response.lower().rfind(index2ans[c].lower()) for c in candidates]
    elif bracketed:
        starts = [response.rfind(f"({c})") for c in candidates]
    else:
        starts = [response.rfind(f" {c} ") for c in candidates]
    return candidates[starts.index(max(starts))]  # numpy.argmax: the first maximum


def blink_letter(text: str, valid: str = LETTERS) -> str:
    """lmms-eval BLINK's `_extract_answer_letter`: terse letter, "answer is X", "(X)", leading letter."""
    text = text.strip()
    letters = re.escape(valid.upper())
    first = text.split("\n", 1)[0].strip()
    if len(first) <= 4:
        m = re.match(rf"^\(?([{letters}])\)?[\.\s:,)]*$", first, flags=re.IGNORECASE)
        if m:
            return m.group(1).upper()
    hits = re.findall(rf"answers?(?:\s+is)?\s*[:\-]?\s*\(?([{letters}])\)?(?![A-Za-z])", text, flags=re.IGNORECASE)
    if hits:
        return hits[-1].upper()
    hits = re.findall(rf"\(([{letters}])\)", text)
    if hits:
        return hits[-1].upper()
    m = re.match(rf"[\(\s]*([{letters}])[\)\.\s]*", text, flags=re.IGNORECASE)
    return m.group(1).upper() if m else ""


def options_block(opts: list[tuple[str, str]], style: str = "{}. {}") -> str:
    return "\n".join(style.format(letter, text) for letter, text in opts)
