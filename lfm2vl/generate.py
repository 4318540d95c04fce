"""Token generation over the hybrid cache: encode images once, prefill, then decode one token a step.

The engine knows nothing about text (STYLE §3.7): it yields token ids, one (B,) tensor per step,
and the caller decides when a row is finished (EOS, stop strings) and stops iterating when all
are. Prefill can run in chunks (same logits as one pass; bounded activation memory).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .cache import HybridCache
from .model.lfm2vl import Lfm2Vl
from .sampling import SamplingParams, next_tokens


@dataclass(frozen=True)
class Batch:
    """Model inputs for a batch of prompts, left-padded (the processor's output)."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    pixel_values: torch.Tensor | None = None  # (N, P, 768) padded or (N_real, 768) packed
    pixel_attention_mask: torch.Tensor | None = None  # (N, P)
    spatial_shapes: torch.Tensor | None = None  # (N, 2), on the CPU

    @classmethod
    def from_inputs(cls, inputs: dict, device: torch.device) -> Batch:
        def dev(x):
            return None if x is None else x.to(device)

        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        return cls(
            input_ids=ids.to(device),
            attention_mask=(torch.ones_like(ids) if mask is None else mask).to(device),
            pixel_values=dev(inputs.get("pixel_values")),
            pixel_attention_mask=dev(inputs.get("pixel_attention_mask")),
            spatial_shapes=inputs.get("spatial_shapes"),
        )


def prefill(
    model: Lfm2Vl, cache: HybridCache, embeds: torch.Tensor, attention_mask: torch.Tensor, chunk_size: int | None = None
) -> torch.Tensor:
    """Run the prompt embeddings (B, T, D) through the model into `cache`; returns last logits (B, V)."""
    t = embeds.shape[1]
    step = chunk_size or t
    logits = None
    for s in range(0, t, step):
        logits = model.forward_embeds(embeds[:, s : s + step], attention_mask[:, s : s + step], cache=cache, logits_to_keep=1)
    return logits[:, -1]


@torch.inference_mode()
def generate_tokens(
    model: Lfm2Vl,
    batch: Batch,
    params: SamplingParams,
    eos_token_ids: tuple[int, ...] = (),
    chunk_size: int | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B,) on the CPU, for up to `params.max_new_tokens` steps."""
    ids, mask = batch.input_ids, batch.attention_mask
    b, t = ids.shape
    weight = model.language_model.embed_tokens.weight
    cache = HybridCache(model.cfg.text, b, t + params.max_new_tokens, weight.device, weight.dtype)
    feats = None
    if batch.pixel_values is not None:
        feats = model.encode_images(batch.pixel_values, batch.spatial_shapes, batch.pixel_attention_mask)
    logits = prefill(model, cache, model.embed(ids, feats), mask, chunk_size)
    history = ids.masked_fill(mask == 0, -1)  # (B, L) tokens seen so far, padding excluded
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=weight.device).manual_seed(params.seed)
    banned = torch.tensor(sorted(set(eos_token_ids) | set(params.stop_token_ids)), device=weight.device, dtype=torch.long)
    ones = torch.ones(b, 1, dtype=mask.dtype, device=mask.device)
    for step in range(params.max_new_tokens):
        tok = next_tokens(logits, history, params, generator, banned if step < params.min_new_tokens else None)
        yield tok.cpu()
        if step + 1 == params.max_new_tokens:
            return
        history = torch.cat([history, tok[:, None]], dim=1)
        logits = model.forward_embeds(model.language_model.embed_tokens(tok[:, None]), ones, cache=cache)[:, -1]
