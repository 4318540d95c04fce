"""The tiling plan: image size + settings -> crops, their sizes and token counts. Pure integer math.

Mirrors `smart_resize`, `_is_image_too_large`, `_target_ratios`, `find_closest_aspect_ratio` and
`crop_image_to_patches` of transformers' `Lfm2VlImageProcessor`, and `_build_image_tokens` of
`Lfm2VlProcessor` (docs/processing.md). The same `TilePlan` drives the pixel pipeline, the placeholder string
and token counting, so the three cannot drift apart. Python `round()` (half to even) is
deliberate: 720 px must stay 704, not 736.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from .settings import ImageSettings

IMAGE_TOKEN = "<image>"
IMAGE_START = "<|image_start|>"
IMAGE_END = "<|image_end|>"
THUMBNAIL_MARKER = "<|img_thumbnail|>"


def tile_marker(row: int, col: int) -> str:
    """Marker before the tile at 1-based (row, col) of the grid."""
    return f"<|img_row_{row}_col_{col}|>"


@dataclass(frozen=True)
class Crop:
    """One encoder input: a tile, the thumbnail, or the whole (resized) image."""

    kind: str  # "tile" | "thumbnail" | "single"
    height: int  # pixels after resizing (a multiple of the encoder patch)
    width: int
    tokens: int  # <image> tokens its features become
    row: int = 0  # 1-based grid position (tiles only)
    col: int = 0


@dataclass(frozen=True)
class TilePlan:
    """Everything the processor decides about one image, before touching its pixels."""

    width: int  # original size
    height: int
    resized_height: int  # smart-resize size: the single crop, or the thumbnail of a tiled image
    resized_width: int
    rows: int  # tile grid (1 x 1 when the image is not tiled)
    cols: int
    tile_size: int
    patch_size: int  # encoder patch (16)
    crops: tuple[Crop, ...]  # tiles row-major, thumbnail last

    @property
    def tiled(self) -> bool:
        return self.crops[0].kind == "tile"

    @property
    def image_tokens(self) -> int:
        """Number of <image> tokens (= image feature vectors) for this image."""
        return sum(c.tokens for c in self.crops)

    @property
    def spatial_shapes(self) -> list[tuple[int, int]]:
        """(patch rows, patch cols) of every crop, in order."""
        return [(c.height // self.patch_size, c.width // self.patch_size) for c in self.crops]

    def _crop_marker(self, crop: Crop) -> str | None:
        if self.rows * self.cols == 1:
            return None  # single-crop layout: no tile or thumbnail marker
        return tile_marker(crop.row, crop.col) if crop.kind == "tile" else THUMBNAIL_MARKER

    def markers(self, use_image_special_tokens: bool = True) -> list[str]:
        """The marker tokens the placeholder uses, in order (each must be one vocabulary entry)."""
        if not use_image_special_tokens:
            return []
        inner = [m for m in map(self._crop_marker, self.crops) if m is not None]
        return [IMAGE_START, *inner, IMAGE_END]

    def placeholder(self, use_image_special_tokens: bool = True, image_token: str = IMAGE_TOKEN) -> str:
        """The string one `<image>` in the prompt expands into (`_build_image_tokens`).

        A 1 x 1 tile grid (min_tiles=1) is laid out as a single crop, but with the tile's own token
        count; upstream counts the smart-resize size there and so disagrees with its own features.
        """
        parts = [IMAGE_START] if use_image_special_tokens else []
        for crop in self.crops:
            marker = self._crop_marker(crop)
            if use_image_special_tokens and marker is not None:
                parts.append(marker)
            parts.append(image_token * crop.tokens)
        if use_image_special_tokens:
            parts.append(IMAGE_END)
        return "".join(parts)

    def num_tokens(self, use_image_special_tokens: bool = True) -> int:
        """Prompt tokens this image occupies, markers included."""
        return self.image_tokens + len(self.markers(use_image_special_tokens))


def smart_resize(height: int, width: int, s: ImageSettings) -> tuple[int, int]:
    """(height, width) rounded to multiples of 32 and brought inside the token budget (docs/processing.md)."""
    f = s.total_factor
    min_pixels = s.min_image_tokens * s.encoder_patch_size**2 * s.downsample_factor**2
    max_pixels = s.max_image_tokens * s.encoder_patch_size**2 * s.downsample_factor**2
    h_bar = max(f, round(height / f) * f)
    w_bar = max(f, round(width / f) * f)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(f, math.floor(height / beta / f) * f)
        w_bar = max(f, math.floor(width / beta / f) * f)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / f) * f
        w_bar = math.ceil(width * beta / f) * f
    return h_bar, w_bar


def is_too_large(height: int, width: int, s: ImageSettings) -> bool:
    """Whether the image is tiled when splitting is allowed. The floor is the patch (16), not 32, as upstream."""
    f = s.total_factor
    h_bar = max(s.encoder_patch_size, round(height / f) * f)
    w_bar = max(s.encoder_patch_size, round(width / f) * f)
    budget = s.max_image_tokens * s.encoder_patch_size**2 * s.downsample_factor**2 * s.max_pixels_tolerance
    return h_bar * w_bar > budget


@lru_cache(maxsize=64)
def target_ratios(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
    """Candidate (cols, rows) grids, stably sorted by tile count.

    Built exactly as upstream (a set, then sorted): the order of equal products is CPython's set
    order for small-int tuples, which is deterministic and decides exact aspect-ratio ties.
    """
    ratios = [
        (w, h)
        for n in range(min_tiles, max_tiles + 1)
        for w in range(1, n + 1)
        for h in range(1, n + 1)
        if min_tiles <= w * h <= max_tiles
    ]
    return tuple(sorted(set(ratios), key=lambda x: x[0] * x[1]))


def closest_grid(width: int, height: int, s: ImageSettings) -> tuple[int, int]:
    """(cols, rows) whose aspect ratio is closest to the image's; exact ties go to the bigger grid
    when the image covers more than half of it (`find_closest_aspect_ratio`)."""
    aspect_ratio = width / height
    best_diff, best = float("inf"), (1, 1)
    for cols, rows in target_ratios(s.min_tiles, s.max_tiles):
        diff = abs(aspect_ratio - cols / rows)
        if diff < best_diff:
            best_diff, best = diff, (cols, rows)
        elif diff == best_diff and width * height > 0.5 * s.tile_size * s.tile_size * cols * rows:
            best = (cols, rows)
    return best


def _tokens(height: int, width: int, s: ImageSettings) -> int:
    ps, ds = s.encoder_patch_size, s.downsample_factor
    return math.ceil((height // ps) / ds) * math.ceil((width // ps) / ds)


def plan_tiles(width: int, height: int, settings: ImageSettings) -> TilePlan:
    """The crops one image of `width` x `height` pixels becomes under `settings`."""
    s = settings
    if isinstance(width, bool) or isinstance(height, bool) or not (isinstance(width, int) and isinstance(height, int)):
        raise TypeError(f"image size must be integers, got {width!r} x {height!r}")
    if width < 1 or height < 1:
        raise ValueError(f"image has no pixels: {width} x {height} (width x height)")
    rh, rw = smart_resize(height, width, s)
    can_split = s.do_image_splitting and not (s.min_tiles == s.max_tiles == 1)
    rows = cols = 1
    if can_split and is_too_large(height, width, s):
        cols, rows = closest_grid(width, height, s)
        tile_tokens = _tokens(s.tile_size, s.tile_size, s)
        crops = [Crop("tile", s.tile_size, s.tile_size, tile_tokens, r + 1, c + 1)
                 for r in range(rows) for c in range(cols)]
        # A 1 x 1 grid (only possible with min_tiles=1) gets no thumbnail, as upstream.
        if s.use_thumbnail and rows * cols != 1:
            crops.append(Crop("thumbnail", rh, rw, _tokens(rh, rw, s)))
    else:
        crops = [Crop("single", rh, rw, _tokens(rh, rw, s))]
    limit = s.max_num_patches
    for crop in crops:
        n = (crop.height // s.encoder_patch_size) * (crop.width // s.encoder_patch_size)
        if n > limit:
            raise ValueError(
                f"a {width} x {height} image is too elongated for these settings: its {crop.kind} crop of "
                f"{crop.width} x {crop.height} px needs {n} patches, more than max_num_patches={limit}. "
                "Pad or crop it to a less extreme aspect ratio"
            )
    return TilePlan(width, height, rh, rw, rows, cols, s.tile_size, s.encoder_patch_size, tuple(crops))
