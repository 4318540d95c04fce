"""Chat messages -> prompt text with the checkpoint's own Jinja chat template, plus the images in order.

Mirrors `ProcessorMixin.apply_chat_template` and `render_jinja_template` of transformers: the same
sandboxed Jinja environment (trim_blocks, lstrip_blocks, loopcontrols, `tojson`, `raise_exception`,
`strftime_now`), `None`-valued keys dropped, OpenAI `image_url` parts turned into HF image parts, and
the tokenizer's special tokens (`bos_token`, ...) passed to the template. Messages follow the HF /
OpenAI shape: `content` is a string or a list of parts, `{"type": "text", "text": ...}`,
`{"type": "image", "image" | "url" | "path" | "base64": <source>}` or
`{"type": "image_url", "image_url": {"url": ...}}`.

Control tokens typed by the user (always `<image>`) are marked before rendering, so that only the
image parts become image slots (tokens.py encodes the marked pieces as text).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .tokens import mark_control_tokens, unmark

_IMAGE_KEYS = ("image", "url", "path", "base64")  # the keys transformers reads, in its order


@dataclass(frozen=True)
class ChatPrompt:
    text: str  # the rendered prompt, exactly as the reference renders it
    marked: str  # the same with user-typed control tokens wrapped in markers (see tokens.py)
    images: tuple[Any, ...]  # image sources of the image parts, in order (None for a part without one)


def load_chat_template(folder: str | Path) -> str | None:
    """The template a checkpoint folder ships, in transformers' order of preference."""
    folder = Path(folder)
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    for name in ("chat_template.json", "processor_config.json", "tokenizer_config.json"):
        path = folder / name
        if path.is_file():
            template = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
            if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
                template = {t.get("name"): t.get("template") for t in template}.get("default")
            if isinstance(template, dict):
                template = template.get("default")
            if isinstance(template, str):
                return template
    return None


def _image_source(part: dict[str, Any]) -> Any:
    if part.get("type") == "image_url":
        info = part.get("image_url")
        return info.get("url") if isinstance(info, dict) else info
    return next((part[k] for k in _IMAGE_KEYS if k in part), None)


GENERATION_ROLES = ("system", "user", "assistant")


def check_conversation(messages: Any) -> None:
    """What generation refuses, as training does: unknown roles and messages without content."""
    if isinstance(messages, dict) or not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("a conversation is a non-empty list of {'role': ..., 'content': ...} messages")
    for n, m in enumerate(messages):
        if not isinstance(m, dict):
            continue  # dataclass messages and other shapes: normalize_messages names the problem
        if m.get("role") not in GENERATION_ROLES:
            raise ValueError(f"message {n} has role {m.get('role')!r}; use one of {list(GENERATION_ROLES)}")
        content = m.get("content")
        if content is None or (isinstance(content, (list, tuple)) and not content):
            raise ValueError(f"message {n} ({m['role']}) has no content: give a string or a list of parts")


def normalize_messages(messages: Any) -> tuple[list[dict[str, Any]], list[Any]]:
    """Messages as the template expects them, and the image sources in order of appearance."""
    if isinstance(messages, dict) or not isinstance(messages, (list, tuple)):
        raise TypeError("messages must be a list of {'role': ..., 'content': ...} dicts")
    normalized, images = [], []
    for message in messages:
        if dataclasses.is_dataclass(message) and not isinstance(message, type):
            message = dataclasses.asdict(message)
        if not isinstance(message, dict) or "role" not in message:
            raise TypeError(f"each message must be a dict with a 'role', got {message!r:.80}")
        message = {k: v for k, v in message.items() if v is not None}
        content = message.get("content")
        if isinstance(content, (list, tuple)):
            parts = []
            for part in content:
                part = {"type": "text", "text": part} if isinstance(part, str) else part
                if not isinstance(part, dict) or "type" not in part:
                    raise TypeError(f"content parts must be dicts with a 'type', got {part!r:.80}")
                if part["type"] in ("image", "image_url"):
                    images.append(_image_source(part))
                    if part["type"] == "image_url":  # OpenAI -> HF, as transformers converts it
                        part = {"type": "image", "url": images[-1]}
                elif part["type"] != "text":
                    raise ValueError(f"LFM2-VL messages hold text and image parts, got a {part['type']!r} part")
                parts.append(part)
            message["content"] = parts
        elif content is not None and not isinstance(content, str):
            raise TypeError(f"message content must be a string or a list of parts, got {type(content).__name__}")
        normalized.append(message)
    return normalized, images


def _plain(value: Any) -> Any:
    """JSON-like data only: the sandbox never sees images or arrays (transformers' `_plain_template_data`)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return f"<{type(value).__name__}>"


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` renders its body (assistant masks are not tracked here)."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=8)
def compile_template(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def render(
    messages: Any,
    template: str,
    special_tokens: dict[str, str],
    add_generation_prompt: bool = True,
    protected_tokens: tuple[str, ...] = ("<image>",),
    **template_kwargs: Any,
) -> ChatPrompt:
    """Render `messages`; occurrences of `protected_tokens` in any user string come out marked."""
    normalized, images = normalize_messages(messages)
    plain = _plain(normalized)
    marked_messages = mark_control_tokens(plain, protected_tokens)
    marked_kwargs = mark_control_tokens(_plain(template_kwargs), protected_tokens)
    variables = {"tools": None, "documents": None, **special_tokens, **marked_kwargs}
    marked = compile_template(template).render(
        messages=marked_messages, add_generation_prompt=add_generation_prompt, **variables
    )
    return ChatPrompt(text=unmark(marked), marked=marked, images=tuple(images))
