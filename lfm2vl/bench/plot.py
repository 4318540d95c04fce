"""The announcement's two figures as one PNG, drawn with PIL: total time and peak memory per system."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

COLORS = ((46, 110, 200), (220, 120, 40), (90, 160, 90), (150, 90, 170), (200, 60, 70), (120, 120, 120))


def plot_bars(results: list[dict[str, Any]], path: str | Path, size: tuple[int, int] = (960, 420)) -> None:
    width, height = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    names = [f"{r['system']} {r['dtype']}" + (f" {r['quantize']}" if r.get("quantize") else "") for r in results]
    tokens = results[0].get("new_tokens", "")
    panels = (("total_s", f"time, {tokens} new tokens (s)", "{:.2f} s"), ("peak_rss_mb", "peak memory (MB)", "{:.0f} MB"))
    panel_w = width // 2
    for p, (key, title, fmt) in enumerate(panels):
        x0, top, bottom = p * panel_w + 40, 50, height - 60
        d.text((x0, 15), title, fill="black")
        values = [float(r[key]) for r in results]
        peak = max(values) or 1.0
        bar_w = (panel_w - 80) // max(1, len(values)) - 20
        d.line((x0, bottom, x0 + panel_w - 60, bottom), fill="black")
        for i, (name, v) in enumerate(zip(names, values, strict=True)):
            bx = x0 + 10 + i * (bar_w + 20)
            by = bottom - (bottom - top) * v / peak
            d.rectangle((bx, by, bx + bar_w, bottom), fill=COLORS[i % len(COLORS)])
            d.text((bx, by - 14), fmt.format(v), fill="black")
            d.text((bx, bottom + 8), name, fill="black")
    img.save(path)
