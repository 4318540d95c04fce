"""OpenAI request bodies -> our messages and generation options; our events -> OpenAI response fields.

Every field is type- and range-checked here, with OpenAI's field name as the error's `param`.
Fields we cannot honour (n > 1, tools, penalties other than repetition_penalty, ...) are refused
with a message, never silently dropped; fields that change nothing (user, metadata, ...) are accepted.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from ..budget import check_target
from ..sampling import MAX_LOGPROBS
from .errors import ApiError

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
FLOAT_FIELDS = {"temperature": "temperature", "top_p": "top_p", "min_p": "min_p",
                "repetition_penalty": "repetition_penalty"}
INT_FIELDS = {"top_k": "top_k", "seed": "seed", "min_tokens": "min_new_tokens"}
BOOL_FIELDS = {"ignore_eos": "ignore_eos"}
# The image budget (docs/processing.md): request fields with the processor's setting names.
IMAGE_INT_FIELDS = ("min_image_tokens", "max_image_tokens", "min_tiles", "max_tiles")
IMAGE_BOOL_FIELDS = ("do_image_splitting", "use_thumbnail")
# Accepted and ignored: they change nothing about the answer.
IGNORED = {"model", "messages", "prompt", "stream", "stream_options", "user", "metadata", "store", "service_tier",
           "parallel_tool_calls"}
# Refused unless given their neutral value.
NEUTRAL = {"frequency_penalty": 0, "presence_penalty": 0, "logit_bias": None, "tools": None, "tool_choice": None,
           "functions": None, "function_call": None, "response_format": None, "best_of": 1, "echo": False,
           "suffix": None, "audio": None, "modalities": None, "prediction": None, "reasoning_effort": None}
NEUTRAL_HINT = {"frequency_penalty": "use repetition_penalty", "presence_penalty": "use repetition_penalty"}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_known(body: dict, known: set[str]) -> None:
    for key, neutral in NEUTRAL.items():
        value = body.get(key)
        if value is None or value == neutral or value == {} or value == []:
            continue
        if key == "response_format" and isinstance(value, dict) and value.get("type") == "text":
            continue
        hint = f"; {NEUTRAL_HINT[key]}" if key in NEUTRAL_HINT else ""
        raise ApiError(400, f"{key} is not supported by this server{hint}", key, "unsupported_parameter")
    unknown = sorted(set(body) - known - IGNORED - set(NEUTRAL))
    if unknown:
        raise ApiError(400, f"unknown field(s) {unknown}; docs/serving.md lists the supported ones", unknown[0],
                       "unknown_parameter")


def _max_tokens(body: dict) -> int | None:
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if value is not None:
            if not _is_int(value) or value < 1:
                raise ApiError(400, f"{key} must be a positive integer, got {value!r}", key)
            return value
    return None


def sampling_options(body: dict) -> dict[str, Any]:
    """Sampling and image-budget options (keywords of Model.request) from the fields the client set."""
    if body.get("n") not in (None, 1):
        raise ApiError(400, "only n=1 is supported (send several requests instead)", "n")
    opts: dict[str, Any] = {}
    max_tokens = _max_tokens(body)
    if max_tokens is not None:
        opts["max_new_tokens"] = max_tokens
    for key, name in FLOAT_FIELDS.items():
        value = body.get(key)
        if value is not None:
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ApiError(400, f"{key} must be a finite number, got {value!r}", key)
            opts[name] = float(value)
    try:  # with max_image_tokens "auto": the device-aware budget (Model.plan_budget)
        target = check_target(body.get("max_image_tokens"), body.get("latency_target"))
    except ValueError as e:
        raise ApiError(400, str(e), "latency_target") from None
    if target is not None:
        opts["latency_target"] = target
    for key, name in {**INT_FIELDS, **{k: k for k in IMAGE_INT_FIELDS}}.items():
        value = body.get(key)
        if key == "max_image_tokens" and value == "auto":
            opts[name] = value
        elif value is not None:
            if not _is_int(value):
                raise ApiError(400, f"{key} must be an integer, got {value!r}", key)
            opts[name] = value
    if opts.get("seed") is not None and not -(2**63) <= opts["seed"] < 2**64:
        raise ApiError(400, f"seed must be a 64-bit integer, got {opts['seed']}", "seed")
    for key, name in {**BOOL_FIELDS, **{k: k for k in IMAGE_BOOL_FIELDS}}.items():
        value = body.get(key)
        if value is not None:
            if not isinstance(value, bool):
                raise ApiError(400, f"{key} must be true or false, got {value!r}", key)
            opts[name] = value
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 16:
            raise ApiError(400, "stop must be a non-empty string or a list of at most 16 of them", "stop")
        if stops:
            opts["stop"] = tuple(stops)
    stop_ids = body.get("stop_token_ids")
    if stop_ids is not None:
        if not isinstance(stop_ids, list) or not all(_is_int(t) and t >= 0 for t in stop_ids):
            raise ApiError(400, "stop_token_ids must be a list of token ids", "stop_token_ids")
        opts["stop_token_ids"] = tuple(stop_ids)
    return opts


def chat_logprobs(body: dict) -> int | None:
    """Chat: `logprobs` (bool) + `top_logprobs` (0..20) -> alternatives per token, or None when off."""
    logprobs, top = body.get("logprobs"), body.get("top_logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise ApiError(400, "logprobs must be true or false", "logprobs")
    if top is not None:
        if not _is_int(top) or not 0 <= top <= MAX_LOGPROBS:
            raise ApiError(400, f"top_logprobs must be an integer in [0, {MAX_LOGPROBS}]", "top_logprobs")
        if not logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    return (top or 0) if logprobs else None


def completion_logprobs(body: dict) -> int | None:
    """Completions: `logprobs` is the number of alternatives (0..20), or null."""
    value = body.get("logprobs")
    if value is None:
        return None
    if not _is_int(value) or not 0 <= value <= MAX_LOGPROBS:
        raise ApiError(400, f"logprobs must be an integer in [0, {MAX_LOGPROBS}] or null", "logprobs")
    return value


CHAT_FIELDS = {"n", "max_tokens", "max_completion_tokens", "stop", "stop_token_ids", "logprobs", "top_logprobs",
               "latency_target", *FLOAT_FIELDS, *INT_FIELDS, *BOOL_FIELDS, *IMAGE_INT_FIELDS, *IMAGE_BOOL_FIELDS}


def check_chat_fields(body: dict) -> None:
    _check_known(body, CHAT_FIELDS)


def check_completion_fields(body: dict) -> None:
    _check_known(body, CHAT_FIELDS - {"top_logprobs", "max_completion_tokens", "latency_target"}
                 - set(IMAGE_INT_FIELDS) - set(IMAGE_BOOL_FIELDS))


def chat_messages(body: dict, max_images: int) -> tuple[list[dict], list[tuple[str, str]]]:
    """messages -> (our messages, [(image_url, param)]); image parts hold the index of their url for now."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "messages must be a non-empty list", "messages")
    out: list[dict] = []
    images: list[tuple[str, str]] = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"{where} must be an object with role and content", where)
        role = m.get("role")
        if role not in ROLES:
            raise ApiError(400, f"{where}.role must be one of {sorted(ROLES)}, got {role!r}", f"{where}.role")
        content = m.get("content")
        if isinstance(content, str):
            out.append({"role": ROLES[role], "content": content})
            continue
        if not isinstance(content, list) or not content:
            raise ApiError(400, f"{where}.content must be a string or a non-empty list of parts", f"{where}.content")
        parts: list[dict] = []
        for j, part in enumerate(content):
            param = f"{where}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image_url" and role == "user":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                if not isinstance(url, str) or not url:
                    raise ApiError(400, f"{param}.image_url.url must be a string", f"{param}.image_url")
                parts.append({"type": "image", "image": len(images)})
                images.append((url, f"{param}.image_url"))
            elif kind == "image_url":
                raise ApiError(400, f"{param}: images go in user messages", param)
            else:
                raise ApiError(400, f"{param}: unsupported content part {kind!r}; use 'text' or 'image_url'", param)
        out.append({"role": ROLES[role], "content": parts})
    if len(images) > max_images:
        raise ApiError(400, f"the request has {len(images)} images; this server accepts at most {max_images} per "
                       "request (server flag --max-images)", "messages", "too_many_images")
    return out, images


