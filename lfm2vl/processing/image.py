"""Images in, RGB uint8 tensors out; resizing with the exact numerics of the reference.

Loading accepts a path, bytes, a base64 string or data URL, a PIL image, a numpy array (H, W[, C])
or a uint8 tensor (C, H, W). Conversion to RGB follows what transformers' `Lfm2VlImageProcessor`
does when asked to convert (`do_convert_rgb=True`; without it the reference fails on any non-RGB
input): transparency is composited onto white, other PIL modes go through `Image.convert("RGB")`.
Modes whose 8-bit conversion would clip (16/32-bit integer, float) are refused instead. EXIF
orientation is applied to every PIL source; animated images give their first frame.

`resize` reproduces torchvision's `resize(uint8, antialias=True)` exactly in plain torch (the
processor passes checkpoints' `resample` straight to it; docs/processing.md).
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import os
import platform
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from .settings import DEFAULT_MAX_IMAGE_PIXELS
from .tiling import TilePlan

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | Image.Image | np.ndarray | torch.Tensor

# High-bit-depth modes: PIL's convert("RGB") (what the reference does) clips them at 255 rather than
# scaling; we convert the same way, for identical pixels, and say so.
log = logging.getLogger("lfm2vl")
_CLIPPED_MODES = {"I", "F", "I;16", "I;16B", "I;16L", "I;16N", "I;16S", "I;32", "I;32B", "I;32L"}


class ImageError(ValueError):
    """An image could not be loaded or is not acceptable (the message says why and what to do)."""


class ImageTooLarge(ImageError):
    """The image has more pixels than max_image_pixels allows (refused before decoding)."""


def load_image(
    src: ImageSource, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, formats: tuple[str, ...] | None = None
) -> torch.Tensor:
    """Any supported source -> RGB uint8 tensor (3, H, W), upright, checked against `max_pixels`.

    `formats` limits which PIL decoders encoded bytes may reach (a server passes SAFE_FORMATS, so
    untrusted bytes never reach e.g. the EPS plugin, which runs Ghostscript); None = any PIL format.
    """
    if isinstance(src, torch.Tensor):
        return _from_array(_tensor_to_hwc(src), max_pixels)
    if isinstance(src, np.ndarray):
        return _from_array(src, max_pixels)
    if isinstance(src, Image.Image):
        return _from_pil(src, max_pixels)
    if isinstance(src, (bytes, bytearray, memoryview)):
        return _from_pil(_open(bytes(src), "bytes", max_pixels, formats), max_pixels)
    if isinstance(src, os.PathLike) or isinstance(src, str):
        data, what = _read_source(src)
        return _from_pil(_open(data, what, max_pixels, formats), max_pixels)
    raise ImageError(
        f"unsupported image source of type {type(src).__name__}: pass a path, bytes, a base64 string or "
        "data URL, a PIL image, a numpy array (H, W[, C]) or a uint8 tensor (C, H, W)"
    )


def load_image_file(path: str | os.PathLike) -> torch.Tensor:
    """A file path a user typed (~ expanded) -> (3, H, W) uint8, as `load_image`; ImageError saying
    what is wrong: a directory, no such file, or a file PIL cannot decode within the pixel limit.
    (A str given to `load_image` may also be base64 or a data URL; a command-line path never is.)"""
    p = Path(os.path.expanduser(os.fspath(path)))
    if p.is_dir():
        raise ImageError("is a directory, not an image file")
    if not p.is_file():
        raise ImageError("no such file")
    return load_image(p)


def _read_source(src: str | os.PathLike) -> tuple[bytes, str]:
    """Bytes of a file path, a data URL or raw base64, with a short description for errors."""
    if isinstance(src, os.PathLike) or os.path.isfile(src):
        path = Path(src)
        if path.is_dir():
            raise ImageError(f"{str(src)!r} is a directory, not an image file")
        try:
            return path.read_bytes(), f"file {path}"
        except OSError as e:
            raise ImageError(f"cannot read image file {path}: {e.strerror or e}") from e
    text = src.strip()
    if text.startswith(("http://", "https://")):
        raise ImageError(f"image URLs are not fetched (no network access here): download {text[:80]} first")
    if os.path.isdir(text):
        raise ImageError(f"{src!r} is a directory, not an image file")
    what = "base64 string"
    if text.startswith("data:"):
        header, sep, text = text.partition(",")
        if not sep or ";base64" not in header:
            raise ImageError(f"data URL must look like 'data:image/png;base64,...', got {header[:60]!r}")
        what = "data URL"
    elif len(text) < _MIN_BASE64:  # too short for base64 image data: a path that does not exist
        raise ImageError(f"no image file at {src!r}")
    try:
        return base64.b64decode("".join(text.split()), validate=True), what
    except (binascii.Error, ValueError) as e:
        shown = src if len(src) < 80 else src[:77] + "..."
        raise ImageError(f"{shown!r} is neither an existing file nor valid base64 image data ({e})") from e


# Strings shorter than this are taken as file paths: even a tiny PNG is longer in base64 (pass smaller
# base64 data as a data: URL).
_MIN_BASE64 = 256


# The formats photos and screenshots come in (PIL's JPEG opener also reads the multi-picture JPEGs, MPO,
# of cameras and phones).
SAFE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")


def _open(data: bytes, what: str, max_pixels: int, formats: tuple[str, ...] | None = None) -> Image.Image:
    """Open lazily, check the size against the limit, then decode (a bomb is refused before decoding)."""
    if not data:
        raise ImageError(f"the image {what} is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies
            image = Image.open(io.BytesIO(data), formats=formats)
    except Image.DecompressionBombError as e:
        raise ImageError(f"{what}: image exceeds PIL's decompression-bomb limit ({e})") from e
    except UnidentifiedImageError as e:
        allowed = f" among the accepted formats ({', '.join(formats)})" if formats else ""
        raise ImageError(f"{what} is not a recognised image format{allowed} (corrupt or not an image)") from e
    _check_size(image.width, image.height, max_pixels)
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"{what} could not be decoded, the file is truncated or corrupt: {e}") from e
    return image


def _check_size(width: int, height: int, max_pixels: int) -> None:
    if width < 1 or height < 1:
        raise ImageError(f"image has no pixels: {width} x {height} (width x height)")
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"image of {width} x {height} = {width * height:,} pixels exceeds max_image_pixels={max_pixels:,} "
            "(decompression-bomb guard); downscale it first or raise max_image_pixels"
        )


def _from_pil(image: Image.Image, max_pixels: int) -> torch.Tensor:
    _check_size(image.width, image.height, max_pixels)
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)  # animated: the first frame
    try:
        image = ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, TypeError) as e:
        raise ImageError(f"image could not be decoded, truncated or corrupt: {e}") from e
    if image.mode in _CLIPPED_MODES:
        log.warning(
            "PIL mode %r is converted to 8-bit RGB as the reference does (values above 255 are clipped, not "
            "scaled); for 16-bit data scale it first, e.g. Image.fromarray((np.asarray(img) >> 8).astype(np.uint8))",
            image.mode,
        )
    try:
        rgb = _pil_to_rgb(image)
        array = np.array(rgb)  # (H, W, 3) uint8, writable (torch warns on read-only buffers)
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"image could not be converted to RGB (mode {image.mode!r}): {e}") from e
    return torch.from_numpy(array).permute(2, 0, 1)  # (3, H, W), a channels-last view


def _pil_to_rgb(image: Image.Image) -> Image.Image:
    """transformers' `convert_to_rgb`: alpha (or palette transparency) composited onto white."""
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _tensor_to_hwc(t: torch.Tensor) -> np.ndarray:
    if t.dim() == 3 and t.shape[0] in (1, 3, 4):
        t = t.permute(1, 2, 0)
    elif t.dim() != 2:
        raise ImageError(f"image tensors must be (C, H, W) with C in 1, 3, 4, or (H, W); got {tuple(t.shape)}")
    return t.detach().cpu().numpy()


