"""The metrics JSONL (one object per logged step / evaluation) and a loss-curve PNG drawn with PIL.

The log is append-only and flushed per line, so a killed run loses at most the line being
written; on resume, lines after the checkpoint's step (and a torn last line) are dropped, so the
file then reads as if the run had never stopped. The PNG needs no matplotlib.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

TRAIN_COLOR, EVAL_COLOR = (31, 119, 180), (214, 39, 40)


class MetricsLog:
    def __init__(self, path: str | Path, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled

    def truncate_after(self, step: int) -> None:
        """Keep only complete lines with step <= `step` (called when resuming from that step)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        tmp.replace(self.path)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The complete JSON lines of a metrics file (a torn last line is skipped)."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def plot_losses(records: list[dict[str, Any]], path: str | Path, size: tuple[int, int] = (800, 480)) -> None:
    """Train loss (line) and eval loss (dots) against step (linear axes), as a PNG."""
    train = [(r["step"], r["loss"]) for r in records if "loss" in r and math.isfinite(r["loss"])]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r and math.isfinite(r["eval_loss"])]
    width, height = size
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 70, width - 20, 30, height - 50
    draw.rectangle([left, top, right, bottom], outline="black")
    points = train + evals
    if not points:
        draw.text((left + 10, top + 10), "no losses logged yet", fill="black")
        img.save(path)
        return
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    x1, y1 = (x1 + 1 if x1 == x0 else x1), (y1 + 1e-3 if y1 == y0 else y1)

    def xy(step: float, loss: float) -> tuple[float, float]:
        return (left + (step - x0) / (x1 - x0) * (right - left), bottom - (loss - y0) / (y1 - y0) * (bottom - top))

    for i in range(5):  # axis ticks and labels
        fx, fy = x0 + (x1 - x0) * i / 4, y0 + (y1 - y0) * i / 4
        px, _ = xy(fx, y0)
        _, py = xy(x0, fy)
        draw.line([px, bottom, px, bottom + 5], fill="black")
        draw.text((px - 10, bottom + 8), f"{fx:.0f}", fill="black")
        draw.line([left - 5, py, left, py], fill="black")
        draw.text((5, py - 6), f"{fy:.3g}", fill="black")
    if len(train) > 1:
        draw.line([xy(*p) for p in train], fill=TRAIN_COLOR, width=2)
    elif train:
        cx, cy = xy(*train[0])
        draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=TRAIN_COLOR)
    for p in evals:
        cx, cy = xy(*p)
        draw.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], fill=EVAL_COLOR)
    draw.text((left, 8), "train loss", fill=TRAIN_COLOR)
    draw.text((left + 90, 8), "eval loss", fill=EVAL_COLOR)
    draw.text(((left + right) // 2 - 10, height - 20), "step", fill="black")
    img.save(path)
