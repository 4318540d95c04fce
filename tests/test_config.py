"""Config parsing across the versions in the wild, presets, and the full-size tensor table (docs/architecture.md §1, §2, §6)."""

import copy
import logging
import math

import pytest
import torch

import lfm2vl
from lfm2vl.config import MODEL_CONFIGS, Lfm2VlConfig, mlp_width
from lfm2vl.model.lfm2vl import Lfm2Vl
from lfm2vl.weights import hub_state_dict
import reference


def _meta_model(cfg):
    with torch.device("meta"):
        return Lfm2Vl(cfg)


@pytest.mark.parametrize("name,total", [("LFM2-VL-450M", 450_822_656), ("LFM2-VL-1.6B", 1_584_804_000)])
def test_preset_parameter_counts(name, total):
    model = _meta_model(lfm2vl.model_config(name))
    assert sum(p.numel() for p in model.parameters()) == total


def _spec_table(D, ffn, Cv, Cf, n_vision):
    """Every stored tensor of a released checkpoint, from docs/architecture.md §6."""
    t = {"model.language_model.embed_tokens.weight": (65536, D), "model.language_model.embedding_norm.weight": (D,)}
    for i in range(16):
        p = f"model.language_model.layers.{i}."
        t |= {p + "operator_norm.weight": (D,), p + "ffn_norm.weight": (D,), p + "feed_forward.w1.weight": (ffn, D),
              p + "feed_forward.w3.weight": (ffn, D), p + "feed_forward.w2.weight": (D, ffn)}
        if i in (2, 5, 8, 10, 12, 14):
            t |= {p + "self_attn.q_proj.weight": (D, D), p + "self_attn.k_proj.weight": (512, D),
                  p + "self_attn.v_proj.weight": (512, D), p + "self_attn.out_proj.weight": (D, D),
                  p + "self_attn.q_layernorm.weight": (64,), p + "self_attn.k_layernorm.weight": (64,)}
        else:
            t |= {p + "conv.in_proj.weight": (3 * D, D), p + "conv.out_proj.weight": (D, D), p + "conv.conv.weight": (D, 1, 3)}
    v = "model.vision_tower.vision_model."
    t |= {v + "embeddings.patch_embedding.weight": (Cv, 768), v + "embeddings.patch_embedding.bias": (Cv,),
          v + "embeddings.position_embedding.weight": (256, Cv), v + "post_layernorm.weight": (Cv,),
          v + "post_layernorm.bias": (Cv,)}
    for i in range(n_vision):
        p = f"{v}encoder.layers.{i}."
        for n in ("layer_norm1", "layer_norm2"):
            t |= {p + n + ".weight": (Cv,), p + n + ".bias": (Cv,)}
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            t |= {p + f"self_attn.{n}.weight": (Cv, Cv), p + f"self_attn.{n}.bias": (Cv,)}
        t |= {p + "mlp.fc1.weight": (Cf, Cv), p + "mlp.fc1.bias": (Cf,), p + "mlp.fc2.weight": (Cv, Cf),
              p + "mlp.fc2.bias": (Cv,)}
    m = "model.multi_modal_projector."
    t |= {m + "layer_norm.weight": (4 * Cv,), m + "layer_norm.bias": (4 * Cv,), m + "linear_1.weight": (2560, 4 * Cv),
          m + "linear_1.bias": (2560,), m + "linear_2.weight": (D, 2560), m + "linear_2.bias": (D,)}
    return t


@pytest.mark.parametrize("name,dims", [("LFM2-VL-450M", (1024, 4608, 768, 3072, 12)),
                                       ("LFM2-VL-1.6B", (2048, 8192, 1152, 4304, 26))])
def test_preset_tensor_names_and_shapes_match_spec(name, dims):
    stored = {k: tuple(v.shape) for k, v in hub_state_dict(_meta_model(lfm2vl.model_config(name))).items()}
    assert stored == _spec_table(*dims)


@pytest.mark.parametrize("ff,mult,multiple,expected", [(6656, 1.0, 256, 4608), (12288, 1.0, 256, 8192),
                                                       (8192, 1.0, 256, 5632), (192, 1.0, 32, 128),
                                                       (100, 1.5, 16, 112)])
def test_mlp_width_rule_matches_reference(ff, mult, multiple, expected):
    tf = reference.transformers()
    cfg = tf.Lfm2Config(hidden_size=8, intermediate_size=ff, block_ffn_dim_multiplier=mult, block_multiple_of=multiple,
                        num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1)
    ref_width = tf.models.lfm2.modeling_lfm2.Lfm2MLP(cfg).w1.out_features
    assert mlp_width(ff, True, mult, multiple) == ref_width == expected


