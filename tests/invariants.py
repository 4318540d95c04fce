"""Reusable cache invariants (STYLE §3.5): any change to the model, cache or engine must keep them."""

import torch

from lfm2vl.cache import HybridCache
from lfm2vl.model.lfm2vl import Lfm2Vl

ATOL = 1e-4
CAUSES = "usual causes: cache offset, attention mask, RoPE position, or the conv-state window"


def _cache(model: Lfm2Vl, b: int, n: int) -> HybridCache:
    w = model.language_model.embed_tokens.weight
    return HybridCache(model.cfg.text, b, n, w.device, w.dtype)


@torch.no_grad()
def full_logits(model: Lfm2Vl, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return model.forward_embeds(embeds, mask)


@torch.no_grad()
def assert_decode_matches_full(model: Lfm2Vl, embeds: torch.Tensor, mask: torch.Tensor, prefix: int) -> None:
    """Prefill `prefix` positions, then feed the rest one at a time: logits == one full forward."""
    full = full_logits(model, embeds, mask)
    cache = _cache(model, embeds.shape[0], embeds.shape[1])
    steps = [model.forward_embeds(embeds[:, :prefix], mask[:, :prefix], cache=cache)]
    for t in range(prefix, embeds.shape[1]):
        steps.append(model.forward_embeds(embeds[:, t : t + 1], mask[:, t : t + 1], cache=cache))
    got = torch.cat(steps, dim=1)
    real = mask.bool()
    diff = (got - full).abs()[real].max().item()
    assert diff <= ATOL, f"step-by-step decode differs from the full forward by {diff:.3g} ({CAUSES})"


@torch.no_grad()
def assert_chunked_prefill_matches_full(model: Lfm2Vl, embeds: torch.Tensor, mask: torch.Tensor, splits: list[int]) -> None:
    full = full_logits(model, embeds, mask)
    cache = _cache(model, embeds.shape[0], embeds.shape[1])
    bounds = [0, *splits, embeds.shape[1]]
    got = torch.cat(
        [model.forward_embeds(embeds[:, a:b], mask[:, a:b], cache=cache) for a, b in zip(bounds, bounds[1:])], dim=1
    )
    diff = (got - full).abs()[mask.bool()].max().item()
    assert diff <= ATOL, f"prefill in chunks {splits} differs from one prefill by {diff:.3g} ({CAUSES})"
