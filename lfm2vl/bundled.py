"""The small LFM2-VL that ships inside the package (used when no model is named)."""

from __future__ import annotations

from pathlib import Path

BUNDLED = Path(__file__).parent / "assets" / "bundled_model"


def bundled_path() -> Path:
    if not (BUNDLED / "config.json").exists():
        raise FileNotFoundError(
            f"the bundled model is missing from {BUNDLED}; reinstall lfm2vl, or name a model "
            "(a local folder or a Hub id such as LiquidAI/LFM2-VL-450M)"
        )
    return BUNDLED