def _from_array(array: np.ndarray, max_pixels: int) -> torch.Tensor:
    """(H, W) / (H, W, 1|3|4) uint8 -> (3, H, W); conversions as the reference's tensor path."""
    if array.dtype != np.uint8:
        raise ImageError(
            f"image arrays must be uint8 (0..255), got {array.dtype}; for floats in [0, 1] pass "
            "(x * 255).round().astype(np.uint8)"
        )
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ImageError(
            f"image arrays must be (H, W) or (H, W, C) with C in 1, 3, 4 (channels last); got {array.shape}"
        )
    _check_size(array.shape[1], array.shape[0], max_pixels)
    t = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)  # (C, H, W)
    if t.shape[0] == 1:
        return t.expand(3, -1, -1)
    if t.shape[0] == 4:
        # torchvision's to_dtype round trip: float in [0, 1], blend on white, x * (256 - 1e-3) truncated.
        x = t.to(torch.float32).mul_(1.0 / 255)
        rgb, alpha = x[:3], x[3:]
        x = rgb * alpha + (1 - alpha)
        return x.mul(255 + 1.0 - 1e-3).to(torch.uint8)
    return t


# -- resizing --------------------------------------------------------------------------------------

def _native_uint8(mode: str, device: torch.device) -> bool:
    """Whether torchvision resizes uint8 directly (else through float32 + round), per its rule."""
    if device.type != "cpu":
        return False
    if mode == "bicubic":
        return True
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in ("aarch64", "arm64")


