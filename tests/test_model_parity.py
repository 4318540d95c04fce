"""Parity with transformers' Lfm2VlForConditionalGeneration, stage by stage, fp32.

Tiny random checkpoints are saved by the reference's own save_pretrained and loaded through our
production loader (`lfm2vl.load`); inputs come from the reference processor, unchanged.
"""

import numpy as np
import pytest
import torch
from PIL import Image

import lfm2vl
import reference

TOL = 1e-4

CONFIGS = {
    # conv/attn/conv/attn, projector LayerNorm, an 8x8 position grid
    "A": dict(),
    # attention first, no projector LayerNorm, an odd 7x7 position grid, other widths
    "B": dict(
        text=dict(
            hidden_size=48, num_attention_heads=6, num_key_value_heads=3, num_hidden_layers=5, intermediate_size=160,
            layer_types=["full_attention", "conv", "conv", "full_attention", "conv"], block_multiple_of=16,
        ),
        vision=dict(hidden_size=40, num_attention_heads=2, num_patches=49, num_hidden_layers=3, intermediate_size=72),
        projector_use_layernorm=False,
        projector_hidden_size=56,
    ),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"parity_{request.param}")
    ref = reference.make_reference_checkpoint(folder, seed=1, **CONFIGS[request.param])
    ours = lfm2vl.load(folder)
    return ref, ours, reference.load_reference_processor(folder)


def _image(w, h, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _prompt(n_images, text="What is in this image?"):
    return "<|startoftext|><|im_start|>user\n" + "<image>" * n_images + text + "<|im_end|>\n<|im_start|>assistant\n"


CASES = {
    "single_small_image": ([_prompt(1)], [[_image(300, 200, 0)]]),
    # 1024x800: 2x2 tiles (32x32 patches) + a 28x36 thumbnail -> padding inside the vision batch
    "tiled_with_thumbnail": ([_prompt(1)], [[_image(1024, 800, 1)]]),
    "two_images_one_prompt": ([_prompt(2, "Compare them.")], [[_image(200, 320, 2), _image(640, 480, 3)]]),
    "text_only": ([_prompt(0, "Tell me a story about a cat.")], None),
    "batch_left_padded": (
        [_prompt(1, "Hi"), _prompt(1, "A much longer question about the picture, with many words in it?")],
        [[_image(256, 384, 4)], [_image(500, 500, 5)]],
    ),
}


def _reference_stages(ref, inputs):
    """Reference vision features (valid rows), projector output and merged embeddings."""
    captured = {}

    def hook(_module, args, kwargs):
        captured["embeds"] = kwargs["inputs_embeds"].detach().clone()

    handle = ref.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            logits = ref(**inputs).logits
            vis = proj = None
            if "pixel_values" in inputs:
                out = ref.model.vision_tower(
                    pixel_values=inputs["pixel_values"], pixel_attention_mask=inputs["pixel_attention_mask"],
                    spatial_shapes=inputs["spatial_shapes"],
                ).last_hidden_state
                vis = torch.cat([out[i, :n] for i, n in enumerate(inputs["pixel_attention_mask"].sum(-1).tolist())])
                feats = ref.model.get_image_features(
                    inputs["pixel_values"], inputs["spatial_shapes"], inputs["pixel_attention_mask"]
                ).pooler_output
                proj = torch.cat(feats)
    finally:
        handle.remove()
    return vis, proj, captured["embeds"], logits


def _assert_close(name, ours, theirs, mask=None):
    assert ours.shape == theirs.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(theirs.shape)}"
    diff = (ours - theirs).abs()
    if mask is not None:
        diff = diff[mask]
    assert diff.max().item() <= TOL, f"{name}: max |diff| {diff.max().item():.3g} > {TOL}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_stage_by_stage(pair, case):
    ref, ours, proc = pair
    texts, images = CASES[case]
    inputs = dict(proc(text=texts, images=images, return_tensors="pt", padding=True))
    if len(texts) > 1:
        assert (inputs["attention_mask"] == 0).any(), "the batch case must contain left padding"
    if case == "tiled_with_thumbnail":
        n_real = inputs["pixel_attention_mask"].sum(-1)
        assert len(set(n_real.tolist())) > 1 and (n_real < inputs["pixel_values"].shape[1]).any()
    vis, proj, embeds, logits = _reference_stages(ref, inputs)
    net = ours.module
    with torch.no_grad():
        if vis is not None:
            shapes = inputs["spatial_shapes"].tolist()
            packed = torch.cat([inputs["pixel_values"][i, : h * w] for i, (h, w) in enumerate(shapes)])
            _assert_close("vision features", net.vision_tower(packed, [tuple(s) for s in shapes]), vis)
            feats = net.encode_images(inputs["pixel_values"], inputs["spatial_shapes"], inputs["pixel_attention_mask"])
            _assert_close("projector output", feats, proj)
            # the packed input layout gives the same features as the padded one
            _assert_close("packed input", net.encode_images(packed, inputs["spatial_shapes"]), proj)
        else:
            feats = None
        mask = inputs["attention_mask"].bool()
        _assert_close("merged embeddings", net.embed(inputs["input_ids"], feats), embeds, mask)
    out = ours(**inputs)
    _assert_close("logits", out, logits, mask)
    assert torch.equal(out.argmax(-1)[mask], logits.argmax(-1)[mask]), "argmax differs"


