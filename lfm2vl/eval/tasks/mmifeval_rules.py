"""MM-IFEval's rule-based constraint checks, by the names its TSV uses (VLMEvalKit
vlmeval/dataset/utils/mmif/function_and_compare.py; rewritten here, same rules).

Upstream splits sentences with nltk's punkt model; nltk is not a dependency here, so `sentences`
splits after ., ! or ? followed by space (punkt also knows abbreviations such as "Dr."; the two differ
on those only). docs/evaluation.md lists this.
"""

from __future__ import annotations

import re
from collections.abc import Callable

NUMBER = r"""(?<!\w)[+-]?(?:\d{1,3}(?:,\d{3})*(?:\.\d+)?|\d+\.\d+|\.\d+|\d+)(?:[eE][+-]?\d+)?%?(?!\w)"""
NO_ARABIC = r"""(?<![.\w])(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?%?|\d+\.\d+%?|\d+%?|\d+(?:\.\d+)?(?:[eE][+-]?\d+))(?![.\w])"""


def _clean(text: str) -> str:
    return "\n".join(line.strip() for line in text.splitlines()).strip()


def paragraphs(text: str) -> list[str]:
    return [p for p in re.split(r"\n\s*\n", _clean(text)) if p.strip()]


def sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def _words(text: str) -> int:
    return len(re.sub(r"[^\w\s.-]", "", text).split())


def _mentions(text: str, keyword: str) -> int:
    return len(re.findall(r"\b" + re.escape(keyword.lower()) + r"\b", _clean(text).lower()))


def _precision(text: str, precision: int) -> bool:
    for m in re.finditer(NUMBER, text):
        mantissa = re.split("[eE]", m.group().replace(",", "").rstrip("%"))[0]
        if "." in mantissa:
            if len(mantissa.split(".")[-1]) != precision:
                return False
        elif precision != 0:
            return False
    return True


def _percent_precision(text: str, precision: int) -> bool:
    return all("." in n and len(n.split(".")[1]) == precision for n in re.findall(r"(\d+\.\d+|\d+)\s*%", text))


RULES: dict[str, Callable[..., bool]] = {
    "check_whether_response_paragraph_number_in_range": lambda r, lo, hi: lo <= len(paragraphs(r)) <= hi,
    "check_whether_response_sentence_number_in_range": lambda r, lo, hi: lo <= len(sentences(_clean(r))) <= hi,
    "check_whether_each_paragraph_sentence_number_in_range":
        lambda r, lo, hi: all(lo <= len(sentences(p)) <= hi for p in paragraphs(r)),
    "check_whether_each_paragraph_sentence_number_in_range_list":
        lambda r, ranges: len(paragraphs(r)) == len(ranges)
        and all(lo <= len(sentences(p)) <= hi for p, (lo, hi) in zip(paragraphs(r), ranges)),
    "check_whether_response_word_count_in_range": lambda r, lo, hi: lo <= _words(r) <= hi,
    "check_whether_each_paragraph_word_count_in_range": lambda r, lo, hi: all(lo <= _words(p) <= hi for p in paragraphs(r)),
    "check_whether_whole_response_not_contain_certain_substrings": lambda r, subs: all(s not in r for s in subs),
    "check_whether_whole_response_not_contain_certain_substring": lambda r, sub: sub not in r,
    "check_whether_each_sentence_begin_with_certain_substring":
        lambda r, sub: all(s.startswith(sub) for s in sentences(_clean(r))),
    "check_whether_each_paragraph_begin_with_certain_substring": lambda r, sub: all(p.startswith(sub) for p in paragraphs(r)),
    "check_whether_each_paragraph_end_with_certain_substring": lambda r, sub: all(p.endswith(sub) for p in paragraphs(r)),
    "check_whether_each_sentence_end_with_certain_substring":
        lambda r, sub: all(s.endswith(sub) for s in sentences(_clean(r))),
    "check_whether_whole_response_begin_with_certain_substring": lambda r, sub: r.strip().startswith(sub),
    "check_whether_whole_response_end_with_certain_substring": lambda r, sub: r.strip().endswith(sub),
    "check_whether_each_keyword_in_list_metioned_in_range":
        lambda r, kws, lo, hi: all(lo <= _mentions(r, k) <= hi for k in kws),
    "check_whether_total_keyword_in_list_metioned_in_range":
        lambda r, kws, lo, hi: lo <= sum(_mentions(r, k) for k in kws) <= hi,
    "check_percentage_number_precision_in_response": _percent_precision,
    "check_number_precision_in_response": _precision,
    "check_whether_has_no_arabic_number_in_response": lambda r: not re.findall(NO_ARABIC, r, flags=re.IGNORECASE),
}


def check(name: str, response: str, params: list) -> bool:
    if name not in RULES:
        raise ValueError(f"MM-IFEval rule {name!r} is not implemented (known: {', '.join(sorted(RULES))})")
    return bool(RULES[name](response, *params))
