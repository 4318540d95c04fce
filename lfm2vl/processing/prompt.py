"""One conversation as the engine takes it: token ids plus its images, each with a content key.

Pixels are made lazily: when the engine already holds an image's features (image cache) or a
stored prefix covers its tokens (prefix cache), the image is loaded and hashed but never resized
or patchified. The key hashes the decoded RGB pixels together with every setting that shapes the
crops, so equal keys mean equal features.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from .image import make_crops
from .patches import crops_to_packed
from .settings import ImageSettings
from .tiling import TilePlan


def image_key(image: torch.Tensor, settings: ImageSettings) -> str:
    """Content hash of an RGB uint8 (3, H, W) image under `settings` (hex)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((tuple(image.shape), settings)).encode())
    h.update(image.contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass
class PromptImage:
    image: torch.Tensor = field(repr=False)  # (3, H, W) uint8
    plan: TilePlan
    settings: ImageSettings = field(repr=False)
    key: str = ""

    def __post_init__(self) -> None:
        if not self.key:
            self.key = image_key(self.image, self.settings)

    @property
    def tokens(self) -> int:
        """<image> tokens (= projected features) of this image."""
        return self.plan.image_tokens

    def pixels(self) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Packed patches (N_real, 768) float32 and the (h, w) patch grid of each crop, in order."""
        crops = make_crops(self.image, self.plan, self.settings.resample)
        values, shapes = crops_to_packed(crops, self.settings)
        return values, [(int(h), int(w)) for h, w in shapes.tolist()]


@dataclass
class Prompt:
    ids: list[int]
    images: list[PromptImage]
    image_token_id: int
