"""Image loading (every source kind, EXIF, PIL modes, animation), bad inputs, and the resize numerics.

The reference is transformers' processor with `do_convert_rgb=True` (without it, it fails on every
non-RGB input, asserted below); torchvision's `resize` is the reference for the resize itself.
"""

import base64
import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import reference
from lfm2vl.processing import ImageError, load_image
from lfm2vl.processing.image import resize



pytestmark = pytest.mark.usefixtures("one_thread")




def _rgb(w=67, h=45, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _png(image: Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=save.pop("format", "PNG"), **save)
    return buf.getvalue()


def _assert_same_pixels(procs, ours_src, ref_src, **ref_kw):
    ours, ref = procs
    o = ours(text="<image>", images=[ours_src])
    r = ref(text="<image>", images=[ref_src], return_tensors="pt", **ref_kw)
    for key in ("pixel_values", "pixel_attention_mask", "spatial_shapes", "input_ids"):
        assert torch.equal(o[key], r[key]), key


# -- sources -------------------------------------------------------------------------------------------

def test_every_source_kind_gives_the_same_tensor(tmp_path):
    array = _rgb()
    data = _png(Image.fromarray(array))
    (tmp_path / "x.png").write_bytes(data)
    b64 = base64.b64encode(data).decode()
    sources = [
        str(tmp_path / "x.png"), tmp_path / "x.png", data, bytearray(data), Image.fromarray(array), array,
        torch.from_numpy(array).permute(2, 0, 1), f"data:image/png;base64,{b64}", b64,
    ]
    expected = torch.from_numpy(array).permute(2, 0, 1)
    for src in sources:
        out = load_image(src)
        assert out.dtype == torch.uint8 and torch.equal(out, expected), type(src)


def test_exif_orientation_is_applied(tmp_path, procs):
    image = Image.fromarray(_rgb(60, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    image.save(path, format="JPEG", exif=exif, quality=95)
    loaded = load_image(str(path))
    assert tuple(loaded.shape) == (3, 60, 30)  # upright: taller than wide
    # transformers' own loader (PIL path) applies the same transpose; the processor then agrees.
    upright = reference.transformers().image_utils.load_image(str(path))
    _assert_same_pixels(procs, str(path), upright)
    _assert_same_pixels(procs, Image.open(path), upright)  # PIL sources are transposed too


def _palette_with_transparency() -> Image.Image:
    p = Image.fromarray(_rgb(50, 40)).convert("P")
    return Image.open(io.BytesIO(_png(p, transparency=0)))  # tRNS chunk -> info["transparency"]


@pytest.mark.parametrize("mode", ["L", "LA", "P", "P+transparency", "PA", "RGBA", "CMYK", "1", "RGBX", "YCbCr"])
def test_pil_modes_convert_like_the_reference(procs, mode):
    if mode == "P+transparency":
        image = _palette_with_transparency()
        assert image.info.get("transparency") is not None
    elif mode in ("LA", "RGBA", "PA"):
        rgba = np.concatenate([_rgb(50, 40), _rgb(50, 40, seed=1)[..., :1]], axis=2)
        image = Image.fromarray(rgba, "RGBA").convert(mode)
    else:
        image = Image.fromarray(_rgb(50, 40)).convert(mode)
    _assert_same_pixels(procs, image, image, do_convert_rgb=True)


def test_reference_default_fails_on_non_rgb(procs):
    """Why we convert: the reference's default path breaks on a grayscale image."""
    with pytest.raises(RuntimeError):
        procs[1](text="<image>", images=[Image.fromarray(_rgb()).convert("L")], return_tensors="pt")


@pytest.mark.parametrize("channels", [1, 4])
def test_gray_and_rgba_arrays_convert_like_the_reference(procs, channels):
    array = np.random.default_rng(3).integers(0, 256, (45, 67, channels), dtype=np.uint8)
    _assert_same_pixels(procs, array, array, do_convert_rgb=True)
    if channels == 1:  # (H, W) too; the reference only takes 3-d arrays
        assert torch.equal(load_image(array[..., 0]), load_image(array))


@pytest.mark.parametrize("mode, dtype", [("I;16", np.uint16), ("I", np.int32), ("F", np.float32)])
def test_high_bit_depth_modes_convert_like_the_reference_with_a_warning(procs, mode, dtype, caplog):
    image = Image.fromarray((np.arange(200 * 150).reshape(150, 200) % 700).astype(dtype))
    assert image.mode == mode
    with caplog.at_level("WARNING", logger="lfm2vl"):
        _assert_same_pixels(procs, image, image, do_convert_rgb=True)
    assert "clipped" in caplog.text  # PIL's convert("RGB") clips at 255: said, not silent


def test_animated_image_gives_its_first_frame(tmp_path, procs):
    frames = [Image.new("RGB", (40, 30), color) for color in ((200, 10, 10), (10, 200, 10))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    opened = Image.open(path)
    assert opened.n_frames == 2
    opened.seek(1)  # even when the caller left it on another frame
    first = Image.open(path).convert("RGB")
    assert torch.equal(load_image(opened), load_image(first))
    _assert_same_pixels(procs, str(path), first)


# -- bad input: a clear ImageError each ----------------------------------------------------------------

def test_truncated_png_file(tmp_path):
    path = tmp_path / "cut.png"
    path.write_bytes(_png(Image.fromarray(_rgb(200, 200)))[:3000])
    with pytest.raises(ImageError, match="truncated or corrupt"):
        load_image(str(path))


def test_truncated_jpeg_bytes():
    data = _png(Image.fromarray(_rgb(200, 200)), format="JPEG")
    with pytest.raises(ImageError, match="truncated or corrupt"):
        load_image(data[: len(data) // 3])


def test_non_image_bytes():
    with pytest.raises(ImageError, match="not a recognised image format"):
        load_image(b"%PDF-1.4 this is not an image at all" * 10)


def test_empty_bytes():
    with pytest.raises(ImageError, match="empty"):
        load_image(b"")


def test_bad_base64_and_missing_paths_say_what_is_wrong(tmp_path):
    for missing in ("not/a/real/file.png", "abcd", "nope.png"):  # short strings are paths, not base64
        with pytest.raises(ImageError, match=f"^no image file at '{missing}'$"):
            load_image(missing)
    with pytest.raises(ImageError, match="is a directory, not an image file"):
        load_image(str(tmp_path))
    with pytest.raises(ImageError, match="is a directory, not an image file"):
        load_image(tmp_path)
    with pytest.raises(ImageError, match="neither an existing file nor valid base64"):
        load_image("data:image/png;base64,@@@not-base64@@@")
    with pytest.raises(ImageError, match="neither an existing file nor valid base64"):
        load_image("@" * 300)


def test_data_url_without_base64():
    with pytest.raises(ImageError, match="data URL must look like"):
        load_image("data:image/png,rawdata")


def test_url_is_not_fetched():
    with pytest.raises(ImageError, match="not fetched"):
        load_image("https://example.com/cat.png")


@pytest.mark.parametrize("src", [Image.new("RGB", (0, 10)), np.zeros((0, 5, 3), np.uint8), np.zeros((5, 0), np.uint8)])
def test_zero_sized_image(src):
    with pytest.raises(ImageError, match="no pixels"):
        load_image(src)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares a huge size (its pixel data never follows): a decompression bomb's shape."""
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_before_decoding():
    with pytest.raises(ImageError, match="max_image_pixels"):
        load_image(_png_header_only(12_000, 12_000))  # 144 Mpx: above our default limit, below PIL's error
    with pytest.raises(ImageError, match="decompression-bomb"):
        load_image(_png_header_only(30_000, 30_000))  # PIL refuses to open it at all


def test_pixel_limit_is_configurable(procs):
    image = Image.fromarray(_rgb(100, 100))
    with pytest.raises(ImageError, match="10,000 pixels exceeds max_image_pixels=9,999"):
        procs[0](text="<image>", images=[image], max_image_pixels=9_999)
    assert procs[0](text="<image>", images=[image], max_image_pixels=10_000)["pixel_values"].shape[0] == 1


@pytest.mark.parametrize("src, msg", [
    (42, "unsupported image source"),
    (np.zeros((10, 10, 3), np.float32), "must be uint8"),
    (np.zeros((10, 10, 2), np.uint8), "channels last"),
    (torch.zeros(5, 10, 10, dtype=torch.uint8), r"\(C, H, W\)"),
])
def test_unsupported_inputs(src, msg):
    with pytest.raises(ImageError, match=msg):
        load_image(src)


# -- resize numerics -------------------------------------------------------------------------------------

SIZES = [((45, 67), (64, 96)), ((300, 200), (96, 160)), ((977, 1024), (512, 512)), ((1, 1), (256, 256)),
         ((5000, 1), (4992, 32)), ((33, 500), (32, 512))]


@pytest.mark.parametrize("mode, native", [("bilinear", True), ("bilinear", False), ("bicubic", True)],
                         ids=["bilinear-uint8-kernel", "bilinear-float-fallback", "bicubic"])
def test_resize_equals_torchvision(monkeypatch, mode, native):
    reference.transformers()
    from torchvision.transforms.v2 import functional as tvF

    if not native:  # the path torchvision takes for bilinear on CPUs without AVX2
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    interpolation = {"bilinear": tvF.InterpolationMode.BILINEAR, "bicubic": tvF.InterpolationMode.BICUBIC}[mode]
    rng = np.random.default_rng(5)
    for (h, w), (th, tw) in SIZES:
        image = torch.from_numpy(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).permute(2, 0, 1)
        expected = tvF.resize(image.contiguous(), [th, tw], interpolation=interpolation, antialias=True)
        assert torch.equal(resize(image, th, tw, mode), expected), ((h, w), (th, tw))


def test_load_image_file_names_what_is_wrong_with_a_typed_path(tmp_path, monkeypatch):
    from lfm2vl.processing import ImageError, load_image_file

    monkeypatch.setenv("HOME", str(tmp_path))
    Image.new("RGB", (5, 3), (255, 0, 0)).save(tmp_path / "red.png")
    assert load_image_file("~/red.png").shape == (3, 3, 5)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    for path, why in ((tmp_path, "is a directory"), (tmp_path / "missing.png", "no such file"),
                      ("aGVsbG8gd29ybGQgaGVsbG8gd29ybGQ=", "no such file"), (tmp_path / "bad.png", "not a recognised image")):
        with pytest.raises(ImageError, match=why):
            load_image_file(path)
