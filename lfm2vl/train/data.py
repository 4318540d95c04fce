"""Training data: conversations from JSONL files or Hugging Face `datasets` folders, validated up front.

One JSONL line is one record, in the messages shape of OpenAI / Hugging Face chat data:

    {"messages": [{"role": "user", "content": [{"type": "image", "image": "imgs/cat.png"},
                                               {"type": "text", "text": "What is this?"}]},
                  {"role": "assistant", "content": "A cat."}]}

Image parts name their image by `image` / `path` / `url` (a file path, relative to the JSONL file,
or a `data:` URL) or as `{"type": "image_url", "image_url": {"url": ...}}`; TRL-style records may
instead put bare `{"type": "image"}` parts and a top-level `"images": [...]` list. A record
`{"text": "..."}` is plain text (every token is a target), for text-only mid-training streams.
Every record is checked when the data is opened, and one `DataError` names each bad record by
file and line (or folder and row) so a broken line fails at step 0, not hours into a run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant")
_SOURCE_KEYS = ("image", "path", "url")
_MAX_REPORTED = 10
_PENDING = object()  # an image a datasets row holds but that validation does not decode


class DataError(ValueError):
    """Bad training data; the message names the file and line (or folder and row) of each bad record."""


@dataclass(frozen=True)
class Record:
    where: str  # "train.jsonl:12" or "folder row 12", for messages
    messages: list[dict[str, Any]] | None = None  # image parts carry resolved sources under "image"
    text: str | None = None


class Source:
    """A sequence of validated records."""

    name: str = ""

    def __len__(self) -> int:
        raise NotImplementedError

    def record(self, i: int) -> Record:
        raise NotImplementedError


class ListSource(Source):
    def __init__(self, name: str, records: list[Record]):
        self.name, self.records = name, records

    def __len__(self) -> int:
        return len(self.records)

    def record(self, i: int) -> Record:
        return self.records[i]


class ConcatSource(Source):
    def __init__(self, sources: list[Source]):
        self.sources = sources
        self.name = " + ".join(s.name for s in sources)
        self.starts = [0]
        for s in sources:
            self.starts.append(self.starts[-1] + len(s))

    def __len__(self) -> int:
        return self.starts[-1]

    def record(self, i: int) -> Record:
        for k, s in enumerate(self.sources):
            if i < self.starts[k + 1]:
                return s.record(i - self.starts[k])
        raise IndexError(i)


# -- validation ----------------------------------------------------------------------------------
def _resolve_image(src: Any, base: Path | None) -> Any:
    """A usable image source, or a ValueError saying what is wrong with it."""
    if not isinstance(src, str):
        if src is None:
            raise ValueError("an image part has no image (use 'image', 'path' or 'url', or a top-level 'images' list)")
        return src  # PIL images, bytes, arrays from a datasets folder
    if src.startswith("data:"):
        return src
    if src.startswith(("http://", "https://")):
        raise ValueError(f"image URLs are not fetched: download {src[:80]} and reference the file instead")
    path = Path(os.path.expanduser(src))
    if not path.is_absolute() and base is not None:
        path = base / path
    if not path.is_file():
        raise ValueError(f"image file {src!r} not found" + (f" (relative to {base})" if base else ""))
    return str(path)


def _image_of(part: dict[str, Any]) -> Any:
    if part["type"] == "image_url":
        info = part.get("image_url")
        return info.get("url") if isinstance(info, dict) else info
    return next((part[k] for k in _SOURCE_KEYS if part.get(k) is not None), None)


def _check_part(part: Any, role: str, pending: list[Any], base: Path | None) -> dict[str, Any]:
    if isinstance(part, str):
        return {"type": "text", "text": part}
    if not isinstance(part, dict) or part.get("type") not in ("text", "image", "image_url"):
        raise ValueError(f"content parts must be {{'type': 'text' | 'image' | 'image_url', ...}}, got {part!r:.80}")
    if part["type"] == "text":
        if not isinstance(part.get("text"), str):
            raise ValueError(f"a text part needs a string 'text', got {part!r:.80}")
        return {"type": "text", "text": part["text"]}
    if role == "assistant":
        raise ValueError("assistant messages cannot contain images (the model only generates text)")
    src = _image_of(part)
    if src is None and pending:
        src = pending.pop(0)
    return {"type": "image", "image": _resolve_image(src, base)}


def check_messages(messages: Any, images: Any = None, base: Path | None = None) -> list[dict[str, Any]]:
    """Validated messages with every image part as {"type": "image", "image": <resolved source>}."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list of {'role', 'content'} objects")
    if images is not None and not isinstance(images, (list, tuple)):
        raise ValueError(f"'images' must be a list, got {type(images).__name__}")
    pending = list(images or [])
    out = []
    for n, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ValueError(f"message {n} must be an object with 'role' in {list(ROLES)}, got {m!r:.80}")
        content = m.get("content")
        if isinstance(content, str):
            out.append({"role": m["role"], "content": content})
        elif isinstance(content, list):
            try:
                parts = [_check_part(p, m["role"], pending, base) for p in content]
            except ValueError as e:
                raise ValueError(f"message {n} ({m['role']}): {e}") from None
            out.append({"role": m["role"], "content": parts})
        else:
            raise ValueError(f"message {n} content must be a string or a list of parts, got {type(content).__name__}")
    if pending:
        raise ValueError(f"'images' lists {len(pending)} more image(s) than the messages have image parts")
    if not any(m["role"] == "assistant" and _has_text(m["content"]) for m in out):
        raise ValueError("no assistant message with text: there is nothing to learn from this record")
    return out


