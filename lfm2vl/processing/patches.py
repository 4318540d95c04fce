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
    return _patch_view(crop, patch).reshape((h // patch) * (w // patch), patch * patch * c)


def _patch_view(crop: torch.Tensor, patch: int) -> torch.Tensor:
    """(C, h, w) -> a (h/p, w/p, p, p, C) view; cheap to copy from when the crop is channels-last."""
    c, h, w = crop.shape
    return crop.reshape(c, h // patch, patch, w // patch, patch).permute(1, 3, 2, 4, 0)


def _gather_u8(crops: list[torch.Tensor], rows: list[torch.Tensor], patch: int) -> None:
    """Copy each crop's patches straight into its (n, 768) uint8 destination rows."""
    for crop, dest in zip(crops, rows, strict=True):
        c, h, w = crop.shape
        dest.view(h // patch, w // patch, patch, patch, c).copy_(_patch_view(crop, patch))


def _normalize_(values: torch.Tensor, s: ImageSettings) -> torch.Tensor:
    """In place on float32 (..., 768): (x - mean*255) / (std*255), as the reference fuses it."""
    mean, std = _fused_stats(s.image_mean, s.image_std, s.rescale_factor, s.encoder_patch_size)
    return values.sub_(mean).div_(std)


# A few large tensor ops rather than several per crop: cheaper, and far less sensitive to a busy
# CPU when torch runs more than one thread.
def crops_to_padded(
    crops: list[torch.Tensor], s: ImageSettings
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 crops -> pixel_values (N, P, 768) float32, pixel_attention_mask (N, P) int32,
    spatial_shapes (N, 2) int64, with P = settings.max_num_patches (zero rows, mask 0, as padding)."""
    p, limit = s.encoder_patch_size, s.max_num_patches
    shapes = [(crop.shape[1] // p, crop.shape[2] // p) for crop in crops]
    counts = torch.tensor([h * w for h, w in shapes], dtype=torch.int64)
    u8 = torch.empty(len(crops), limit, s.patch_dim, dtype=torch.uint8)  # (N, P, 768)
    _gather_u8(crops, [u8[i, :n] for i, n in enumerate(counts.tolist())], p)
    mask = (torch.arange(limit)[None, :] < counts[:, None]).to(torch.int32)  # (N, P)
    values = _normalize_(u8.to(torch.float32), s).masked_fill_(mask[..., None] == 0, 0.0)  # pads: +0.0
    return values, mask, torch.tensor(shapes, dtype=torch.int64).reshape(-1, 2)


def crops_to_packed(crops: list[torch.Tensor], s: ImageSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 crops -> pixel_values (sum_n, 768) float32 without padding, spatial_shapes (N, 2) int64."""
    p = s.encoder_patch_size
    shapes = [(crop.shape[1] // p, crop.shape[2] // p) for crop in crops]
    u8 = torch.empty(sum(h * w for h, w in shapes), s.patch_dim, dtype=torch.uint8)  # (sum_n, 768)
    _gather_u8(crops, list(u8.split([h * w for h, w in shapes])), p)
    return _normalize_(u8.to(torch.float32), s), torch.tensor(shapes, dtype=torch.int64).reshape(-1, 2)
