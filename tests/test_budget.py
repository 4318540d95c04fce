"""The device-aware image budget (lfm2vl/budget.py): the choice follows the cost model, user settings
stay fixed, the calibration is cached per device and model, and bad requests say what is wrong."""

import json

import pytest

import lfm2vl
from lfm2vl.budget import Calibration, calibration, calibration_key, candidates, choose
from lfm2vl.processing import ImageSettings

ROOT = __import__("pathlib").Path(__file__).parent.parent
# LFM2-VL's own processor defaults (max 256 image tokens, tiles of 512, 2-10 tiles, thumbnail)
FULL = ImageSettings()
# a cost model of a slow device: 1 ms per token of prefill, vision quadratic in a crop's patches
SLOW = Calibration(prefill_fixed_s=0.05, prefill_per_token_s=1e-3, vision_per_patch_s=2e-4, vision_per_call_s=0.02)


class _Processor:  # what `choose` needs of a processor: its settings and the tiling plan
    def __init__(self, settings: ImageSettings):
        self.settings = settings

    def plan(self, width, height, **overrides):
        from lfm2vl.processing.tiling import plan_tiles

        return plan_tiles(width, height, self.settings.with_overrides(**overrides))


@pytest.mark.parametrize("size", [(1024, 1024), (2048, 768), (300, 200)])
def test_the_choice_is_the_largest_budget_predicted_to_meet_the_target(size):
    proc = _Processor(FULL)
    scored = []
    for settings in candidates(FULL, {}):
        try:
            plan = proc.plan(*size, **settings)
        except ValueError:  # too elongated for a small budget: `choose` skips it
            continue
        scored.append((plan.image_tokens, SLOW.ttft_s(20, [plan])))
    previous = -1
    for target in (0.01, 0.3, 0.6, 1.0, 2.0, 5.0, 100.0):
        c = choose(proc, SLOW, [size], 20, target, {})
        assert c.image_tokens >= previous  # a looser target never buys fewer tokens
        previous = c.image_tokens
        fitting = [tokens for tokens, t in scored if t <= target]
        if fitting:
            assert c.meets_target and c.predicted_ttft_s <= target and c.image_tokens == max(fitting)
        else:  # nothing fits: the fastest budget, and it says so
            assert not c.meets_target and c.predicted_ttft_s == min(t for _, t in scored)
        plan = proc.plan(*size, **c.settings)
        assert plan.image_tokens == c.image_tokens
        assert c.predicted_ttft_s == pytest.approx(SLOW.ttft_s(20, [plan]))
    if size == (1024, 1024):  # a generous target gets the checkpoint's own default budget (10 tiles max)
        assert choose(proc, SLOW, [size], 20, 100.0, {}).image_tokens == proc.plan(*size).image_tokens


def test_settings_the_user_gave_are_never_changed():
    for fixed in ({"do_image_splitting": False}, {"use_thumbnail": False}, {"max_tiles": 4, "min_tiles": 2}):
        for c in candidates(FULL, fixed):
            assert {k: c[k] for k in fixed} == fixed, (fixed, c)
    assert all(not c["do_image_splitting"] for c in candidates(FULL, {"do_image_splitting": False}))
    assert max(c.get("max_tiles", 0) for c in candidates(FULL, {"max_tiles": 4})) == 4
    # every candidate is a valid setting
    for c in candidates(FULL, {}):
        FULL.with_overrides(**c)


def test_calibration_is_measured_once_then_read_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LFM2VL_CACHE", str(tmp_path))
    model = lfm2vl.load()
    first = calibration(model)
    assert first.prefill_per_token_s > 0 and first.vision_per_patch_s > 0 and first.measured_s > 0
    stored = json.loads((tmp_path / "calibration.json").read_text())
    assert list(stored) == [calibration_key(model)]

    def never(*_a, **_k):
        raise AssertionError("measured again")

    monkeypatch.setattr("lfm2vl.budget.calibrate", never)
    assert calibration(model) == first
    model.to(dtype="bfloat16")  # another dtype is another device profile: measured anew
    assert calibration_key(model) not in stored


