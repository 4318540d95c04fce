"""Reusable cache invariants: any change to the model, cache or engine must keep them.

Sequences are given as (ids (T,), image features or None). The reference for every row is one
full forward of that row alone, without a cache.
"""

import torch

from lfm2vl.model.lfm2vl import Lfm2Vl

ATOL = 1e-4
CAUSES = "usual causes: cache offset, attention mask, RoPE position, or the conv-state window"


def _feats_for(ids: torch.Tensor, feats: torch.Tensor | None, image_token_id: int, a: int, b: int):
    if feats is None:
        return None
    before = int((ids[:a] == image_token_id).sum())
    inside = int((ids[a:b] == image_token_id).sum())
    return feats[before : before + inside] if inside else None


@torch.no_grad()
def full_logits(model: Lfm2Vl, ids: torch.Tensor, feats: torch.Tensor | None) -> torch.Tensor:
    return model(ids[None], image_features=feats)[0]  # (T, V)


@torch.no_grad()
def assert_decode_matches_full(model: Lfm2Vl, rows: list[tuple[torch.Tensor, torch.Tensor | None]], prefix: list[int]) -> None:
    """Prefill row i to prefix[i] in its own slot, then decode the rest one token per step with all
    unfinished rows in one batch (rows at different lengths; finished rows drop out): == full forward."""
    image_id = model.cfg.image_token_id
    cache = model.make_cache(len(rows) + 1, max(len(ids) for ids, _ in rows))
    slots = list(range(1, len(rows) + 1))  # slot 0 stays empty: batches are not always contiguous from 0
    got: list[list[torch.Tensor]] = [[] for _ in rows]
    for i, ((ids, feats), n) in enumerate(zip(rows, prefix)):
        view = cache.view([slots[i]], n)
        got[i].append(model(ids[None, :n], image_features=_feats_for(ids, feats, image_id, 0, n), cache=view)[0])
    pos = list(prefix)
    while True:
        live = [i for i, (ids, _) in enumerate(rows) if pos[i] < len(ids)]
        if not live:
            break
        step_ids = torch.stack([rows[i][0][pos[i] : pos[i] + 1] for i in live])  # (B, 1)
        feats = [_feats_for(rows[i][0], rows[i][1], image_id, pos[i], pos[i] + 1) for i in live]
        feats = [f for f in feats if f is not None]
        view = cache.view([slots[i] for i in live], 1)
        out = model(step_ids, image_features=torch.cat(feats) if feats else None, cache=view)
        for b, i in enumerate(live):
            got[i].append(out[b])
            pos[i] += 1
    for i, (ids, feats) in enumerate(rows):
        diff = (torch.cat(got[i]) - full_logits(model, ids, feats)).abs().max().item()
        assert diff <= ATOL, f"row {i}: step-by-step decode differs from the full forward by {diff:.3g} ({CAUSES})"


@torch.no_grad()
def assert_chunked_prefill_matches_full(model: Lfm2Vl, ids: torch.Tensor, feats: torch.Tensor | None, splits: list[int]) -> None:
    image_id = model.cfg.image_token_id
    cache = model.make_cache(2, len(ids))
    bounds = [0, *splits, len(ids)]
    got = torch.cat([
        model(ids[None, a:b], image_features=_feats_for(ids, feats, image_id, a, b), cache=cache.view([1], b - a))[0]
        for a, b in zip(bounds, bounds[1:])
    ])
    diff = (got - full_logits(model, ids, feats)).abs().max().item()
    assert diff <= ATOL, f"prefill in chunks {splits} differs from one prefill by {diff:.3g} ({CAUSES})"
