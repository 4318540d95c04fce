"""Benchmark rows from the files people already have: VLMEvalKit TSVs, JSONL, parquet, `datasets.save_to_disk`.

A row is a plain dict of the file's columns. Images become sources the processor and an HTTP
server both read: a `data:` URL (base64 cells, parquet/Arrow image structs) or a file path.

VLMEvalKit's TSVs (vlmeval/dataset/image_base.py, `ImageBaseDataset.prepare_tsv`) store each image
once: a row whose `image` cell is short and equals another row's `index` uses that row's image (MME's
question pairs, MMBench's circular copies). Multi-image rows hold a Python/JSON list of base64 strings.
"""

from __future__ import annotations

import ast
import base64
import csv
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMATS = ("tsv", "jsonl", "parquet", "arrow")


class DataError(ValueError):
    """A benchmark file is missing, unreadable or lacks a column; the message names the file and the fix."""


@dataclass(frozen=True)
class Image:
    """One image: `source` is what the model is given (data: URL or path); `key` identifies it across rows."""

    source: str
    key: str


def sniff_mime(data: bytes) -> str:
    """The MIME type of encoded image bytes from their magic number (image/png when unknown)."""
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if data[:4] == b"GIF8":
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:2] == b"BM":
        return "image/bmp"
    return "image/png"


def data_url(data: bytes) -> str:
    return f"data:{sniff_mime(data)};base64,{base64.b64encode(data).decode()}"


def b64_data_url(text: str) -> str:
    """A raw base64 cell -> a data: URL (the MIME type read from the first decoded bytes)."""
    text = "".join(text.split())
    head = base64.b64decode(text[:64] + "=" * (-len(text[:64]) % 4), validate=False)
    return f"data:{sniff_mime(head)};base64,{text}"


def detect_format(path: Path) -> str:
    if path.is_dir():
        return "arrow"
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".csv"):
        return "tsv"
    if suffix in (".jsonl", ".json"):
        return "jsonl"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix == ".arrow":
        return "arrow"
    raise DataError(f"{path}: unknown file type {suffix!r}; give a .tsv (VLMEvalKit), .jsonl, .parquet file or a "
                    "datasets.save_to_disk folder")


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Every row of a benchmark file, as dicts (images still as stored; see `images`)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"--data {path}: no such file or folder")
    fmt = detect_format(path)
    if fmt == "tsv":
        return list(_tsv(path))
    if fmt == "jsonl":
        return list(_jsonl(path))
    return _arrow_rows(path, fmt)


def _tsv(path: Path) -> Iterator[dict[str, Any]]:
    csv.field_size_limit(sys.maxsize)  # base64 image cells are megabytes
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        for row in reader:
            yield {k: _tsv_value(v) for k, v in row.items() if k is not None}


def _tsv_value(value: str | None) -> Any:
    # pandas (VLMEvalKit's writer) leaves missing cells empty and floats as "nan"
    return None if value in (None, "", "nan", "NaN") else value


def _jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        yield from json.loads(text)
        return
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not JSON ({e})") from e


def _pyarrow():
    try:
        import pyarrow  # noqa: F401
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError as e:
        raise DataError("reading parquet files and datasets.save_to_disk folders needs pyarrow: "
                        "pip install pyarrow (or pip install 'lfm2vl[eval]')") from e
    return sys.modules["pyarrow"]


def _arrow_rows(path: Path, fmt: str) -> list[dict[str, Any]]:
    pa = _pyarrow()
    if fmt == "parquet":
        return pa.parquet.read_table(path).to_pylist()
    files = sorted(path.glob("*.arrow")) if path.is_dir() else [path]
    if not files:
        raise DataError(f"{path}: no .arrow files (a datasets.save_to_disk folder holds data-*.arrow files; "
                        "for a DatasetDict, point --data at one split's folder)")
    rows: list[dict[str, Any]] = []
    for file in files:
        with pa.memory_map(str(file)) as source:
            try:
                table = pa.ipc.open_stream(source).read_all()  # what datasets writes
            except pa.ArrowInvalid:
                table = pa.ipc.open_file(source).read_all()
        rows.extend(table.to_pylist())
    return rows


# -- columns ---------------------------------------------------------------------------------------

ALIASES = {  # what the other layouts call VLMEvalKit's columns
    "index": ("index", "id", "question_id", "questionId", "pid", "idx", "sample_id"),
    "answer": ("answer", "answers"),
    "l2-category": ("l2-category", "l2_category"),
    "category": ("category", "question_type", "data_type", "sub_task", "subject", "task", "capability"),
}