def _has_text(content: Any) -> bool:
    if isinstance(content, str):
        return bool(content)
    return any(p["type"] == "text" and p["text"] for p in content)


def check_record(obj: Any, where: str, base: Path | None) -> Record:
    """A JSON object -> Record, or a ValueError naming what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError(f"a record must be a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        return Record(where, messages=check_messages(obj["messages"], obj.get("images"), base))
    if "text" in obj:
        if not isinstance(obj["text"], str) or not obj["text"]:
            raise ValueError("'text' must be a non-empty string")
        return Record(where, text=obj["text"])
    raise ValueError(f"a record needs 'messages' (a conversation) or 'text', got keys {sorted(obj)[:8]}")


def _raise_collected(name: str, errors: list[str], total: int) -> None:
    more = f"\n  ... and {total - len(errors)} more" if total > len(errors) else ""
    raise DataError(f"{total} bad record(s) in {name}:\n  " + "\n  ".join(errors) + more)


# -- formats --------------------------------------------------------------------------------------
def read_jsonl(path: str | Path) -> ListSource:
    """All records of a JSONL file, validated; image paths resolve against the file's folder."""
    path = Path(path)
    records, errors, bad = [], [], 0
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                records.append(check_record(json.loads(line), where, path.parent))
            except (ValueError, json.JSONDecodeError) as e:
                bad += 1
                if len(errors) < _MAX_REPORTED:
                    errors.append(f"{where}: {e}")
    if bad:
        _raise_collected(str(path), errors, bad)
    if not records:
        raise DataError(f"{path} holds no records")
    return ListSource(str(path), records)


class HFDatasetSource(Source):
    """A `datasets.save_to_disk` folder with a `messages` column (and optionally `images`), read lazily."""

    def __init__(self, folder: str | Path, split: str | None = None):
        try:
            import datasets
        except ModuleNotFoundError:
            raise DataError(
                f"{folder} is a Hugging Face datasets folder, but the optional `datasets` package is not "
                "installed: `pip install datasets`, or convert the data to JSONL"
            ) from None
        ds = datasets.load_from_disk(str(folder))
        if isinstance(ds, datasets.DatasetDict):
            if split is None:
                split = "train" if "train" in ds else (next(iter(ds)) if len(ds) == 1 else None)
            if split not in ds:
                raise DataError(f"{folder} holds splits {list(ds)}: name one as {folder}::SPLIT")
            ds = ds[split]
        if "messages" not in ds.column_names and "text" not in ds.column_names:
            raise DataError(f"{folder}: needs a 'messages' or 'text' column, has {ds.column_names}")
        self.name, self.ds = f"{folder}" + (f"::{split}" if split else ""), ds
        self.has_images = "images" in ds.column_names
        self._validate()

    def _validate(self) -> None:
        # Check messages without decoding any image: only the images column's list lengths are read.
        cols = [c for c in ("messages", "text") if c in self.ds.column_names]
        counts = None
        if self.has_images:
            import pyarrow.compute as pc

            counts = pc.list_value_length(self.ds.data.column("images")).to_pylist()
        errors, bad = [], 0
        for i, row in enumerate(self.ds.select_columns(cols)):
            try:
                # Stand-ins for the row's images: the real ones are only decoded at encode time.
                placeholders = [_PENDING] * (counts[i] or 0) if counts else None
                check_record(self._plain(row, placeholders), f"{self.name} row {i}", None)
            except ValueError as e:
                bad += 1
                if len(errors) < _MAX_REPORTED:
                    errors.append(f"row {i}: {e}")
        if bad:
            _raise_collected(self.name, errors, bad)

    @staticmethod
    def _plain(row: dict[str, Any], images: Any) -> dict[str, Any]:
        out = {k: v for k, v in row.items() if v is not None}
        if images is not None:
            out["images"] = images
        return out

    def __len__(self) -> int:
        return len(self.ds)

    def record(self, i: int) -> Record:
        row = self.ds[i]
        images = [_hf_image(x) for x in (row.get("images") or [])] if self.has_images else None
        return check_record(self._plain({k: row.get(k) for k in ("messages", "text")}, images),
                            f"{self.name} row {i}", None)


def _hf_image(x: Any) -> Any:
    # datasets' Image feature decodes to PIL; undecoded it is {"bytes": ..., "path": ...}.
    if isinstance(x, dict):
        return x.get("bytes") or x.get("path")
    return x


def open_data(paths: str | Path | Sequence[str | Path]) -> Source:
    """Open one or more JSONL files / datasets folders (`folder::split` picks a split) as one source."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise DataError("no training data given")
    sources: list[Source] = []
    for p in paths:
        text = str(p)
        folder, _, split = text.partition("::")
        if Path(folder).is_dir():
            sources.append(HFDatasetSource(folder, split or None))
        elif Path(text).is_file():
            sources.append(read_jsonl(text))
        else:
            raise DataError(f"data path {text} does not exist (expected a .jsonl file or a datasets folder)")
    return sources[0] if len(sources) == 1 else ConcatSource(sources)
