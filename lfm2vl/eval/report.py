"""The printed table: the score, then each category (what the summary JSON holds, for a person)."""

from __future__ import annotations

from typing import Any


def _fmt(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def table(summary: dict[str, Any]) -> str:
    rows = [(summary["task"], _fmt(summary["score"]), str(summary["n"]))]
    for key in ("perception", "cognition"):
        if key in summary:
            rows.append((f"  {key}", _fmt(summary[key]), ""))
    for name, value in (summary.get("categories") or {}).items():
        rows.append((f"  {name}", _fmt(value), ""))
    width = max(len("task / category"), *(len(r[0]) for r in rows))
    lines = [f"{'task / category':<{width}}  {'score':>9}  {'n':>6}", f"{'-' * width}  {'-' * 9}  {'-' * 6}"]
    lines += [f"{a:<{width}}  {b:>9}  {c:>6}" for a, b, c in rows]
    lines.append(f"score: {summary.get('metric', '')}")
    return "\n".join(lines)
