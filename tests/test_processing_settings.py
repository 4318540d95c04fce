"""ImageSettings: defaults, validation, per-call overrides, and where checkpoint settings come from
(the precedence transformers' loader applies, pinned against AutoProcessor)."""

import json
import logging
import shutil

import pytest
from PIL import Image

import reference
from lfm2vl.processing import ImageSettings

KNOBS = ["min_image_tokens", "max_image_tokens", "do_image_splitting", "min_tiles", "max_tiles", "tile_size",
         "use_thumbnail", "max_pixels_tolerance", "encoder_patch_size", "downsample_factor", "max_num_patches"]


def _resample_name(ip) -> str:
    return {2: "bilinear", 3: "bicubic"}[int(ip.resample)]


def _reference_settings(ip) -> dict:
    return {**{k: getattr(ip, k) for k in KNOBS}, "resample": _resample_name(ip)}


def _ours(s: ImageSettings) -> dict:
    return {**{k: getattr(s, k) for k in KNOBS}, "resample": s.resample}


def test_defaults_are_the_reference_class_defaults():
    ip = reference.transformers().Lfm2VlImageProcessor()
    assert _ours(ImageSettings()) == _reference_settings(ip)
    assert ImageSettings().image_mean == tuple(ip.image_mean) and ImageSettings().image_std == tuple(ip.image_std)
    assert ImageSettings().rescale_factor == ip.rescale_factor


@pytest.mark.parametrize("kw", [dict(do_image_splitting=False), dict(max_image_tokens=64, do_image_splitting=False),
                                dict(max_image_tokens=512), dict(tile_size=256)])
def test_max_num_patches_is_derived_like_the_reference(kw):
    ip = reference.transformers().Lfm2VlImageProcessor(**kw)
    assert ImageSettings().with_overrides(**kw).max_num_patches == ip.max_num_patches


def test_overrides_validate_and_none_keeps():
    s = ImageSettings()
    assert s.with_overrides(max_image_tokens=None) is s
    t = s.with_overrides(resample=3, max_tiles=4)
    assert (t.resample, t.max_tiles, s.max_tiles) == ("bicubic", 4, 10)
    assert s.with_overrides(resample=Image.Resampling.BILINEAR).resample == "bilinear"
    assert s.with_overrides(resample="BICUBIC").resample == "bicubic"


def test_unknown_override_names_the_valid_keys():
    with pytest.raises(ValueError, match=r"unknown image setting\(s\) \['max_tokens'\].*max_image_tokens"):
        ImageSettings().with_overrides(max_tokens=10)


def test_min_above_max_tokens_is_an_error():
    with pytest.raises(ValueError, match=r"min_image_tokens \(300\) > max_image_tokens \(256\)"):
        ImageSettings().with_overrides(min_image_tokens=300)


def test_min_above_max_tiles_is_an_error():
    with pytest.raises(ValueError, match=r"min_tiles \(5\) > max_tiles \(4\)"):
        ImageSettings().with_overrides(min_tiles=5, max_tiles=4)
    # With splitting off the tile range is unused, and the reference accepts it too.
    assert ImageSettings(do_image_splitting=False, min_tiles=5, max_tiles=4).max_tiles == 4


def test_tile_size_must_be_a_multiple_of_32():
    with pytest.raises(ValueError, match=r"tile_size \(500\) must be a multiple of .* \(32\)"):
        ImageSettings().with_overrides(tile_size=500)
    with pytest.raises(ValueError, match="multiple"):
        ImageSettings().with_overrides(tile_size=496)  # a multiple of 16 is not enough


@pytest.mark.parametrize("kw, msg", [
    (dict(resample=1), "resample=1 is not supported"),
    (dict(resample="lanczos"), "not supported"),
    (dict(max_image_tokens=0), "positive integer"),
    (dict(max_tiles=2.5), "positive integer"),
    (dict(max_pixels_tolerance=0), "max_pixels_tolerance"),
    (dict(image_std=(0.5, 0.0, 0.5)), "std > 0"),
    (dict(max_image_pixels=-1), "positive integer"),
])
def test_bad_values_are_clear_errors(kw, msg):
    with pytest.raises(ValueError, match=msg):
        ImageSettings().with_overrides(**kw)


# -- checkpoint layouts ------------------------------------------------------------------------------

PRE = {"image_processor_type": "Lfm2VlImageProcessor", "processor_class": "Lfm2VlProcessor", "resample": 3,
       "max_image_tokens": 128, "do_resize": False, "patch_size": 16, "max_num_patches": 1024, "min_tiles": 3}
LEGACY = {"processor_class": "Lfm2VlProcessor", "use_thumbnail": False, "max_pixels_tolerance": 1.5,
          "max_image_tokens": 200, "min_image_tokens": 32, "max_tiles": 4, "use_image_special_tokens": False}
NESTED = {"image_processor_type": "Lfm2VlImageProcessor", "max_image_tokens": 64, "use_thumbnail": False}


