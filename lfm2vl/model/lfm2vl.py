"""LFM2-VL: vision encoder -> projector -> features scattered into `<image>` slots -> LFM2 -> logits.

Mirrors `Lfm2VlForConditionalGeneration` in transformers (`models/lfm2_vl/modeling_lfm2_vl.py`)
and accepts the reference processor's output dict unchanged. Images may also arrive packed
(`pixel_values` (N_real, 768) with no padding rows), the layout the encoder runs on internally.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import Lfm2VlConfig
from .cache import CacheView, HybridCache
from .linear import Linear, linear
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
            self.lm_head = Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)

    @property
    def device(self) -> torch.device:
        return self.language_model.embedding_norm.weight.device  # (the embedding may be an int8 table)

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.embedding_norm.weight.dtype

    def make_cache(self, slots: int, max_len: int) -> HybridCache:
        """Decoding state for `slots` independent sequences of up to `max_len` positions (grows on demand).

        On the CPU, K and V of a bf16/fp16 model are kept in float32 (the same values): a decode step
        then multiplies the query by them in float32, where torch's bf16 CPU matmul builds (JIT) a new
        oneDNN kernel for every new number of keys, i.e. on every token, keeping ~1 MB of each: 2.4 ms
        and 1.3 MB a token on the 450M (docs/performance.md).
        """
        kv_dtype = torch.float32 if self.device.type == "cpu" and self.dtype in (torch.bfloat16, torch.float16) else None
        return HybridCache(self.cfg.text, slots, max_len, self.device, self.dtype, kv_dtype)

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
        if image_features is None:  # text only: no scan of the ids (a decode step stays free of host reads)
            return embeds
        slots = input_ids == self.cfg.image_token_id  # (B, T)
        n_slots = int(slots.sum())
        if n_slots != image_features.shape[0]:
            raise ValueError(
                f"image tokens ({n_slots}) != image features ({image_features.shape[0]}): the prompt's <image> "
                "runs must come from the same processor settings as pixel_values (token id "
                f"{self.cfg.image_token_id})"
            )
        return embeds.masked_scatter(slots[..., None], image_features.to(embeds.dtype))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is not None and not isinstance(self.lm_head, nn.Linear):
            return self.lm_head(hidden)  # a quantized head (lfm2vl/quant/)
        weight = self.language_model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return linear(hidden, weight)  # (..., V)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        spatial_shapes: torch.Tensor | None = None,
        *,
        image_features: torch.Tensor | None = None,
        cache: CacheView | None = None,
        logits_to_keep: int = 0,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """The one forward path (training, generation, the engine): logits (B, T, V).

        Images come as pixels (the processor's output) or as already projected `image_features`
        (N_tokens, D), e.g. from the engine's image cache. Without a cache the batch may be padded
        (attention_mask); with one, T new tokens per row follow that row's stored positions.
        `logits_to_keep` > 0 keeps the last positions only; `return_hidden` gives the final hidden
        states (B, T, D) instead of logits (training computes logits for target positions only).
        """
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if pixel_values is not None:
            if image_features is not None:
                raise ValueError("give pixel_values or image_features, not both")
            if spatial_shapes is None:
                raise ValueError("pixel_values given without spatial_shapes")
            image_features = self.encode_images(pixel_values, spatial_shapes, pixel_attention_mask)
        key_mask = None
        if attention_mask is not None:
            if cache is not None:
                raise ValueError("a cached step has no padding: every row is its own sequence (drop attention_mask)")
            key_mask = attention_mask.bool()
        hidden = self.language_model(self.embed(input_ids, image_features), key_mask, cache)
        if return_hidden:
            return hidden
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return self.logits(hidden)
