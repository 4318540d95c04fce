"""LFM2 hybrid language backbone (mirrors transformers `models/lfm2/modeling_lfm2.py`).

Layers are either a gated short convolution or grouped-query attention, each followed by a
SwiGLU MLP; RMSNorm everywhere (docs/architecture.md). Notable choices:
- One code path for prefill, chunked prefill and decode: the conv layer always convolves
  [cached state | new inputs], so a decode step is a prefill of length 1.
- Padding-aware: the gated conv input `B*x` is zeroed at padded positions, so a left-padded row's
  conv history never depends on its batch neighbours (the bug behind transformers#41790).
- With a cache (`cache.py`), every row of a batch is its own sequence at its own length: positions,
  masks and RoPE rows come from the `CacheView`, built on the host from known lengths, so a decode
  step reads nothing back from the device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TextConfig
from .cache import CacheView, rope_cos_sin
from .cast import cast
from .embedding import embedding
from .linear import Linear, apply, apply_mul


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # the same operations in one call (torch's composite rms_norm, the same bits): half the
            # time of the five below for a decode row, 45 norms a 450M step
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # float32 statistics, cast back before the weight multiply (as the reference does)
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def one_query_attention(q: torch.Tensor, kt: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention for one new token per row: q (B, H, 1, Dh), K^T kt (B, Hkv, Dh, S), v (B, Hkv, S, Dh),
    mask (B, 1, 1, S) or None.

    Two batched matmuls with a float32 softmax, over the cache's own views (K is cached transposed,
    cache.py). The decode step of every dtype and device: torch's CPU flash kernel takes ~8x longer
    for a single query in bf16, and would need K copied back to (S, Dh) rows first
    (benchmarks/bench_kernels.py); grouped query heads h = kv * G + g, as SDPA's enable_gqa.
    """
    b, h, _, dh = q.shape
    hkv = kt.shape[1]
    qg = cast(q.reshape(b, hkv, h // hkv, dh) * dh**-0.5, kt.dtype)  # (B, Hkv, G, Dh), in the cache's dtype
    if kt.dtype == torch.float32:
        scores = torch.matmul(qg, kt)  # (B, Hkv, G, S)
    else:  # a GPU's bf16/fp16 cache: a half-precision product would round the scores (SDPA's kernels do not)
        scores = torch.matmul(qg.float(), kt.float())
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return cast(torch.matmul(cast(scores.softmax(-1), v.dtype), v).reshape(b, h, 1, dh), q.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        d = cfg.hidden_size
        self.q_proj = Linear(d, self.n_heads * self.head_dim, bias=False)
        self.k_proj = Linear(d, self.n_kv * self.head_dim, bias=False)
        self.v_proj = Linear(d, self.n_kv * self.head_dim, bias=False)
        self.out_proj = Linear(self.n_heads * self.head_dim, d, bias=False)
        self.q_layernorm = RMSNorm(self.head_dim, cfg.norm_eps)
        self.k_layernorm = RMSNorm(self.head_dim, cfg.norm_eps)

    def forward(self, x: torch.Tensor, ctx: Context) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_layernorm(self.q_proj(x).view(b, t, self.n_heads, self.head_dim)).transpose(1, 2)  # (B, H, T, Dh)
        k = self.k_layernorm(self.k_proj(x).view(b, t, self.n_kv, self.head_dim)).transpose(1, 2)  # (B, Hkv, T, Dh)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)  # (B, Hkv, T, Dh)
        q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        if ctx.cache is not None:
            kt, v = ctx.cache.kv(self.layer_idx, k, v)  # K^T (B, Hkv, Dh, S), V (B, Hkv, S, Dh) with the past
            if t == 1:
                o = one_query_attention(q, kt, v, ctx.attn_mask)  # (B, H, 1, Dh)
                return self.out_proj(o.transpose(1, 2).reshape(b, t, -1))
            # SDPA's kernels want (S, Dh) rows in the query's dtype: one copy per chunk
            k = kt.transpose(-1, -2).to(q.dtype, copy=True, memory_format=torch.contiguous_format)
            v = v.to(q.dtype)
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=ctx.attn_mask, is_causal=ctx.is_causal, enable_gqa=self.n_heads != self.n_kv
        )  # (B, H, T, Dh)
        return self.out_proj(o.transpose(1, 2).reshape(b, t, -1))


class ShortConv(nn.Module):
    """Gated short convolution: y = C * causal_conv(B * x), with (B, C, x) = in_proj(u)."""

    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        d, k = cfg.hidden_size, cfg.conv_L_cache
        self.kernel = k
        # holds the weights only: forward pads with the cached state instead of zeros
        self.conv = nn.Conv1d(d, d, kernel_size=k, groups=d, bias=cfg.conv_bias)
        self.in_proj = Linear(d, 3 * d, bias=cfg.conv_bias)
        self.out_proj = Linear(d, d, bias=cfg.conv_bias)

    def forward(self, x: torch.Tensor, ctx: Context) -> torch.Tensor:
        b, t, d = x.shape
        gate_b, gate_c, xs = self.in_proj(x).chunk(3, dim=-1)  # 3 x (B, T, D), in this order (B, C, x)
        v = gate_b * xs
        if ctx.token_mask is not None:
            v = v * ctx.token_mask[..., None].to(v.dtype)  # padded positions add nothing to the history
        v = v.transpose(1, 2)  # (B, D, T)
        if ctx.cache is not None:
            state = ctx.cache.conv_state(self.layer_idx)  # (B, D, K-1): the last K-1 values of B*x
        else:
            state = v.new_zeros(b, d, self.kernel - 1)
        full = torch.cat([cast(state, v.dtype), v], dim=-1)  # (B, D, K-1+T)
        if ctx.cache is not None:
            ctx.cache.set_conv_state(self.layer_idx, full)
        if t == 1:  # decode: one output per channel, a K-tap dot product (5x faster than conv1d here)
            y = (full * self.conv.weight[:, 0]).sum(-1, keepdim=True)  # (B, D, 1)
            if self.conv.bias is not None:
                y = y + self.conv.bias[:, None]
        else:
            y = F.conv1d(full, self.conv.weight, self.conv.bias, groups=d)  # (B, D, T)
        return self.out_proj(gate_c * y.transpose(1, 2))


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        d, f = cfg.hidden_size, cfg.ffn_dim
        self.w1 = Linear(d, f, bias=False)  # gate
        self.w3 = Linear(d, f, bias=False)  # up
        self.w2 = Linear(f, d, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(apply_mul(self.w3, x, apply(self.w1, x, "silu")))  # w2(silu(w1 x) * w3 x)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.is_attention = layer_idx in cfg.attention_layers
        if self.is_attention:
            self.self_attn = Attention(cfg, layer_idx)
        else:
            self.conv = ShortConv(cfg, layer_idx)
        self.feed_forward = MLP(cfg)
        self.operator_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)

    def forward(self, x: torch.Tensor, ctx: Context) -> torch.Tensor:
        op = self.self_attn if self.is_attention else self.conv
        x = x + op(self.operator_norm(x), ctx)
        return x + self.feed_forward(self.ffn_norm(x))


@dataclass(frozen=True)
class Context:
    """Per-forward state shared by all layers."""

    cos: torch.Tensor  # (B, 1, T, Dh)
    sin: torch.Tensor
    attn_mask: torch.Tensor | None  # (B, 1, T, S) True = attend
    is_causal: bool
    token_mask: torch.Tensor | None  # (B, T) real tokens, only when some are padding (no cache)
    cache: CacheView | None


def padding_mask(key_mask: torch.Tensor | None, t: int) -> tuple[torch.Tensor | None, bool]:
    """Boolean (B, 1, T, T) causal mask over a left/right-padded batch without a cache (True = attend).

    Returns (None, causal) where SDPA's own causal path is exact. A query always sees itself, so
    fully padded rows stay finite (their outputs are never used).
    """
    if key_mask is None or bool(key_mask.all()):
        return None, t > 1
    pos = torch.arange(t, device=key_mask.device)
    mask = (pos[None, :] <= pos[:, None])[None, None] & key_mask[:, None, None, :]  # (B, 1, T, T)
    return mask | (pos[None, :] == pos[:, None])[None, None], False


class TextModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.embedding_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)  # final norm, after the last layer
        self.gradient_checkpointing = False
        # (self, embeds, cache view) -> final hidden states, or None for the layers below: a quantized
        # model's decode step in one C call (lfm2vl/quant/step.py sets it)
        self.decode_step: Callable[[TextModel, torch.Tensor, CacheView], torch.Tensor | None] | None = None
        self.decode_state: object = None  # what decode_step keeps between steps (dropped by a move or cast)

    def _apply(self, fn, recurse: bool = True) -> TextModel:
        self.decode_state = None  # it may point at the tensors a move or cast replaces
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "decode_state": None}  # raw pointers: not for a copy or a pickle

    def forward(
        self, embeds: torch.Tensor, key_mask: torch.Tensor | None = None, cache: CacheView | None = None
    ) -> torch.Tensor:
        """embeds (B, T, D) -> hidden (B, T, D).

        Without a cache: one whole (possibly padded) batch, key_mask (B, T) bool marks real tokens and
        positions count them. With a cache: T new tokens per row after that row's stored ones, no padding.
        """
        b, t, _ = embeds.shape
        if cache is not None and t == 1 and self.decode_step is not None:
            h = self.decode_step(self, embeds, cache)
            if h is not None:
                cache.advance()
                return h
        if cache is not None:
            cos, sin = cache.rope()
            ctx = Context(cos, sin, cache.attn_mask, cache.is_causal, None, cache)
        else:
            attn_mask, is_causal = padding_mask(key_mask, t)
            if key_mask is None:
                positions = torch.arange(t, device=embeds.device).expand(b, -1)
            else:
                positions = (key_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T): padding shares position 0
            cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, embeds.dtype)
            token_mask = None if attn_mask is None else key_mask
            ctx = Context(cos[:, None], sin[:, None], attn_mask, is_causal, token_mask, None)
        h = embeds
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                h = torch.utils.checkpoint.checkpoint(layer, h, ctx, use_reentrant=False)
            else:
                h = layer(h, ctx)
        if cache is not None:
            cache.advance()
        return self.embedding_norm(h)