def test_mlp_width_without_multiplier_does_not_round():
    # transformers 4.57 allows block_ffn_dim_multiplier=None: no rounding then; 5.x rejects None
    assert mlp_width(6656, True, None, 256) == 4437
    assert mlp_width(6656, False, 1.0, 256) == 6656


def test_block_ff_dim_wins_over_intermediate_size():
    """Some LFM2-1.2B configs carry intermediate_size 8192 *and* block_ff_dim 12288 (docs/architecture.md §2)."""
    d = copy.deepcopy(MODEL_CONFIGS["LFM2-VL-1.6B"])
    d["text_config"]["intermediate_size"] = 8192
    assert Lfm2VlConfig.from_hf(d).text.ffn_dim == 8192  # from block_ff_dim 12288, not 8192 -> 5632
    del d["text_config"]["block_ff_dim"]
    assert Lfm2VlConfig.from_hf(d).text.ffn_dim == 5632


def test_legacy_and_current_key_forms_agree():
    legacy = copy.deepcopy(MODEL_CONFIGS["LFM2-VL-450M"])
    legacy["image_token_index"] = legacy.pop("image_token_id")
    current = copy.deepcopy(MODEL_CONFIGS["LFM2-VL-450M"])
    tc = current["text_config"]
    idxs = tc.pop("full_attn_idxs")
    tc["layer_types"] = ["full_attention" if i in idxs else "conv" for i in range(16)]
    tc["rope_parameters"] = {"rope_type": "default", "rope_theta": tc.pop("rope_theta")}
    tc["intermediate_size"] = tc.pop("block_ff_dim")
    tc["tie_word_embeddings"] = tc.pop("tie_embedding")
    assert Lfm2VlConfig.from_hf(legacy) == Lfm2VlConfig.from_hf(current) == lfm2vl.model_config("LFM2-VL-450M")


def test_vision_feature_layer_truncates_the_tower():
    cfg = lfm2vl.model_config("LFM2-VL-1.6B")
    assert cfg.vision.num_hidden_layers == 26 and cfg.vision.stored_layers == 27
    d = copy.deepcopy(MODEL_CONFIGS["LFM2-VL-1.6B"])
    d["vision_feature_layer"] = -1
    d["vision_config"]["num_hidden_layers"] = 26
    assert Lfm2VlConfig.from_hf(d).vision.num_hidden_layers == 26
    d["vision_feature_layer"] = 3  # a non-negative index keeps layers 0..3
    assert Lfm2VlConfig.from_hf(d).vision.num_hidden_layers == 4
    d["vision_feature_layer"] = -40
    with pytest.raises(ValueError, match="vision_feature_layer"):
        Lfm2VlConfig.from_hf(d)


def test_lfm25_variant_without_projector_layernorm():
    d = copy.deepcopy(MODEL_CONFIGS["LFM2-VL-450M"])
    d |= {"projector_use_layernorm": False, "projector_hidden_size": 2048}
    model = _meta_model(Lfm2VlConfig.from_hf(d))
    assert model.multi_modal_projector.layer_norm is None
    assert model.multi_modal_projector.linear_1.weight.shape == (2048, 3072)


def test_reference_configs_from_both_generations_parse(tmp_path):
    """A transformers 5.x config (written by save_pretrained) and our to_hf() both round-trip."""
    tf = reference.transformers()
    reference.make_reference_checkpoint(tmp_path)
    import json

    d = json.loads((tmp_path / "config.json").read_text())
    cfg = Lfm2VlConfig.from_hf(d)
    assert cfg.text.layer_types == ("conv", "full_attention", "conv", "full_attention")
    assert Lfm2VlConfig.from_hf(cfg.to_hf()) == cfg
    theirs = tf.Lfm2VlConfig(**cfg.to_hf())  # transformers reads what we write
    assert theirs.text_config.layer_types == list(cfg.text.layer_types)
    assert theirs.vision_config.num_hidden_layers == cfg.vision.num_hidden_layers


def test_unknown_keys_are_logged_not_fatal(caplog):
    d = copy.deepcopy(MODEL_CONFIGS["LFM2-VL-450M"])
    d["some_future_key"] = 1
    with caplog.at_level(logging.INFO, logger="lfm2vl.config"):
        Lfm2VlConfig.from_hf(d)
    assert "some_future_key" in caplog.text


def test_wrong_model_type_is_rejected():
    with pytest.raises(ValueError, match="model_type"):
        Lfm2VlConfig.from_hf({"model_type": "llama", "text_config": {}, "vision_config": {}})
    with pytest.raises(ValueError, match="text_config"):
        Lfm2VlConfig.from_hf({"model_type": "lfm2_vl"})


def test_head_dims():
    cfg = lfm2vl.model_config("LFM2-VL-1.6B")
    assert cfg.text.head_dim == 64 and cfg.vision.head_dim == 72 and cfg.vision.grid_size == math.isqrt(256)
