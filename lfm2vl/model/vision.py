"""SigLIP2 NaFlex vision encoder (mirrors transformers `models/siglip2/modeling_siglip2.py`).

Each crop is a list of 16x16 patches at its native aspect ratio. The learned 16x16 position grid
is resized per crop with an antialiased bilinear filter (docs/architecture.md §3; the "central issue" of
llama.cpp's parity work). The encoder runs *packed*: padded patch rows are dropped before the
first layer, linear layers run over all real patches at once, and attention runs per group of
crops of equal shape. Valid rows equal the reference's padded-and-masked computation.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VisionConfig
from .embedding import embedding
from .linear import Linear, apply


@lru_cache(maxsize=256)
def _resize_weights(out_size: int, grid: int) -> torch.Tensor:
    """(out_size, grid) float32 weights of an antialiased bilinear resize (align_corners=False).

    Triangle filter widened by the downscale factor and normalised per output, as
    `F.interpolate(..., "bilinear", antialias=True)` and transformers v5 compute it.
    """
    with torch.inference_mode(False):  # cached: must stay usable by later autograd (training) calls
        scale = grid / out_size
        support = max(scale, 1.0)
        center = (torch.arange(out_size, dtype=torch.float32) + 0.5) * scale - 0.5  # (out,)
        source = torch.arange(grid, dtype=torch.float32)  # (grid,)
        w = (1 - (source[None, :] - center[:, None]).abs() / support).clamp(min=0)  # (out, grid)
        return w / w.sum(-1, keepdim=True)


def resize_position_grid(table: torch.Tensor, grid: int, h: int, w: int) -> torch.Tensor:
    """Learned (grid*grid, C) table -> (h*w, C) embeddings for an h x w patch grid, row-major."""
    pos = table.float().reshape(grid, grid, -1)  # (G, G, C)
    wh = _resize_weights(h, grid).to(table.device)  # (h, G)
    ww = _resize_weights(w, grid).to(table.device)  # (w, G)
    out = torch.einsum("hg,gkc,wk->hwc", wh, pos, ww)  # (h, w, C) in float32, then to the table's dtype
    return out.reshape(h * w, -1).to(table.dtype)


class Embeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embedding = Linear(cfg.patch_dim, cfg.hidden_size)
        self.position_embedding = embedding(cfg.num_patches, cfg.hidden_size)

    def forward(self, patches: torch.Tensor, shapes: list[tuple[int, int]]) -> torch.Tensor:
        # patches: (N_real, 768) packed, crop after crop; shapes: (h, w) per crop, on the CPU
        x = self.patch_embedding(patches.to(self.patch_embedding.weight.dtype))  # (N_real, C)
        table = self.position_embedding.weight
        pos = torch.cat([resize_position_grid(table, self.cfg.grid_size, h, w) for h, w in shapes])
        return x + pos


class Attention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        c = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.q_proj, self.k_proj = Linear(c, c), Linear(c, c)
        self.v_proj, self.out_proj = Linear(c, c), Linear(c, c)

    def forward(self, x: torch.Tensor, groups: list[tuple[int, int, int]]) -> torch.Tensor:
        # x: (N_real, C); groups: (start row, crops, rows per crop) runs of equally sized crops
        n, c = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        out = torch.empty_like(q)
        for start, crops, length in groups:
            end = start + crops * length

            def heads(t: torch.Tensor) -> torch.Tensor:
                return t[start:end].view(crops, length, self.num_heads, self.head_dim).transpose(1, 2)

            o = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))  # (crops, H, L, Dh), bidirectional
            out[start:end] = o.transpose(1, 2).reshape(end - start, c)
        return self.out_proj(out)


class MLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = "gelu_tanh" if cfg.hidden_act == "gelu_pytorch_tanh" else "gelu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(apply(self.fc1, x, self.act))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = Attention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, groups: list[tuple[int, int, int]]) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), groups)
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


def group_crops(shapes: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """Runs of consecutive crops with the same patch count: (start row, crops, rows per crop)."""
    groups: list[tuple[int, int, int]] = []
    start = 0
    for h, w in shapes:
        length = h * w
        if groups and groups[-1][2] == length:
            s, c, _ = groups[-1]
            groups[-1] = (s, c + 1, length)
        else:
            groups.append((start, 1, length))
        start += length
    return groups


class VisionEncoder(nn.Module):
    """Packed patches (N_real, 768) + per-crop (h, w) -> post-LayerNorm features (N_real, C)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.gradient_checkpointing = False

    def forward(self, patches: torch.Tensor, shapes: list[tuple[int, int]]) -> torch.Tensor:
        if patches.shape[0] != sum(h * w for h, w in shapes):
            raise ValueError(f"{patches.shape[0]} patches for spatial shapes totalling {sum(h * w for h, w in shapes)}")
        groups = group_crops(shapes)
        x = self.embeddings(patches, shapes)  # (N_real, C)
        for layer in self.encoder.layers:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, groups, use_reentrant=False)
            else:
                x = layer(x, groups)
        return self.post_layernorm(x)
