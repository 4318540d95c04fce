"""Conversations in, text out: the loop shared by `Model.generate` / `Model.stream`, the CLI and the server.

Prompts are built by the processor (chat template + images), tokens come from the engine
(`generate.py`), and each row's text from a `TextStream` (stop strings, UTF-8-safe streaming).
A row ends on EOS or a stop token ("stop"), on a stop string ("stop"), or at max_new_tokens
("length"); the batch ends when every row has.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .generate import Batch, generate_tokens
from .sampling import SamplingParams
from .textstream import TextStream


@dataclass
class Completion:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0


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


def run(
    model: Any, conversations: list[list[dict]], params: SamplingParams, eos_ids: tuple[int, ...],
    image_settings: dict[str, Any], chunk_size: int | None = None,
) -> Iterator[tuple[int, str, list[Completion]]]:
    """Yield (row, new text piece, completions so far) as tokens arrive; completions are final at the end."""
    proc = model.processor
    if proc is None:
        raise ValueError(f"{model.source} has no tokenizer.json / chat template: it cannot generate text")
    inputs = proc.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True, **image_settings)
    prompt_len = int(inputs["input_ids"].shape[1])
    limit = model.config.text.max_position_embeddings
    if prompt_len + params.max_new_tokens > limit:
        raise ValueError(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the model's "
            f"context of {limit}; shorten the conversation, lower max_image_tokens, or lower max_new_tokens"
        )
    stop_ids = set(params.stop_token_ids)
    if not params.ignore_eos:
        stop_ids |= set(eos_ids) | ({proc.eos_token_id} if proc.eos_token_id is not None else set())
    done = [Completion(prompt_tokens=int(n)) for n in inputs["attention_mask"].sum(-1).tolist()]
    streams = [TextStream(proc.decode, params.stop) for _ in conversations]
    batch = Batch.from_inputs(inputs, model.device)
    engine_eos = tuple(sorted(stop_ids))
    for tokens in generate_tokens(model.module, batch, params, engine_eos, chunk_size):
        for row, tok in enumerate(tokens.tolist()):
            s = streams[row]
            if s.finished:
                continue
            if tok in stop_ids:
                piece = s.finish("stop")
            else:
                done[row].token_ids.append(tok)
                piece = s.push(tok)
                if not s.finished and len(done[row].token_ids) == params.max_new_tokens:
                    piece += s.finish("length")
            done[row].text, done[row].finish_reason = s.text, s.finish_reason
            if piece:
                yield row, piece, done
        if all(s.finished for s in streams):  # every row ends by max_new_tokens at the latest
            break
    yield -1, "", done
