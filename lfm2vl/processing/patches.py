"""Crops -> the vision encoder's input: normalized 16x16 patches, padded or packed.

Mirrors `rescale_and_normalize`, `convert_image_to_patches` and `pad_along_first_dim` of
transformers' `Lfm2VlImageProcessor`. Patches are row-major over the crop, and each is flattened
with the channel fastest: feature index = (py * 16 + px) * 3 + c. Normalization is the reference's
fused form, `(x - mean * 255) / (std * 255)` in float32 (sub then div, so the bits match).
The packed form drops the padding rows: (sum of patches, 768) plus spatial_shapes.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from .settings import ImageSettings


@lru_cache(maxsize=16)
def _fused_stats(mean: tuple[float, ...], std: tuple[float, ...], rescale_factor: float, patch: int):
    """Per-feature mean and std (768,) for uint8 input, fused exactly as the reference fuses them."""
    m = torch.tensor(mean) * (1.0 / rescale_factor)  # float32, as `_fuse_mean_std_and_rescale_factor`
    s = torch.tensor(std) * (1.0 / rescale_factor)
    return m.repeat(patch * patch), s.repeat(patch * patch)  # channel fastest, like the features


def patchify(crop: torch.Tensor, patch: int) -> torch.Tensor:
    """(C, h, w) -> (h/p * w/p, p*p*C): row-major patches, each flattened as (py, px, c)."""
    c, h, w = crop.shape
    x = crop.reshape(c, h // patch, patch, w // patch, patch)
    return x.permute(1, 3, 2, 4, 0).reshape((h // patch) * (w // patch), patch * patch * c)


def normalize_into(out: torch.Tensor, patches_u8: torch.Tensor, s: ImageSettings) -> torch.Tensor:
    """Write normalized float32 patches into `out` (n, 768) in place; returns `out`."""
    mean, std = _fused_stats(s.image_mean, s.image_std, s.rescale_factor, s.encoder_patch_size)
    out.copy_(patches_u8)
    return out.sub_(mean).div_(std)


def crops_to_padded(
    crops: list[torch.Tensor], s: ImageSettings
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 crops -> pixel_values (N, P, 768) float32, pixel_attention_mask (N, P) int32,
    spatial_shapes (N, 2) int64, with P = settings.max_num_patches (zero rows, mask 0, as padding)."""
    p, limit = s.encoder_patch_size, s.max_num_patches
    values = torch.zeros(len(crops), limit, s.patch_dim)  # (N, P, 768)
    mask = torch.zeros(len(crops), limit, dtype=torch.int32)  # (N, P)
    shapes = []
    for i, crop in enumerate(crops):
        patches = patchify(crop, p)  # (n, 768) uint8
        n = patches.shape[0]
        normalize_into(values[i, :n], patches, s)
        mask[i, :n] = 1
        shapes.append((crop.shape[1] // p, crop.shape[2] // p))
    return values, mask, torch.tensor(shapes, dtype=torch.int64).reshape(-1, 2)


def crops_to_packed(crops: list[torch.Tensor], s: ImageSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 crops -> pixel_values (sum_n, 768) float32 without padding, spatial_shapes (N, 2) int64."""
    p = s.encoder_patch_size
    patches = [patchify(crop, p) for crop in crops]
    values = torch.empty(sum(x.shape[0] for x in patches), s.patch_dim)  # (sum_n, 768)
    start = 0
    for x in patches:
        normalize_into(values[start:start + x.shape[0]], x, s)
        start += x.shape[0]
    shapes = [(crop.shape[1] // p, crop.shape[2] // p) for crop in crops]
    return values, torch.tensor(shapes, dtype=torch.int64).reshape(-1, 2)