def resize(image: torch.Tensor, height: int, width: int, resample: str) -> torch.Tensor:
    """(C, H, W) uint8 -> (C, height, width) uint8, equal to torchvision `resize(..., antialias=True)`.

    torchvision returns the input untouched when the size is unchanged and otherwise calls
    `interpolate(align_corners=False, antialias=True)` on uint8 where the CPU kernel supports it,
    or on float32 followed by clamp (bicubic), round and cast.
    """
    if image.shape[-2:] == (height, width):
        return image
    x = image[None]  # (1, C, H, W)
    if x.is_contiguous(memory_format=torch.channels_last) and x.stride(0) != x.numel():
        # torchvision's restride: interpolate then allocates its output channels-last too (an HWC
        # image in, an HWC image out), which is faster to patchify; the values are the same.
        x = x.as_strided(x.shape, (x.numel(), *x.stride()[1:]))
    if _native_uint8(resample, x.device):
        out = F.interpolate(x, size=(height, width), mode=resample, align_corners=False, antialias=True)
    else:
        out = F.interpolate(x.float(), size=(height, width), mode=resample, align_corners=False, antialias=True)
        if resample == "bicubic":
            out = out.clamp_(0, 255)
        out = out.round_().to(torch.uint8)
    return out[0]


def make_crops(image: torch.Tensor, plan: TilePlan, resample: str) -> list[torch.Tensor]:
    """(3, H, W) uint8 -> the plan's crops as (3, h, w) uint8, tiles row-major then the thumbnail.

    Tiles are cut from the original resized to the whole grid; the thumbnail and a single crop are
    the original resized to the smart-resize size (`crop_image_to_patches` / `resize_and_split`).
    """
    if not plan.tiled:
        return [resize(image, plan.resized_height, plan.resized_width, resample)]
    t = plan.tile_size
    grid = resize(image, plan.rows * t, plan.cols * t, resample)  # (3, rows*t, cols*t)
    crops = [grid[:, (c.row - 1) * t:c.row * t, (c.col - 1) * t:c.col * t] for c in plan.crops if c.kind == "tile"]
    if plan.crops[-1].kind == "thumbnail":
        crops.append(resize(image, plan.resized_height, plan.resized_width, resample))
    return crops
