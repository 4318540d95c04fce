"""The per-sample JSONL files (predictions, judgments): written one flushed line per sample, so a
killed run loses at most the line it was writing, and read back to resume."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, TextIO


def read(path: Path | None) -> dict[str, dict[str, Any]]:
    """id -> record from an earlier run; a torn last line (the run was killed mid-write) is dropped."""
    if path is None or not path.exists():
        return {}
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "id" in rec:
            out[str(rec["id"])] = rec
    return out


class Writer:
    """Appends records; on open, rewrites the file with the records kept (drops a torn line)."""

    def __init__(self, path: Path | None, keep: list[dict[str, Any]]):
        self.file: TextIO | None = None
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for rec in keep:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())

    def write(self, rec: dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(json.dumps(rec, ensure_ascii=False) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
