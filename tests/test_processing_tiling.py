"""The pure tiling plan against transformers' own geometry functions, the announcement's goldens (docs/processing.md), and the
announcement numbers (no pixels involved)."""

import itertools
import random

import pytest

import reference
from lfm2vl.processing import ImageSettings, plan_tiles
from lfm2vl.processing.tiling import target_ratios

# Sizes (width, height) the issue names, then both sides of every threshold, then random ones.
REQUIRED_SIZES = [
    (1, 1), (1, 5000), (5000, 1), (100, 100), (256, 384), (720, 720), (704, 704), (724, 724),
    (736, 736), (1024, 977), (1056, 384), (1024, 1024), (2560, 1440), (3000, 1000),
    (384, 680), (1000, 3000), (512, 1024), (960, 540), (1600, 1600),
]


def _sizes() -> list[tuple[int, int]]:
    rng = random.Random(1234)
    sizes = list(REQUIRED_SIZES)
    sizes += [(s, s) for s in range(688, 768, 4)]  # the tiling threshold band (about 724 px)
    sizes += [(16 + 32 * k, 16 + 32 * k + 32) for k in range(0, 40, 3)]  # exact .5 roundings
    sizes += [(w, h) for w, h in itertools.product((1, 2, 31, 32, 33), (17, 64, 999))]
    while len(sizes) < 330:
        w = int(round(10 ** rng.uniform(0, 3.5)))  # 1 .. ~3200, log-uniform
        h = int(round(w * 10 ** rng.uniform(-1.3, 1.3)))
        if 1 <= h <= 3200 and w * h <= 4_000_000:
            sizes.append((w, h))
    return list(dict.fromkeys(sizes))


SIZES = _sizes()

# The settings matrix of the issue (resample does not change the plan; the parity test covers it).
MATRIX = [
    dict(do_image_splitting=split, use_thumbnail=thumb, max_image_tokens=tok, max_tiles=tiles)
    for split, thumb, tok, tiles in itertools.product((True, False), (True, False), (64, 128, 256), (4, 10))
]
EXTRA = [dict(max_pixels_tolerance=1.5), dict(min_tiles=1, max_tiles=4), dict(min_image_tokens=128),
         dict(use_image_special_tokens=False), dict(tile_size=384, max_tiles=6)]


@pytest.fixture(scope="module")
def ref(processor_ckpt):
    return reference.load_reference_processor(processor_ckpt)


def reference_plan(ref, width: int, height: int, s: ImageSettings):
    """(crop sizes (h, w), placeholder string) from transformers' own primitives, orchestrated as
    `Lfm2VlImageProcessor._preprocess` / `resize_and_split` and `Lfm2VlProcessor.replace_image_token` do."""
    ip = ref.image_processor
    min_tiles, max_tiles = (s.min_tiles, s.max_tiles) if s.do_image_splitting else (1, 1)
    large = ip._is_image_too_large(height, width, s.max_image_tokens, s.encoder_patch_size,
                                   s.downsample_factor, s.max_pixels_tolerance)
    new_w, new_h = ip.smart_resize(height, width, s.downsample_factor, s.min_image_tokens,
                                   s.max_image_tokens, s.encoder_patch_size)
    rows = cols = 1
    crops = [(new_h, new_w)]
    if large and not min_tiles == max_tiles == 1:
        cols, rows, *_ = ip._get_grid_layout(height, width, min_tiles, max_tiles, s.tile_size)
        crops = [(s.tile_size, s.tile_size)] * (rows * cols)
        if s.use_thumbnail and rows * cols != 1:
            crops.append((new_h, new_w))
    per_tile = ref._compute_tokens_per_tile(s.tile_size, s.encoder_patch_size, s.downsample_factor)
    for_image = ref._compute_tokens_for_image([new_h, new_w], s.encoder_patch_size, s.downsample_factor)
    text = ref._build_image_tokens(rows, cols, per_tile, for_image, s.use_thumbnail, s.use_image_special_tokens)
    return crops, text


def test_candidate_grid_order_is_the_references(ref):
    for lo, hi in [(2, 10), (1, 4), (2, 4), (1, 12), (3, 9)]:
        assert list(target_ratios(lo, hi)) == ref.image_processor._target_ratios(lo, hi)


def test_plan_matches_reference_geometry_on_every_size_and_setting(ref):
    assert len(SIZES) >= 300
    base = ImageSettings()
    checked = 0
    for (w, h), kw in itertools.product(SIZES, MATRIX + EXTRA):
        s = base.with_overrides(**kw)
        crops, text = reference_plan(ref, w, h, s)
        if max(ch * cw for ch, cw in crops) // s.encoder_patch_size**2 > s.max_num_patches:
            with pytest.raises(ValueError, match="too elongated"):  # the reference pads past its own mask
                plan_tiles(w, h, s)
            continue
        plan = plan_tiles(w, h, s)
        if plan.rows * plan.cols == 1 and plan.tiled:
            continue  # 1 x 1 grid: see test_one_by_one_grid_counts_its_own_tile
        assert [(c.height, c.width) for c in plan.crops] == crops, (w, h, kw)
        assert plan.placeholder(s.use_image_special_tokens) == text, (w, h, kw)
        checked += 1
    assert checked > 0.9 * len(SIZES) * len(MATRIX + EXTRA)


