"""Conversations in, engine requests out: the step shared by `Model.generate` / `stream` / `complete`,
the CLI and the evaluation harness.

The processor renders the chat and tokenizes it (images stay lazy, see processing/prompt.py); the
request ends on EOS or a stop token ("stop"), a stop string ("stop"), or max_new_tokens ("length").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .engine import Request
from .sampling import SamplingParams


def checkpoint_defaults(folder: Path | None) -> tuple[SamplingParams, tuple[int, ...]]:
    """Sampling defaults and EOS ids from the checkpoint's generation_config.json (greedy if it says nothing)."""
    path = None if folder is None else Path(folder) / "generation_config.json"
    if path is None or not path.exists():
        return SamplingParams(), ()
    g = json.loads(path.read_text())
    eos = g.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    params = SamplingParams()
    if g.get("do_sample"):
        params = params.with_overrides(
            temperature=g.get("temperature", 1.0), top_k=g.get("top_k", 0) or 0, top_p=g.get("top_p", 1.0),
            min_p=g.get("min_p", 0.0) or 0.0,
        )
    params = params.with_overrides(
        repetition_penalty=g.get("repetition_penalty"), max_new_tokens=g.get("max_new_tokens"),
    )
    return params, eos_ids


def normalize_conversations(messages: Any) -> tuple[list[list[dict]], bool]:
    """One conversation (list of messages), a batch (list of conversations), or a bare user string."""
    if isinstance(messages, str):
        return [[{"role": "user", "content": messages}]], False
    if not isinstance(messages, (list, tuple)) or not messages:
        raise TypeError("messages must be a string, a list of {'role', 'content'} dicts, or a list of such lists")
    if isinstance(messages[0], dict):
        return [list(messages)], False
    if all(isinstance(c, (list, tuple)) and c and isinstance(c[0], dict) for c in messages):
        return [list(c) for c in messages], True
    raise TypeError("messages must be a list of {'role', 'content'} dicts, or a list of such lists")


def stop_token_ids(params: SamplingParams, eos_ids: tuple[int, ...], tokenizer_eos: int | None) -> frozenset[int]:
    """The ids that end a request: stop_token_ids, plus the checkpoint's and tokenizer's EOS unless ignore_eos."""
    ids = set(params.stop_token_ids)
    if not params.ignore_eos:
        ids |= set(eos_ids) | ({tokenizer_eos} if tokenizer_eos is not None else set())
    return frozenset(ids)


def make_text_request(
    processor: Any, prompt: str | list[int], params: SamplingParams, eos_ids: tuple[int, ...], vocab_size: int,
) -> Request:
    """A raw prompt (no chat template) -> an engine request. Text is tokenized as is, with BOS first when
    the tokenizer has one (as the reference tokenizer's default); token ids are used unchanged."""
    if isinstance(prompt, str):
        ids = processor.text_prompt(prompt).ids
        bos = processor.text_tokenizer.bos_token_id
        if bos is not None and ids[:1] != [bos]:
            ids = [bos, *ids]
    else:
        ids = list(prompt)
        bad = [t for t in ids if not 0 <= t < vocab_size or t == processor.image_token_id]
        if bad:
            raise ValueError(f"prompt token ids must be in [0, {vocab_size}) and not the image token; got {bad[:5]}")
    return Request(ids, params, stop_token_ids(params, eos_ids, processor.eos_token_id))


def make_request(
    processor: Any, conversation: list[dict], params: SamplingParams, eos_ids: tuple[int, ...],
    image_settings: dict[str, Any],
) -> Request:
    """One conversation -> an engine request (prompt ids, lazy images, content key, stop ids)."""
    prompt = processor.prompt(conversation, **image_settings)
    return Request(
        prompt.ids, params, stop_token_ids(params, eos_ids, processor.eos_token_id), prompt.images,
        prompt.image_token_id,
    )