def column(row: dict[str, Any], name: str, default: Any = None) -> Any:
    for key in ALIASES.get(name, (name,)):
        if row.get(key) is not None:
            return row[key]
    return default


def require(rows: list[dict[str, Any]], columns: tuple[str, ...], where: str) -> None:
    """Every column a task needs is there (under its name or an alias), else one error naming them."""
    if not rows:
        raise DataError(f"{where}: the file has no rows")
    have = set().union(*(r.keys() for r in rows[:50]))
    missing = [c for c in columns if not any(a in have for a in ALIASES.get(c, (c,)))]
    if missing:
        raise DataError(f"{where}: missing column(s) {', '.join(missing)} (the file has: {', '.join(sorted(have))})")


def parse_list(value: Any) -> list:
    """A list cell: a real list, or its text as VLMEvalKit/pandas wrote it ("['a', 'b']" or JSON)."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    text = str(value).strip()
    if text.startswith("["):
        for parse in (json.loads, ast.literal_eval):
            try:
                out = parse(text)
                if isinstance(out, list):
                    return out
            except (ValueError, SyntaxError):
                continue
    return [value]


def row_ids(rows: list[dict[str, Any]]) -> list[str]:
    """Each row's id: the first of `index`, `id`, `question_id`, .. whose values are unique (MME's
    question_id names the image, shared by two rows), else the row number."""
    for key in ALIASES["index"]:
        if all(r.get(key) is not None for r in rows):
            ids = [str(r[key]) for r in rows]
            if len(set(ids)) == len(ids):
                return ids
    return [str(n) for n in range(len(rows))]


# -- images ----------------------------------------------------------------------------------------

IMAGE_COLUMNS = ("image", "images", "decoded_image", "image_path")


def images(rows: list[dict[str, Any]], base: Path) -> list[list[Image]]:
    """Each row's images, in order. `image_1`.. columns (BLINK, MMMU layouts) come after `image`."""
    by_index = {str(r["index"]): r for r in rows if r.get("index") is not None}
    out = []
    for n, row in enumerate(rows):
        found: list[Image] = []
        for col in IMAGE_COLUMNS:
            if row.get(col) is not None:
                found = _cell_images(row[col], col, row, by_index, base, f"row {n}")
                break
        numbered = sorted((k for k in row if k.startswith("image_") and k[6:].isdigit()), key=lambda k: int(k[6:]))
        for k in numbered:
            if row[k] is not None:
                found += _cell_images(row[k], k, row, by_index, base, f"row {n}")
        out.append(found)
    return out


def _cell_images(cell: Any, col: str, row: dict, by_index: dict, base: Path, where: str) -> list[Image]:
    if isinstance(cell, dict):  # a datasets Image feature: {"bytes": ..., "path": ...}
        if cell.get("bytes"):
            data = cell["bytes"]
            return [Image(data_url(data), f"bytes:{hash(data)}")]
        if cell.get("path"):
            return [_path_image(cell["path"], base, where)]
        return []
    if isinstance(cell, (bytes, bytearray)):
        return [Image(data_url(bytes(cell)), f"bytes:{hash(bytes(cell))}")]
    if isinstance(cell, (list, tuple)):
        return [img for c in cell for img in _cell_images(c, col, row, by_index, base, where)]
    text = str(cell).strip()
    if text.startswith("[") and len(text) < 2_000_000 and ("'" in text[:3] or '"' in text[:3]):
        return [img for c in parse_list(text) for img in _cell_images(c, col, row, by_index, base, where)]
    if col == "image_path" or (len(text) < 256 and not text.startswith("data:")):
        if col != "image_path" and text in by_index and by_index[text] is not row:
            # VLMEvalKit: a short image cell is the index of the row that holds the image
            target = by_index[text]
            return _cell_images(target.get("image"), "image", target, by_index, base, where)
        return [_path_image(text, base, where)]
    if text.startswith("data:"):
        return [Image(text, f"row:{row.get('index', id(row))}:{col}")]
    return [Image(b64_data_url(text), f"row:{row.get('index', id(row))}:{col}")]


def _path_image(text: str, base: Path, where: str) -> Image:
    path = Path(text).expanduser()
    if not path.is_absolute():
        path = base / path
    if not path.is_file():
        raise DataError(f"{where}: image file {text!r} not found (relative paths are read from {base})")
    return Image(str(path), f"path:{path}")