@pytest.mark.parametrize("kw", MATRIX + EXTRA)
def test_plan_is_self_consistent(kw):
    s = ImageSettings().with_overrides(**kw)
    for w, h in SIZES[::7]:
        try:
            plan = plan_tiles(w, h, s)
        except ValueError:
            continue
        ps, f = s.encoder_patch_size, s.total_factor
        assert plan.image_tokens == sum((c.height // f) * (c.width // f) for c in plan.crops)
        assert plan.placeholder(True).count("<image>") == plan.image_tokens
        assert plan.num_tokens(True) == plan.image_tokens + len(plan.markers(True))
        assert all(c.height % f == 0 and c.width % f == 0 for c in plan.crops)
        assert all(a * b <= s.max_num_patches for a, b in plan.spatial_shapes)
        assert plan.spatial_shapes == [(c.height // ps, c.width // ps) for c in plan.crops]
        tiles = [c for c in plan.crops if c.kind == "tile"]
        assert [(c.row, c.col) for c in tiles] == [(r + 1, c + 1) for r in range(plan.rows) for c in range(plan.cols)] \
            or not tiles


def test_announcement_numbers():
    s = ImageSettings()
    for w, h in [(256, 384), (384, 256)]:  # reproduces in either orientation, whenever the budget allows 96
        for kw in MATRIX + [dict(max_pixels_tolerance=1.5)]:
            if kw.get("max_image_tokens", 256) < 96:
                continue
            assert plan_tiles(w, h, s.with_overrides(**kw)).image_tokens == 96
    # 384x680 -> 240 and 1000x3000 -> 1,020 do not reproduce under the reference (docs/processing.md).
    assert plan_tiles(384, 680, s).image_tokens == 252
    plan = plan_tiles(1000, 3000, s)
    assert (plan.cols, plan.rows) == (1, 3)
    assert (plan.crops[-1].kind, plan.crops[-1].width, plan.crops[-1].height) == ("thumbnail", 288, 864)
    assert plan.image_tokens == 3 * 256 + 9 * 27 == 1011
    assert plan.num_tokens() == 1017
    assert plan_tiles(1000, 3000, s.with_overrides(use_thumbnail=False)).image_tokens == 768


@pytest.mark.parametrize("size, kw, tokens, ncrops", [
    ((512, 1024), {}, 242, 1),
    ((512, 1024), {"max_pixels_tolerance": 1.5}, 754, 3),
    ((1024, 1024), {}, 1280, 5),
    ((720, 720), {}, 256, 1),  # 720/32 = 22.5 rounds to 22 (half to even): not tiled
    ((704, 704), {}, 256, 1),
    ((724, 724), {}, 1280, 5),  # 724/32 = 22.6 rounds to 23: tiled (the guard floors at 16, not 32)
    ((736, 736), {}, 1280, 5),
    ((1024, 977), {}, 4 * 256 + 240, 5),  # thumbnail 512 x 480
    ((1056, 384), {}, 234, 1),  # 405,504 px: under the tiling threshold, downscaled to 832 x 288
    ((100, 100), {}, 64, 1),
    ((960, 540), {}, 252, 1),
    ((2560, 1440), {}, 2300, 9),
])
def test_spec_goldens(size, kw, tokens, ncrops):
    plan = plan_tiles(*size, ImageSettings().with_overrides(**kw))
    assert (plan.image_tokens, len(plan.crops)) == (tokens, ncrops)


def test_mlx_vlm_golden_2560x1440():
    plan = plan_tiles(2560, 1440, ImageSettings())
    assert (plan.cols, plan.rows) == (4, 2)  # the (2,1)/(4,2) tie goes to the area rule
    assert plan.spatial_shapes == [(32, 32)] * 8 + [(24, 42)]
    assert 24 * 42 == 1008


def test_lower_budget_can_mean_more_tokens():
    """docs/architecture.md §7: max_image_tokens also sets the tiling threshold, so lowering it can tile an image."""
    s = ImageSettings()
    at_256 = plan_tiles(600, 600, s)
    at_128 = plan_tiles(600, 600, s.with_overrides(max_image_tokens=128))
    assert not at_256.tiled and at_256.image_tokens <= 256
    assert at_128.tiled and at_128.image_tokens > at_256.image_tokens


def test_one_by_one_grid_counts_its_own_tile(ref):
    """With min_tiles=1 a barely-too-large image gets a 1x1 grid: one 512x512 tile, no thumbnail.
    Upstream then counts the smart-resize size (240) while its features are 256; we count 256."""
    s = ImageSettings().with_overrides(min_tiles=1, max_tiles=4)
    crops, text = reference_plan(ref, 760, 689, s)
    assert crops == [(512, 512)] and text.count("<image>") == 240
    plan = plan_tiles(760, 689, s)
    assert [(c.kind, c.height, c.width) for c in plan.crops] == [("tile", 512, 512)]
    assert plan.image_tokens == 256 == plan.placeholder().count("<image>")
    assert plan.markers() == ["<|image_start|>", "<|image_end|>"]


def test_elongated_image_is_a_clear_error():
    with pytest.raises(ValueError, match="too elongated.*max_num_patches=1024"):
        plan_tiles(1, 5000, ImageSettings().with_overrides(max_image_tokens=64))
    assert plan_tiles(1, 5000, ImageSettings()).image_tokens == 156


@pytest.mark.parametrize("w, h", [(0, 10), (10, 0), (-1, 5)])
def test_zero_sized_plan_is_an_error(w, h):
    with pytest.raises(ValueError, match="no pixels"):
        plan_tiles(w, h, ImageSettings())