def test_auto_budget_through_the_api_and_the_command_line(tmp_path, monkeypatch):
    import subprocess
    import sys

    monkeypatch.setenv("LFM2VL_CACHE", str(tmp_path))
    model = lfm2vl.load()
    conv = [{"role": "user", "content": [{"type": "image", "image": str(ROOT / "examples/red_circle.png")},
                                         {"type": "text", "text": "what shape is in the image?"}]}]
    assert model.generate(conv, max_image_tokens="auto", latency_target=5.0) == "circle"
    choice = model.plan_budget(conv, 5.0)
    assert choice.meets_target and choice.image_tokens == model.request(conv, **choice.settings).images[0].tokens
    with pytest.raises(ValueError, match="go together"):
        model.generate(conv, max_image_tokens="auto")
    with pytest.raises(ValueError, match="go together"):
        model.generate(conv, latency_target=1.0)
    with pytest.raises(ValueError, match="positive number of seconds"):
        model.generate(conv, max_image_tokens="auto", latency_target=-1)
    env = {**__import__("os").environ, "LFM2VL_CACHE": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "lfm2vl", "generate", "--image", str(ROOT / "examples/red_circle.png"),
                        "--prompt", "what shape is in the image?", "--max-image-tokens", "auto",
                        "--latency-target", "5", "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.splitlines()[-1])
    assert out["text"] == "circle" and out["image_budget"] == choice.settings
    assert "image budget:" in r.stderr and "meets the 5 s target" in r.stderr
    # chat says so too, for each turn whose conversation holds an image (the first has none to budget)
    script = f"hello\n/image {ROOT / 'examples/red_circle.png'}\nwhat shape is in the image?\nand its color?\n"
    r = subprocess.run([sys.executable, "-m", "lfm2vl", "chat", "--max-image-tokens", "auto", "--latency-target", "5"],
                       input=script, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 3, r.stderr
    assert r.stderr.count("image budget:") == 2 and "meets the 5 s target" in r.stderr
    r = subprocess.run([sys.executable, "-m", "lfm2vl", "generate", "--prompt", "hi", "--max-image-tokens", "auto"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2 and r.stderr.strip() == "error: --max-image-tokens auto and --latency-target SECONDS go together"


def test_when_nothing_fits_equal_predictions_choose_the_smallest_budget():
    proc = _Processor(FULL)
    flat = Calibration(prefill_fixed_s=2.0, prefill_per_token_s=0.0, vision_per_patch_s=0.0, vision_per_call_s=0.0)
    c = choose(proc, flat, [(1024, 1024)], 20, 1.0, {})  # every budget predicted 2 s: none meets 1 s
    assert not c.meets_target
    smallest = min(proc.plan(1024, 1024, **s).image_tokens for s in candidates(FULL, {}))
    assert c.image_tokens == smallest


def test_a_short_context_an_unwritable_cache_and_a_degenerate_calibration(tmp_path, monkeypatch):
    import lfm2vl.budget as budget

    real_calibrate = budget.calibrate
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("LFM2VL_CACHE", str(blocker / "cache"))  # under a file: cannot be created
    monkeypatch.setattr(budget, "_THIS_PROCESS", {})
    model = lfm2vl.load()
    model.configure_engine(max_len=300)  # the 512-token calibration prompt would not fit
    with pytest.warns(UserWarning, match="could not cache the image-budget calibration"):
        first = calibration(model)
    assert first.prefill_per_token_s > 0 and first.vision_per_patch_s > 0
    monkeypatch.setattr(budget, "calibrate", lambda *_a, **_k: pytest.fail("measured again"))
    assert calibration(model) == first  # kept for this process, not measured on every request

    short_key = calibration_key(model)
    for too_short in (8, 40):  # 40: the text prompts fit, an image and its template would not
        model.configure_engine(max_len=too_short)
        with pytest.raises(ValueError, match="too short to calibrate"):
            real_calibrate(model)
    model.configure_engine(max_len=4096)
    assert calibration_key(model) != short_key  # a short context's cruder fit is never reused for a long one

    monkeypatch.setenv("LFM2VL_CACHE", str(tmp_path))
    flat = Calibration(0.1, 0.0, 0.0, 0.0)
    monkeypatch.setattr(budget, "calibrate", lambda *_a, **_k: flat)
    with pytest.warns(UserWarning, match="not cached"):
        assert calibration(model, recalibrate=True) == flat
    assert not (tmp_path / "calibration.json").exists()  # the next process measures again


def test_vision_calls_are_counted_as_the_engine_groups_crops():
    """Four 512x512 tiles and a small thumbnail: five calls one tile at a time, three two tiles at a time."""
    crops = [1024, 1024, 1024, 1024, 256]
    for per_call, calls in ((1024, 5), (2048, 3), (8192, 1)):
        cal = Calibration(0.0, 0.0, vision_per_patch_s=1e-4, vision_per_call_s=0.1, patches_per_call=per_call)
        assert cal.vision_s(crops) == pytest.approx(0.1 * calls + 1e-4 * sum(crops)), per_call
    assert Calibration(0.0, 0.0, 1e-4, 0.1).vision_s([]) == 0.0
