"""End-to-end parity with transformers' Lfm2VlProcessor: input_ids, pixel_values, pixel_attention_mask
and spatial_shapes on 300+ image sizes crossed with the settings matrix of the issue."""

import numpy as np
import pytest
import torch
from PIL import Image

from test_processing_tiling import MATRIX, REQUIRED_SIZES, SIZES

RESAMPLES = (2, 3)  # bilinear, bicubic (the LFM2-VL checkpoints ship 3)
KEYS = ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask", "spatial_shapes")



pytestmark = pytest.mark.usefixtures("one_thread")




def noise(w: int, h: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(w * 7919 + h).integers(0, 256, (h, w, 3), dtype=np.uint8))


def assert_parity(procs, text, images, **kw):
    ours, ref = procs
    r = ref(text=text, images=images, return_tensors="pt", padding=True, **kw)
    try:
        o = ours(text=text, images=images, **kw)
    except ValueError as e:
        # Only where the reference's own output is inconsistent: a crop with more patches than the
        # padded length (it pads nothing and keeps a max_num_patches-long all-ones mask).
        assert "too elongated" in str(e)
        assert r["pixel_values"].shape[1] != r["pixel_attention_mask"].shape[1], "we refused a valid input"
        return None
    assert set(o) == set(r), (sorted(o), sorted(r))
    for key in KEYS:
        if key in r:
            a, b = o[key], r[key]
            assert a.dtype == b.dtype and a.shape == b.shape, (key, a.dtype, b.dtype, a.shape, b.shape)
            assert torch.equal(a, b), (key, (a.double() - b.double()).abs().max())  # bit-exact, stricter than 1e-6
    return o


def _cases():
    """Every size once with settings taken from the matrix in turn (every value of every knob
    appears), alternating the filter; the sizes the issue names also get the whole matrix below."""
    cases = []
    for i, (w, h) in enumerate(SIZES):
        kw = {**MATRIX[i % len(MATRIX)], "resample": RESAMPLES[(i // len(MATRIX)) % 2]}
        cases.append(((w, h), kw))
    return cases


CASES = _cases()


def test_cases_cover_the_issue():
    assert len({size for size, _ in CASES}) >= 300
    for knob, values in [("do_image_splitting", {True, False}), ("use_thumbnail", {True, False}),
                         ("max_image_tokens", {64, 128, 256}), ("max_tiles", {4, 10}), ("resample", {2, 3})]:
        assert {kw[knob] for _, kw in CASES} == values, knob


@pytest.mark.parametrize("chunk", range(8))
def test_parity_on_300_sizes(procs, chunk):
    for (w, h), kw in CASES[chunk::8]:
        assert_parity(procs, "Describe <image> briefly.", [noise(w, h)], **kw)


def _checkerboard(half: int) -> list[dict]:
    """Half of the matrix, alternating like a checkerboard: each value of each knob is in both halves."""
    def parity(kw):
        return sum([kw["do_image_splitting"], kw["use_thumbnail"], kw["max_image_tokens"] // 64 % 3,
                    kw["max_tiles"] == 10]) % 2
    return [kw for kw in MATRIX if parity(kw) == half]


def test_checkerboard_halves_cover_every_value():
    for half in (0, 1):
        chosen = _checkerboard(half)
        assert len(chosen) == len(MATRIX) // 2
        for knob in ("do_image_splitting", "use_thumbnail", "max_image_tokens", "max_tiles"):
            assert {kw[knob] for kw in chosen} == {kw[knob] for kw in MATRIX}, (half, knob)


@pytest.mark.parametrize("resample", RESAMPLES)
def test_named_sizes_across_the_whole_matrix(procs, resample):
    """The issue's sizes under every setting combination (each combination with one filter, the
    filters alternating; the geometry of the full cross is in test_processing_tiling), several
    images per call so that they also form one vision batch."""
    images = [noise(w, h) for w, h in REQUIRED_SIZES]
    for kw in _checkerboard(RESAMPLES.index(resample)):
        # 1 x 5000 at 64/128 tokens is refused, where the reference's output is inconsistent: alone.
        alone = [im for im in images if min(im.size) == 1 and kw["max_image_tokens"] < 256]
        together = [im for im in images if im not in alone]
        assert_parity(procs, "<image>" * len(together), together, resample=resample, **kw)
        for im in alone:
            assert_parity(procs, "<image>", [im], resample=resample, **kw)


def test_batch_of_texts_with_images_per_sample(procs):
    images = [noise(300, 200), noise(1500, 800), noise(64, 64), noise(800, 2000)]
    texts = ["<image> first <image>", "second, no image", "third <image> and <image>"]
    assert_parity(procs, texts, [images[:2], [], images[2:]])
    o = assert_parity(procs, texts, [images[:2], [], images[2:]], resample=3, max_image_tokens=128)
    assert o["attention_mask"][1, 0] == 0 and o["input_ids"][1, 0] == procs[0].pad_token_id  # left padding


def test_flat_image_list_for_a_batch_follows_placeholder_order(procs):
    ours = procs[0]
    images = [noise(300, 200), noise(64, 64), noise(900, 900)]
    texts = ["a <image>", "b <image> c <image>"]
    flat = ours(text=texts, images=images)
    nested = ours(text=texts, images=[images[:1], images[1:]])
    assert all(torch.equal(flat[k], nested[k]) for k in nested)


def test_packed_equals_padded_without_padding(procs):
    ours = procs[0]
    images = [noise(2560, 1440), noise(256, 384)]
    padded = ours(text="<image><image>", images=images)
    packed = ours(text="<image><image>", images=images, packed=True)
    assert set(packed) == {"input_ids", "attention_mask", "pixel_values", "spatial_shapes"}
    rows = padded["pixel_attention_mask"].bool()
    assert torch.equal(packed["pixel_values"], padded["pixel_values"][rows])  # (sum_patches, 768)
    assert torch.equal(packed["spatial_shapes"], padded["spatial_shapes"])
    assert packed["pixel_values"].shape[0] == int(padded["spatial_shapes"].prod(-1).sum())


def test_text_only(procs):
    assert_parity(procs, "Just text, no image.", None)
    assert_parity(procs, ["short", "a somewhat longer text"], None)
