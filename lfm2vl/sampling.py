"""Logits processing and sampling: pure functions of (logits, history, params).

Definitions follow transformers' logits processors so results are comparable: repetition
penalty over every token already in the sequence (prompt included), then temperature, top-k,
top-p, min-p. temperature 0 (or below MIN_TEMPERATURE) means greedy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch


MAX_LOGPROBS = 20
MIN_TEMPERATURE = 1e-5  # smaller temperatures sample greedily  # alternatives per token (OpenAI's top_logprobs limit)


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    min_new_tokens: int = 0
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings, cut from the output
    stop_token_ids: tuple[int, ...] = ()  # in addition to the model's EOS
    ignore_eos: bool = False
    logprobs: int | None = None  # None = off; k >= 0: each token's log-probability plus the k most likely

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        for name in ("max_new_tokens", "min_new_tokens", "top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        checks = [
            (self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
            (0 <= self.min_new_tokens <= self.max_new_tokens, "min_new_tokens must be in [0, max_new_tokens]"),
            (self.temperature >= 0, "temperature must be >= 0 (0 = greedy)"),
            (self.top_k >= 0, "top_k must be >= 0 (0 = off)"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p < 1, "min_p must be in [0, 1)"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0 (1 = off)"),
            (self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
             f"logprobs must be in [0, {MAX_LOGPROBS}] (the number of alternatives per token) or None"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        # Below this, logits / temperature overflows to inf (NaN probabilities): the argmax is the answer.
        return self.temperature < MIN_TEMPERATURE

    def with_overrides(self, **kw: Any) -> SamplingParams:
        kw = {k: v for k, v in kw.items() if v is not None}
        for key in ("stop", "stop_token_ids"):
            if key in kw:
                kw[key] = (kw[key],) if isinstance(kw[key], (str, int)) else tuple(kw[key])
        return replace(self, **kw)


# The model card's recommendation for LFM2-VL (Liquid docs, vision.md).
RECOMMENDED = SamplingParams(temperature=0.1, min_p=0.15, repetition_penalty=1.05)


def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits (B, V); history (B, L) token ids (-1 = none). Divide positive, multiply negative scores."""
    if penalty == 1.0 or history.numel() == 0:
        return logits
    idx = history.clamp(min=0)
    score = logits.gather(1, idx)
    score = torch.where(score < 0, score * penalty, score / penalty)
    out = logits.clone()
    out.scatter_(1, idx, torch.where(history >= 0, score, logits.gather(1, idx)))
    return out


def filter_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p, min-p; excluded entries become -inf. logits (B, V) float."""
    logits = logits / p.temperature
    if p.top_k and p.top_k < logits.shape[-1]:
        kth = logits.topk(p.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1)  # ascending
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum <= 1 - p.top_p
        drop[:, -1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    if p.min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < p.min_p * probs.max(-1, keepdim=True).values, float("-inf"))
    return logits


def next_tokens(
    logits: torch.Tensor,
    history: torch.Tensor,
    p: SamplingParams,
    generator: torch.Generator | None = None,
    banned: torch.Tensor | None = None,
) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,). `banned` (ids) are never picked (min_new_tokens)."""
    logits = apply_repetition_penalty(logits.float(), history, p.repetition_penalty)
    if banned is not None and banned.numel():
        logits = logits.index_fill(1, banned, float("-inf"))
    if p.greedy:
        return logits.argmax(-1)
    probs = filter_logits(logits, p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, ks: list[int]
) -> list[tuple[float, tuple[tuple[int, float], ...]]]:
    """logits (B, V), tokens (B,) -> per row: the token's log-probability and the ks[row] most likely
    (token, log-probability) pairs, best first. Raw model log-probabilities (before penalties and
    temperature), read to the host once."""
    lp = logits.float().log_softmax(-1)  # (B, V)
    chosen = lp.gather(1, tokens[:, None].long())[:, 0].tolist()
    top_v, top_i = lp.topk(max(ks), dim=-1) if max(ks) else (lp[:, :0], tokens[:, None][:, :0])
    top_v, top_i = top_v.tolist(), top_i.tolist()
    return [(chosen[r], tuple(zip(top_i[r][:k], top_v[r][:k], strict=True))) for r, k in enumerate(ks)]
