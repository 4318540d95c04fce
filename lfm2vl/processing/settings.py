"""Image-processing settings: every knob of the LFM2-VL image processor, read from the checkpoint.

Mirrors the class defaults and kwargs of `Lfm2VlImageProcessor` (transformers
`models/lfm2_vl/image_processing_lfm2_vl.py`). A checkpoint may describe its image processor in
three places, and the released repos split their knobs between two of them (docs/architecture.md §9,
mlx-vlm#2266), so all three are merged; where two set the same key, the higher one wins, in
transformers' order of precedence (`ImageProcessingMixin.get_image_processor_dict`):

1. `processor_config.json["image_processor"]` (what transformers 5.x `save_pretrained` writes);
2. `preprocessor_config.json` (the Hub repos of the released models);
3. the flat, legacy keys of `processor_config.json` (Liquid's original remote-code layout).

transformers itself reads only the highest source that exists; a knob we take from a lower one
is logged, since there our settings (deliberately) differ from its defaults. `ImageSettings` is
frozen and validated on construction, so a bad per-call override fails before any pixel is touched.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

log = logging.getLogger("lfm2vl")

# PIL's own decompression-bomb threshold (Image.MAX_IMAGE_PIXELS): about 9459 x 9459 pixels.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485

# PIL resampling enum values -> the filters we implement (transformers maps them to torchvision).
_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
SUPPORTED_RESAMPLE = ("bilinear", "bicubic")

# Keys a config may carry that do not change what the processor computes (transformers forces
# do_resize on, recomputes max_num_patches, and only uses size/return_row_col_info internally).
_IGNORED_KEYS = frozenset({
    "image_processor_type", "processor_class", "auto_map", "do_resize", "size", "max_num_patches",
    "do_pad", "return_row_col_info", "do_convert_rgb", "data_format", "input_data_format",
    "default_to_square", "crop_size", "do_center_crop", "disable_grouping", "device", "return_tensors",
    "image_seq_length", "chat_template", "_processor_class",
})
_ALIASES = {"patch_size": "encoder_patch_size"}  # HF tiny fixtures / SigLIP2-style name


def resample_name(value: Any) -> str:
    """'bilinear' / 'bicubic' from a name, a PIL enum or its int; anything else is a clear error."""
    name = _RESAMPLE_NAMES.get(int(value)) if isinstance(value, int) and not isinstance(value, bool) else None
    if isinstance(value, str):
        name = value.strip().lower()
    if name not in SUPPORTED_RESAMPLE:
        raise ValueError(
            f"resample={value!r} is not supported: use 'bilinear' (PIL 2) or 'bicubic' (PIL 3), "
            "the filters LFM2-VL checkpoints ship with"
        )
    return name


@dataclass(frozen=True)
class ImageSettings:
    """How images become crops, patches and tokens (defaults = transformers' class defaults, docs/architecture.md §7)."""

    min_image_tokens: int = 64
    max_image_tokens: int = 256
    do_image_splitting: bool = True
    min_tiles: int = 2
    max_tiles: int = 10
    tile_size: int = 512
    use_thumbnail: bool = True
    max_pixels_tolerance: float = 2.0
    resample: str = "bilinear"  # also accepts a PIL enum / int; stored as its name
    encoder_patch_size: int = 16
    downsample_factor: int = 2
    use_image_special_tokens: bool = True
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # decompression-bomb guard, checked before decoding
    # Keys the config carried that we neither use nor knowingly ignore (kept for `repr`, never read).
    unknown_keys: tuple[str, ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "resample", resample_name(self.resample))
        object.__setattr__(self, "image_mean", _triple(self.image_mean))
        object.__setattr__(self, "image_std", _triple(self.image_std))
        self._validate()

    def _validate(self) -> None:
        for name in ("min_image_tokens", "max_image_tokens", "min_tiles", "max_tiles", "tile_size",
                     "encoder_patch_size", "downsample_factor", "max_image_pixels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.min_image_tokens > self.max_image_tokens:
            raise ValueError(
                f"min_image_tokens ({self.min_image_tokens}) > max_image_tokens ({self.max_image_tokens})"
            )
        # transformers checks this only when splitting is on; with it off min/max_tiles are unused.
        if self.do_image_splitting and self.min_tiles > self.max_tiles:
            raise ValueError(f"min_tiles ({self.min_tiles}) > max_tiles ({self.max_tiles})")
        if self.tile_size % self.total_factor:
            raise ValueError(
                f"tile_size ({self.tile_size}) must be a multiple of encoder_patch_size * downsample_factor "
                f"({self.total_factor}), or its tiles would not fill whole image tokens"
            )
        if not self.max_pixels_tolerance > 0:
            raise ValueError(f"max_pixels_tolerance must be > 0, got {self.max_pixels_tolerance!r}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
            raise ValueError(f"image_mean/image_std need 3 values (std > 0), got {self.image_mean}/{self.image_std}")
        if not self.rescale_factor > 0:
            raise ValueError(f"rescale_factor must be > 0, got {self.rescale_factor!r}")

    # -- derived values (computed exactly as transformers does, never stored twice) -----------
    @property
    def total_factor(self) -> int:
        """Pixels per image token along one side: encoder patch * pixel-unshuffle factor (32)."""
        return self.encoder_patch_size * self.downsample_factor

    @property
    def max_num_patches(self) -> int:
        """Patch rows every crop is padded to (`_preprocess` in transformers: 1024 by default)."""
        thumbnail = self.max_image_tokens * self.downsample_factor**2
        tile = (self.tile_size // self.encoder_patch_size) ** 2 if self.do_image_splitting else 0
        return max(thumbnail, tile)

    @property
    def patch_dim(self) -> int:
        return 3 * self.encoder_patch_size**2

    # -- construction ---------------------------------------------------------------------------
    def with_overrides(self, **overrides: Any) -> ImageSettings:
        """A copy with some knobs changed (None means "keep"); unknown names are an error."""
        valid = _field_names()
        unknown = sorted(set(overrides) - valid)
        if unknown:
            raise ValueError(f"unknown image setting(s) {unknown}; valid settings are {sorted(valid)}")
        changes = {k: v for k, v in overrides.items() if v is not None}
        return dataclasses.replace(self, **changes) if changes else self

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> ImageSettings:
        """Settings from one image-processor dict (checkpoint keys; aliases and ignorable keys understood)."""
        valid = _field_names() - {"unknown_keys"}
        kwargs: dict[str, Any] = {}
        unknown = []
        for key, value in config.items():
            name = _ALIASES.get(key, key)
            if name in valid:
                if name in kwargs and key in _ALIASES:
                    continue  # the canonical key wins over its alias
                kwargs[name] = tuple(value) if isinstance(value, list) else value
            elif key not in _IGNORED_KEYS:
                unknown.append(key)
        _check_supported(config)
        if unknown:
            log.info("image processor config keys not used by lfm2vl: %s", sorted(unknown))
        return cls(**kwargs, unknown_keys=tuple(sorted(unknown)))

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> ImageSettings:
        """Read a checkpoint folder: all three sources merged, higher ones winning (module docstring)."""
        folder = Path(folder)
        processor = _read_json(folder / "processor_config.json") or {}
        preprocessor = _read_json(folder / "preprocessor_config.json") or {}
        nested = processor.get("image_processor") if isinstance(processor.get("image_processor"), dict) else {}
        legacy = {k: v for k, v in processor.items() if k != "image_processor"}
        merged = {**legacy, **preprocessor, **nested}
        settings = cls.from_dict(merged)
        _report_lower_sources(legacy, preprocessor, nested)
        return settings


def _triple(value: Any) -> tuple[float, ...]:
    """A per-channel statistic; a single number applies to all three channels (as torchvision allows)."""
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    return tuple(float(v) for v in value)


def _field_names() -> set[str]:
    return {f.name for f in fields(ImageSettings)} - {"unknown_keys"}


def _check_supported(config: dict[str, Any]) -> None:
    # Turning these off changes the pixels the model sees; silently ignoring them would be a wrong answer.
    for key in ("do_rescale", "do_normalize"):
        if config.get(key) is False:
            raise ValueError(f"{key}=false is not supported: LFM2-VL encoders expect rescaled, normalized pixels")


def _report_lower_sources(legacy: dict[str, Any], preprocessor: dict[str, Any], nested: dict[str, Any]) -> None:
    """Say which knobs came from a source transformers would not read (it reads only the highest one)."""
    valid = _field_names() | set(_ALIASES)
    if nested:
        from_lower = sorted(k for k in {**legacy, **preprocessor} if k in valid and k not in nested)
    elif preprocessor:
        from_lower = sorted(k for k in legacy if k in valid and k not in preprocessor)
    else:
        return
    if from_lower:
        log.warning(
            "image settings %s come from a lower-precedence config file (processor_config.json top-level keys or "
            "preprocessor_config.json); transformers reads only the highest one and would use its defaults there",
            from_lower,
        )


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data
