"""LFM2-VL: vision encoder -> projector -> features scattered into `<image>` slots -> LFM2 -> logits.

Mirrors `Lfm2VlForConditionalGeneration` in transformers (`models/lfm2_vl/modeling_lfm2_vl.py`)
and accepts the reference processor's output dict unchanged. Images may also arrive packed
(`pixel_values` (N_real, 768) with no padding rows), the layout the encoder runs on internally.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config import Lfm2VlConfig
from .projector import Projector
from .text import TextModel
from .vision import VisionEncoder


class Lfm2Vl(nn.Module):
    def __init__(self, cfg: Lfm2VlConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_tower = VisionEncoder(cfg.vision)
        self.multi_modal_projector = Projector(cfg)
        self.language_model = TextModel(cfg.text)
        self.lm_head = None
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)

    # -- images ---------------------------------------------------------------------------------
    def encode_images(
        self,
        pixel_values: torch.Tensor,
        spatial_shapes: torch.Tensor | list,
        pixel_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Crops -> projected image features (N_tokens, D), crop after crop.

        pixel_values: padded (N, P, 768) as the reference processor returns it, or packed (N_real, 768).
        """
        shapes = [(int(h), int(w)) for h, w in (spatial_shapes.tolist() if torch.is_tensor(spatial_shapes) else spatial_shapes)]
        if pixel_values.dim() == 3:
            if pixel_values.shape[0] != len(shapes):
                raise ValueError(f"pixel_values has {pixel_values.shape[0]} crops but spatial_shapes has {len(shapes)}")
            counts = [h * w for h, w in shapes]
            if pixel_attention_mask is not None:
                real = pixel_attention_mask.sum(-1).tolist()
                if real != counts:
                    raise ValueError(f"pixel_attention_mask counts {real} disagree with spatial_shapes {shapes}")
            if max(counts, default=0) > pixel_values.shape[1]:
                raise ValueError(f"spatial_shapes {shapes} need more patches than pixel_values holds")
            patches = torch.cat([pixel_values[i, :n] for i, n in enumerate(counts)])  # (N_real, 768)
        elif pixel_values.dim() == 2:
            patches = pixel_values
        else:
            raise ValueError(f"pixel_values must be (N, P, 768) or (N_real, 768), got {tuple(pixel_values.shape)}")
        features = self.vision_tower(patches, shapes)  # (N_real, Cv)
        return self.multi_modal_projector(features, shapes)  # (N_tokens, D)

    # -- text -----------------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings (B, T, D) with image features placed at the `<image>` positions, in order."""
        embeds = self.language_model.embed_tokens(input_ids)
        slots = input_ids == self.cfg.image_token_id  # (B, T)
        n_slots = int(slots.sum())
        n_feats = 0 if image_features is None else image_features.shape[0]
        if n_slots != n_feats:
            raise ValueError(
                f"image tokens ({n_slots}) != image features ({n_feats}): the prompt's <image> runs must come "
                "from the same processor settings as pixel_values (token id "
                f"{self.cfg.image_token_id})"
            )
        if n_feats:
            embeds = embeds.masked_scatter(slots[..., None], image_features.to(embeds.dtype))
        return embeds

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.language_model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return hidden @ weight.T  # (B, T, V)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        spatial_shapes: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Any = None,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """Logits (B, T, V) (the last `logits_to_keep` positions when > 0)."""
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        feats = None
        if pixel_values is not None:
            if spatial_shapes is None:
                raise ValueError("pixel_values given without spatial_shapes")
            feats = self.encode_images(pixel_values, spatial_shapes, pixel_attention_mask)
        embeds = self.embed(input_ids, feats)
        return self.forward_embeds(embeds, attention_mask, position_ids, cache, logits_to_keep)

    def forward_embeds(
        self,
        embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Any = None,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """Merged embeddings (B, T, D) -> logits; with a cache, T new positions after the cached ones."""
        b, t, _ = embeds.shape
        past = cache.length if cache is not None else 0
        key_mask = None if attention_mask is None else attention_mask.bool()
        if cache is not None:
            key_mask = cache.extend_mask(key_mask, t)  # (B, past+T)
        if position_ids is None:
            if key_mask is not None:
                position_ids = (key_mask.long().cumsum(-1)[:, -t:] - 1).clamp(min=0)
            else:
                position_ids = torch.arange(past, past + t, device=embeds.device).expand(b, -1)
        hidden = self.language_model(embeds, position_ids, key_mask, cache)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return self.logits(hidden)
