"""Multimodal projector: 2x2 pixel unshuffle, optional LayerNorm, 2-layer GELU MLP.

Mirrors `Lfm2VlMultiModalProjector` and `Lfm2VlModel.get_image_features` in transformers. The
unshuffled vector at (i, j) concatenates patches (2i,2j), (2i,2j+1), (2i+1,2j), (2i+1,2j+1), so
channel = (dy*f + dx)*C + c (docs/architecture.md §4). A crop side that is not a multiple of the factor loses its
last row/column of patches, as in transformers v5 (the processor never produces one).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import Lfm2VlConfig
from .linear import Linear, apply


def pixel_unshuffle(features: torch.Tensor, shapes: list[tuple[int, int]], factor: int) -> torch.Tensor:
    """Packed (N_real, C) vision rows -> (N_tokens, f*f*C), crop after crop, tokens row-major."""
    out, start = [], 0
    for h, w in shapes:
        crop = features[start : start + h * w].view(h, w, -1)  # (h, w, C)
        start += h * w
        hh, ww = h // factor, w // factor
        crop = crop[: hh * factor, : ww * factor]
        crop = crop.reshape(hh, factor, ww, factor, -1).permute(0, 2, 1, 3, 4)  # (hh, ww, dy, dx, C)
        out.append(crop.reshape(hh * ww, -1))
    return torch.cat(out)


class Projector(nn.Module):
    def __init__(self, cfg: Lfm2VlConfig):
        super().__init__()
        self.factor = cfg.downsample_factor
        d_in = cfg.projector_in_dim
        self.layer_norm = nn.LayerNorm(d_in) if cfg.projector_use_layernorm else None  # eps 1e-5 (torch default)
        self.linear_1 = Linear(d_in, cfg.projector_hidden_size, bias=cfg.projector_bias)
        self.linear_2 = Linear(cfg.projector_hidden_size, cfg.text.hidden_size, bias=cfg.projector_bias)
        self.act = "gelu_tanh" if cfg.projector_hidden_act == "gelu_pytorch_tanh" else "gelu"

    def forward(self, features: torch.Tensor, shapes: list[tuple[int, int]]) -> torch.Tensor:
        x = pixel_unshuffle(features, shapes, self.factor)  # (N_tokens, 4C)
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        return self.linear_2(apply(self.linear_1, x, self.act))  # (N_tokens, D)
