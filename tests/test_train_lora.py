"""LoRA: merged == unmerged, targets that match nothing fail loudly, scoping, adapter save/load."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_train_utils import tiny_config

from lfm2vl.model.lfm2vl import Lfm2Vl
from lfm2vl.train.lora import (
    LoraConfig,
    LoraLinear,
    apply_lora,
    find_targets,
    load_adapter,
    lora_layers,
    merge_lora,
    save_adapter,
)

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "in_proj", "w1", "w2", "w3", "fc1", "fc2", "linear_1", "linear_2")


def _model(seed: int = 0) -> Lfm2Vl:
    torch.manual_seed(seed)
    return Lfm2Vl(tiny_config()).eval()


def _inputs(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(500, 1024, (2, 12), generator=g)
    ids[0, 2:6] = 396  # one 4x4-patch crop = 4 image tokens, in the first row
    return {"input_ids": ids, "pixel_values": torch.randn(16, 768, generator=g), "spatial_shapes": torch.tensor([[4, 4]])}


def _randomize_adapters(model: Lfm2Vl) -> None:
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(0, 0.05)  # a fresh adapter is a no-op (B = 0): make it do something


def test_merge_equals_unmerged_forward():
    model = _model()
    names = apply_lora(model, ALL_TARGETS, r=4, alpha=8)
    assert any(n.startswith("vision_tower.") for n in names) and any(n.startswith("multi_modal_projector.") for n in names)
    _randomize_adapters(model)
    x = _inputs()
    with torch.no_grad():
        unmerged = model(**x)
        assert merge_lora(model) == len(names)
        merged = model(**x)
    assert not lora_layers(model) and not any("lora_" in n for n, _ in model.named_parameters())
    # Logits reach ~70 here: 1e-4 is float32 round-off of the (W + BA) x vs Wx + B(Ax) regrouping.
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)


def test_fresh_adapter_is_a_no_op_and_freezes_base():
    model, ref = _model(), _model()
    apply_lora(model, ("language_model.w1",), r=2, alpha=4)
    layer = model.language_model.layers[0].feed_forward.w1
    assert isinstance(layer, LoraLinear) and not layer.base_layer.weight.requires_grad
    assert layer.lora_A.weight.requires_grad and layer.lora_B.weight.requires_grad
    with torch.no_grad():
        # A plain layer applies its SiLU in the matmul's epilogue (lfm2vl/model/linear.py), the wrapped
        # one after it: float32 round-off apart, nothing more.
        torch.testing.assert_close(model(**_inputs()), ref(**_inputs()), rtol=1e-5, atol=3e-5)


def test_target_that_matches_nothing_is_an_error():
    model = _model()
    # The cookbook's Llama-style names (docs/architecture.md §9): one typo among valid names still fails.
    with pytest.raises(ValueError) as e:
        apply_lora(model, ("q_proj", "o_proj", "gate_proj"), r=4, alpha=8)
    msg = str(e.value)
    assert "'o_proj'" in msg and "'gate_proj'" in msg and "'q_proj'" not in msg.split("Valid")[0]
    for name in ("out_proj", "w1", "w2", "w3", "in_proj", "fc1", "linear_1"):
        assert name in msg
    assert not lora_layers(model)  # nothing was wrapped
    with pytest.raises(ValueError, match="vision_tower.w1"):
        apply_lora(model, ("vision_tower.w1",), r=4, alpha=8)  # w1 exists, but not in the vision tower


def test_scoped_targets():
    model = _model()
    text_out = find_targets(model, ("language_model.out_proj",))
    assert text_out and all(n.startswith("language_model.") for n in text_out)
    assert {n.split(".")[-2] for n in text_out} == {"self_attn", "conv"}  # attention and conv output layers
    both = find_targets(model, ("q_proj",))
    assert {n.split(".")[0] for n in both} == {"language_model", "vision_tower"}
    assert find_targets(model, ("vision_tower.mlp.fc1",)) == find_targets(model, ("fc1",))
    projector = find_targets(model, ("multi_modal_projector",))
    assert projector == ["multi_modal_projector.linear_1", "multi_modal_projector.linear_2"]


def test_adapter_save_and_load_round_trip(tmp_path):
    model = _model()
    config = LoraConfig(r=4, alpha=8, targets=("language_model.q_proj", "vision_tower.fc1", "linear_2"))
    apply_lora(model, config.targets, config.r, config.alpha)
    _randomize_adapters(model)
    save_adapter(model, tmp_path / "adapter", config, base_model="tiny")
    keys = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert "base_model.model.model.language_model.layers.1.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.lora_B.weight" in keys
    meta = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (meta["peft_type"], meta["r"], meta["lora_alpha"]) == ("LORA", 4, 8)
    assert "model.multi_modal_projector.linear_2" in meta["target_modules"]

    fresh = _model()
    assert load_adapter(fresh, tmp_path / "adapter") == config
    with torch.no_grad():
        torch.testing.assert_close(fresh(**_inputs()), model(**_inputs()))