def _layout(src, dst, processor_config, preprocessor_config):
    shutil.copytree(src, dst)
    (dst / "processor_config.json").unlink()
    if processor_config is not None:
        (dst / "processor_config.json").write_text(json.dumps(processor_config))
    if preprocessor_config is not None:
        (dst / "preprocessor_config.json").write_text(json.dumps(preprocessor_config))
    return dst


@pytest.mark.parametrize("name, processor_config, preprocessor_config", [
    ("nested_only", {"processor_class": "Lfm2VlProcessor", "image_processor": NESTED}, None),
    ("preprocessor_only", None, PRE),
])
def test_single_source_matches_transformers(processor_ckpt, tmp_path, name, processor_config, preprocessor_config):
    folder = _layout(processor_ckpt, tmp_path / name, processor_config, preprocessor_config)
    ip = reference.load_reference_processor(folder).image_processor
    assert _ours(ImageSettings.from_pretrained(folder)) == _reference_settings(ip)


@pytest.mark.parametrize("name, processor_config, preprocessor_config, from_lower", [
    # the Hub repos: preprocessor_config.json + legacy top-level keys; the preprocessor wins where both set a key
    ("preprocessor_and_legacy", LEGACY, PRE,
     dict(use_thumbnail=False, max_pixels_tolerance=1.5, min_image_tokens=32, max_tiles=4, use_image_special_tokens=False)),
    ("nested_and_preprocessor", {"processor_class": "Lfm2VlProcessor", "image_processor": NESTED}, PRE,
     dict(resample="bicubic", min_tiles=3)),
    ("nested_and_legacy_top_level", {**LEGACY, "image_processor": NESTED}, None,
     dict(max_pixels_tolerance=1.5, min_image_tokens=32, max_tiles=4, use_image_special_tokens=False)),
])
def test_sources_are_merged_with_transformers_precedence(processor_ckpt, tmp_path, name, processor_config,
                                                         preprocessor_config, from_lower):
    """Keys set by several files follow transformers' order; keys only a lower file sets are used too."""
    folder = _layout(processor_ckpt, tmp_path / name, processor_config, preprocessor_config)
    ip = reference.load_reference_processor(folder).image_processor
    expected = {**_reference_settings(ip), **from_lower}
    ours = ImageSettings.from_pretrained(folder)
    assert {**_ours(ours), "use_image_special_tokens": ours.use_image_special_tokens} == \
        {"use_image_special_tokens": True, **expected}
    top = NESTED if "nested" in name else PRE
    for key, value in top.items():  # the highest source wins every conflict
        if key in expected and key != "resample":
            assert expected[key] == value, key


def test_legacy_only_layout_is_read(processor_ckpt, tmp_path):
    """Liquid's original layout (flat keys in processor_config.json only): transformers cannot load it."""
    folder = _layout(processor_ckpt, tmp_path / "legacy", LEGACY, None)
    with pytest.raises(OSError):
        reference.load_reference_processor(folder)
    s = ImageSettings.from_pretrained(folder)
    assert (s.use_thumbnail, s.max_pixels_tolerance, s.max_image_tokens, s.min_image_tokens, s.max_tiles) == \
        (False, 1.5, 200, 32, 4)
    assert s.use_image_special_tokens is False


def test_knobs_from_lower_sources_are_reported(processor_ckpt, tmp_path, caplog):
    folder = _layout(processor_ckpt, tmp_path / "both", LEGACY, PRE)
    with caplog.at_level(logging.WARNING, logger="lfm2vl"):
        s = ImageSettings.from_pretrained(folder)
    assert s.max_pixels_tolerance == 1.5 and s.max_image_tokens == 128  # legacy fills a gap; PRE wins a conflict
    assert "max_pixels_tolerance" in caplog.text and "lower-precedence" in caplog.text


def test_saved_by_transformers_round_trips(processor_ckpt):
    ip = reference.load_reference_processor(processor_ckpt).image_processor
    assert _ours(ImageSettings.from_pretrained(processor_ckpt)) == _reference_settings(ip)


def test_config_aliases_and_unsupported_switches():
    assert ImageSettings.from_dict({"patch_size": 14, "tile_size": 448}).encoder_patch_size == 14
    assert ImageSettings.from_dict({"patch_size": 14, "encoder_patch_size": 16}).encoder_patch_size == 16
    assert ImageSettings.from_dict({"image_mean": 0.5}).image_mean == (0.5, 0.5, 0.5)
    assert ImageSettings.from_dict({"some_future_key": 1}).unknown_keys == ("some_future_key",)
    with pytest.raises(ValueError, match="do_normalize=false is not supported"):
        ImageSettings.from_dict({"do_normalize": False})


def test_unreadable_config_is_a_clear_error(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read .*preprocessor_config.json"):
        ImageSettings.from_pretrained(tmp_path)