def fill_images(messages: list[dict], load: Callable[[int], Any]) -> list[dict]:
    """Replace each image part's index with `load(index)` (the decoded image)."""
    return [m if isinstance(m["content"], str) else
            {**m, "content": [{**p, "image": load(p["image"])} if p["type"] == "image" else p for p in m["content"]]}
            for m in messages]


def completion_prompt(body: dict) -> str | list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str) and prompt:
        return prompt
    if isinstance(prompt, list) and prompt and all(_is_int(t) and t >= 0 for t in prompt):
        return prompt
    raise ApiError(400, "prompt must be one non-empty string (or one list of token ids); send one request per prompt",
                   "prompt")


# -- responses ---------------------------------------------------------------------------------------------
def finish_reason(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def token_string(raw: bytes) -> str:
    """A token's text; a piece of a multi-byte character as 'bytes:\\xNN...' (vLLM's convention)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def chat_logprob_entry(token: int, logprob: float, top: tuple[tuple[int, float], ...],
                       token_bytes: Callable[[int], bytes]) -> dict:
    def one(t: int, lp: float) -> dict:
        raw = token_bytes(t)
        return {"token": token_string(raw), "logprob": lp, "bytes": list(raw)}

    return {**one(token, logprob), "top_logprobs": [one(t, lp) for t, lp in top]}


def completion_logprobs_block(entries: list[tuple[int, float, tuple, int]],
                              token_bytes: Callable[[int], bytes]) -> dict:
    """The legacy completions `logprobs` object; entries are (token, logprob, top, offset of its text)."""
    def text(t: int) -> str:
        return token_string(token_bytes(t))

    return {"tokens": [text(t) for t, _, _, _ in entries], "token_logprobs": [lp for _, lp, _, _ in entries],
            "top_logprobs": [{text(t): lp for t, lp in top} for _, _, top, _ in entries],
            "text_offset": [offset for _, _, _, offset in entries]}