def test_left_padded_row_equals_row_alone(pair):
    """Our positions count real tokens, so padding changes nothing for a row (no neighbour effects)."""
    _, ours, proc = pair
    texts, images = CASES["batch_left_padded"]
    batch = dict(proc(text=texts, images=images, return_tensors="pt", padding=True))
    both = ours(**batch)
    for i in range(2):
        alone = dict(proc(text=[texts[i]], images=[images[i]], return_tensors="pt"))
        t = alone["input_ids"].shape[1]
        torch.testing.assert_close(both[i, -t:], ours(**alone)[0], atol=TOL, rtol=0)


def test_image_token_feature_mismatch_is_a_clear_error(pair):
    _, ours, proc = pair
    inputs = dict(proc(text=[_prompt(1)], images=[[_image(300, 200, 0)]], return_tensors="pt"))
    ids = inputs["input_ids"].clone()
    ids[0, (ids[0] == ours.config.image_token_id).nonzero()[0, 0]] = 5  # drop one <image> slot
    with pytest.raises(ValueError, match=r"image tokens \(\d+\) != image features \(\d+\)"):
        ours(**{**inputs, "input_ids": ids})


DEVICE_DTYPES = [
    pytest.param("cpu", torch.float32, id="cpu-fp32"),
    pytest.param("cpu", torch.bfloat16, id="cpu-bf16"),
    pytest.param("cuda", torch.bfloat16, id="cuda-bf16", marks=pytest.mark.gpu),
    pytest.param("cuda", torch.float16, id="cuda-fp16", marks=pytest.mark.gpu),
]
# Half precision: both sides round differently at every op, so compare against the fp32 reference with
# a tolerance scaled to the logits' spread, and require (near-)identical top-1 tokens.
HALF_TOL, HALF_AGREEMENT = 0.1, 0.97  # measured on CPU bf16: max diff 3.6% of the spread, top-1 >= 0.97


@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
def test_logits_across_devices_and_dtypes(pair, device, dtype):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    ref, ours, proc = pair
    texts, images = CASES["batch_left_padded"]
    inputs = dict(proc(text=texts, images=images, return_tensors="pt", padding=True))
    with torch.no_grad():
        expected = ref(**inputs).logits  # fp32 on the CPU
    model = lfm2vl.load(ours.source, device=device, dtype=dtype)
    got = model(**{k: v.to(dtype) if k == "pixel_values" else v for k, v in inputs.items()}).float().cpu()
    mask = inputs["attention_mask"].bool()
    if dtype == torch.float32:
        _assert_close("logits", got, expected, mask)
        return
    spread = expected[mask].std().item()
    diff = (got - expected).abs()[mask].max().item()
    assert diff <= HALF_TOL * spread, f"{device} {dtype}: max |diff| {diff:.3g} vs logit spread {spread:.3g}"
    agreement = (got.argmax(-1) == expected.argmax(-1))[mask].float().mean().item()
    assert agreement >= HALF_AGREEMENT, f"{device} {dtype}: top-1 agreement {agreement:.3f}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_has_the_reference_bits(dtype):
    """Our RMSNorm takes torch's rms_norm for float32 (one call, not five: decode steps run 45 of them):
    the same bits as the reference's norm, for a decode row, a prompt and the per-head q/k norms."""
    from transformers.models.lfm2.modeling_lfm2 import Lfm2RMSNorm

    from lfm2vl.model.text import RMSNorm

    torch.manual_seed(0)
    for dim, shape in ((1024, (1, 1, 1024)), (1024, (2, 300, 1024)), (64, (1, 16, 1, 64)), (48, (3, 7, 48))):
        ours, ref = RMSNorm(dim, 1e-5), Lfm2RMSNorm(dim, eps=1e-5)
        weight = torch.randn(dim)
        with torch.no_grad():
            ours.weight.copy_(weight), ref.weight.copy_(weight)
        ours, ref = ours.to(dtype), ref.to(dtype)
        x = (torch.randn(shape) * 3).to(dtype)
        with torch.no_grad():
            assert torch.equal(ours(x), ref(x)), (dim, shape)
