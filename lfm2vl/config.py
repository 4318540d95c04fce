"""Frozen model configuration for LFM2-VL, built from any `config.json` found in the wild.

`Lfm2VlConfig.from_hf(dict)` is the one place that knows about config versions (docs/architecture.md):
transformers 4.57 and 5.x files, Liquid's remote-code keys (`block_ff_dim`, `full_attn_idxs`,
`image_token_index`, `tie_embedding`, `vision_feature_layer`), and LFM2.5-VL variants without the
projector LayerNorm. Derived sizes (the real MLP width, head dims, the vision depth actually run)
are computed once here; no module recomputes them. `to_hf()` writes a config that transformers
4.57 and 5.x both read.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

log = logging.getLogger(__name__)

# Keys we read, or know to be harmless metadata / legacy aliases (others are logged once, never fatal).
_KNOWN_TEXT = {
    "vocab_size", "hidden_size", "intermediate_size", "block_ff_dim", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "max_position_embeddings", "norm_eps", "block_norm_eps", "conv_bias", "conv_L_cache",
    "block_multiple_of", "block_ffn_dim_multiplier", "block_auto_adjust_ff_dim", "full_attn_idxs", "layer_types",
    "rope_theta", "rope_parameters", "rope_scaling", "tie_word_embeddings", "tie_embedding", "bos_token_id",
    "eos_token_id", "pad_token_id", "model_type", "initializer_range", "use_cache", "block_dim", "conv_dim",
    "conv_dim_out", "num_heads", "use_pos_enc", "block_use_swiglu", "block_mlp_init_scale", "block_out_init_scale",
    "block_use_xavier_init", "architectures", "torch_dtype", "dtype", "transformers_version", "head_dim",
    "theta", "num_layers", "_name_or_path", "output_attentions", "output_hidden_states", "return_dict",
}
_KNOWN_VISION = {
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels", "patch_size",
    "num_patches", "layer_norm_eps", "hidden_act", "vision_use_head", "attention_dropout", "model_type",
    "torch_dtype", "dtype", "_name_or_path", "vision_feature_layer", "architectures", "transformers_version",
    "initializer_range", "output_attentions", "output_hidden_states", "return_dict",
}
_KNOWN_TOP = {
    "text_config", "vision_config", "image_token_id", "image_token_index", "projector_hidden_act",
    "projector_hidden_size", "projector_bias", "projector_use_layernorm", "downsample_factor", "tie_word_embeddings",
    "tie_embedding", "vision_feature_layer", "model_type", "architectures", "torch_dtype", "dtype",
    "transformers_version", "auto_map", "_name_or_path", "use_cache", "quantization_config",
    # 4.57 / remote-code configs also carry the processor's knobs; the model never reads them.
    "min_image_tokens", "max_image_tokens", "do_image_splitting", "min_tiles", "max_tiles", "tile_size",
    "use_thumbnail", "encoder_patch_size", "max_pixels_tolerance", "use_image_special_tokens", "max_num_patches",
    "image_mean", "image_std", "resample", "output_attentions", "output_hidden_states", "return_dict",
}
_warned: set[str] = set()


def _note_unknown(where: str, d: dict, known: set[str]) -> None:
    extra = sorted(set(d) - known)
    key = f"{where}:{extra}"
    if extra and key not in _warned:
        _warned.add(key)
        log.info("config %s: ignoring unknown keys %s", where, extra)


def mlp_width(ff: int, auto_adjust: bool, multiplier: float | None, multiple_of: int) -> int:
    """LFM2's effective SwiGLU width (`Lfm2MLP.__init__`): 6656 -> 4608, 12288 -> 8192.

    As in transformers, rounding to `multiple_of` happens only when a multiplier is set.
    """
    if not auto_adjust:
        return ff
    ff = int(2 * ff / 3)
    if multiplier is not None:
        ff = int(multiplier * ff)
        ff = multiple_of * math.ceil(ff / multiple_of)
    return ff


@dataclass(frozen=True)
class TextConfig:
    # Defaults (and `from_hf` fallbacks for missing keys) are transformers' `Lfm2Config` defaults.
    vocab_size: int = 65536
    hidden_size: int = 2560
    intermediate_size: int = 12288  # as configured; `ffn_dim` is the width actually built
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    max_position_embeddings: int = 128_000
    norm_eps: float = 1e-5
    conv_bias: bool = False
    conv_L_cache: int = 3
    block_multiple_of: int = 256
    block_ffn_dim_multiplier: float | None = 1.0
    block_auto_adjust_ff_dim: bool = True
    layer_types: tuple[str, ...] = ()  # () = every layer attention, as Lfm2Config without full_attn_idxs
    rope_theta: float = 1_000_000.0
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = 0

    def __post_init__(self) -> None:
        if not self.layer_types:
            object.__setattr__(self, "layer_types", ("full_attention",) * self.num_hidden_layers)
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        bad = set(self.layer_types) - {"conv", "full_attention"}
        if bad:
            raise ValueError(f"unknown LFM2 layer types {sorted(bad)} (expected 'conv' or 'full_attention')")
        if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("hidden_size must divide by num_attention_heads, and heads by num_key_value_heads")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def ffn_dim(self) -> int:
        return mlp_width(
            self.intermediate_size, self.block_auto_adjust_ff_dim, self.block_ffn_dim_multiplier, self.block_multiple_of
        )

    @property
    def attention_layers(self) -> tuple[int, ...]:
        """Indices of the grouped-query attention layers (the one place that says which layer is which)."""
        return tuple(i for i, t in enumerate(self.layer_types) if t == "full_attention")

    @property
    def conv_layers(self) -> tuple[int, ...]:
        """Indices of the gated short-convolution layers."""
        return tuple(i for i, t in enumerate(self.layer_types) if t == "conv")

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> TextConfig:
        _note_unknown("text_config", d, _KNOWN_TEXT)
        f = {x.name: x.default for x in fields(cls)}  # fallbacks == the dataclass defaults (transformers Lfm2Config)
        n = int(d.get("num_hidden_layers", d.get("num_layers", f["num_hidden_layers"])))
        if d.get("layer_types"):
            layer_types = tuple("full_attention" if t in ("full_attention", "attention") else t for t in d["layer_types"])
        else:
            # Lfm2Config: no layer_types and no full_attn_idxs means every layer is attention.
            idxs = d.get("full_attn_idxs")
            idxs = range(n) if idxs is None else idxs
            layer_types = tuple("full_attention" if i in set(idxs) else "conv" for i in range(n))
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"unsupported rope_type {rope.get('rope_type')!r}: LFM2 uses default RoPE")
        theta = rope.get("rope_theta", d.get("rope_theta", d.get("theta", f["rope_theta"])))
        eos = d.get("eos_token_id", f["eos_token_id"])
        return cls(
            vocab_size=int(d.get("vocab_size", f["vocab_size"])),
            hidden_size=int(d.get("hidden_size", d.get("block_dim", f["hidden_size"]))),
            # Lfm2Config lets the legacy `block_ff_dim` override `intermediate_size` (docs/architecture.md).
            intermediate_size=int(d.get("block_ff_dim", d.get("intermediate_size", f["intermediate_size"]))),
            num_hidden_layers=n,
            num_attention_heads=int(d.get("num_attention_heads", d.get("num_heads", f["num_attention_heads"]))),
            num_key_value_heads=int(d.get("num_key_value_heads", f["num_key_value_heads"])),
            max_position_embeddings=int(d.get("max_position_embeddings", f["max_position_embeddings"])),
            norm_eps=float(d.get("norm_eps", d.get("block_norm_eps", f["norm_eps"]))),
            conv_bias=bool(d.get("conv_bias", f["conv_bias"])),
            conv_L_cache=int(d.get("conv_L_cache", f["conv_L_cache"])),
            block_multiple_of=int(d.get("block_multiple_of", f["block_multiple_of"])),
            block_ffn_dim_multiplier=d.get("block_ffn_dim_multiplier", f["block_ffn_dim_multiplier"]),
            block_auto_adjust_ff_dim=bool(d.get("block_auto_adjust_ff_dim", f["block_auto_adjust_ff_dim"])),
            layer_types=layer_types,
            rope_theta=float(theta),
            bos_token_id=d.get("bos_token_id", f["bos_token_id"]),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            pad_token_id=d.get("pad_token_id", f["pad_token_id"]),
        )

    def to_hf(self) -> dict[str, Any]:
        d = asdict(self)
        d["layer_types"] = list(self.layer_types)
        d["full_attn_idxs"] = list(self.attention_layers)
        d["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if isinstance(self.eos_token_id, tuple):
            d["eos_token_id"] = list(self.eos_token_id)
        d["model_type"] = "lfm2"
        d["tie_word_embeddings"] = True
        return d


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12  # layers actually run (after any vision_feature_layer truncation)
    num_attention_heads: int = 12
    num_channels: int = 3
    patch_size: int = 16
    num_patches: int = 256
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"
    stored_layers: int | None = None  # layers present in the checkpoint, when more than are run

    def __post_init__(self) -> None:
        side = math.isqrt(self.num_patches)
        if side * side != self.num_patches:
            raise ValueError(f"vision num_patches={self.num_patches} is not a square grid")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("vision hidden_size must divide by num_attention_heads")
        if self.hidden_act not in ("gelu_pytorch_tanh", "gelu"):
            raise ValueError(f"unsupported vision hidden_act {self.hidden_act!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def grid_size(self) -> int:
        return math.isqrt(self.num_patches)

    @property
    def patch_dim(self) -> int:
        return self.num_channels * self.patch_size * self.patch_size

    @classmethod
    def from_hf(cls, d: dict[str, Any], feature_layer: int = -1) -> VisionConfig:
        _note_unknown("vision_config", d, _KNOWN_VISION)
        stored = int(d.get("num_hidden_layers", 12))
        # Liquid's remote-code configs declare a deeper tower and pick an earlier layer; transformers
        # always runs the whole tower, so keep only the layers that feed the projector (docs/architecture.md).
        kept = stored + feature_layer + 1 if feature_layer < 0 else feature_layer + 1
        if not 1 <= kept <= stored:
            raise ValueError(f"vision_feature_layer={feature_layer} is out of range for a {stored}-layer tower")
        patch = d.get("patch_size", 16)
        return cls(
            hidden_size=int(d.get("hidden_size", 768)),
            intermediate_size=int(d.get("intermediate_size", 3072)),
            num_hidden_layers=kept,
            num_attention_heads=int(d.get("num_attention_heads", 12)),
            num_channels=int(d.get("num_channels", 3)),
            patch_size=int(patch[0] if isinstance(patch, (list, tuple)) else patch),
            num_patches=int(d.get("num_patches", 256)),
            layer_norm_eps=float(d.get("layer_norm_eps", 1e-6)),
            hidden_act=d.get("hidden_act", "gelu_pytorch_tanh"),
            stored_layers=stored if stored != kept else None,
        )

    def to_hf(self) -> dict[str, Any]:
        d = asdict(self)
        del d["stored_layers"]
        d.update(model_type="siglip2_vision_model", vision_use_head=False, attention_dropout=0.0)
        return d


@dataclass(frozen=True)
class Lfm2VlConfig:
    text: TextConfig = field(default_factory=TextConfig)  # as transformers' Lfm2VlConfig()
    vision: VisionConfig = field(default_factory=VisionConfig)
    image_token_id: int = 396
    projector_hidden_size: int = 2560
    projector_hidden_act: str = "gelu"
    projector_bias: bool = True
    projector_use_layernorm: bool = True
    downsample_factor: int = 2
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        if self.projector_hidden_act not in ("gelu", "gelu_pytorch_tanh"):
            raise ValueError(f"unsupported projector_hidden_act {self.projector_hidden_act!r}")

    @property
    def projector_in_dim(self) -> int:
        return self.vision.hidden_size * self.downsample_factor**2

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> Lfm2VlConfig:
        """Build from a parsed `config.json` of any known LFM2-VL / LFM2.5-VL version."""
        if d.get("model_type") not in (None, "lfm2_vl", "lfm2-vl"):
            raise ValueError(f"config.json has model_type={d.get('model_type')!r}, expected 'lfm2_vl'")
        if "text_config" not in d or "vision_config" not in d:
            raise ValueError("config.json lacks text_config/vision_config: not an LFM2-VL checkpoint")
        _note_unknown("top level", d, _KNOWN_TOP)
        vision_d = d["vision_config"]
        feature_layer = int(d.get("vision_feature_layer", vision_d.get("vision_feature_layer", -1)))
        tie = d.get("tie_word_embeddings", d.get("tie_embedding"))
        if tie is None:
            tie = d["text_config"].get("tie_word_embeddings", d["text_config"].get("tie_embedding", True))
        return cls(
            text=TextConfig.from_hf(d["text_config"]),
            vision=VisionConfig.from_hf(vision_d, feature_layer),
            image_token_id=int(d.get("image_token_id", d.get("image_token_index", 396))),
            projector_hidden_size=int(d.get("projector_hidden_size", 2560)),
            projector_hidden_act=d.get("projector_hidden_act", "gelu"),
            projector_bias=bool(d.get("projector_bias", True)),
            projector_use_layernorm=bool(d.get("projector_use_layernorm", True)),
            downsample_factor=int(d.get("downsample_factor", 2)),
            tie_word_embeddings=bool(tie),
        )

    def to_hf(self) -> dict[str, Any]:
        text = self.text.to_hf()
        text["tie_word_embeddings"] = self.tie_word_embeddings
        return {
            "architectures": ["Lfm2VlForConditionalGeneration"],
            "model_type": "lfm2_vl",
            "text_config": text,
            "vision_config": self.vision.to_hf(),
            "image_token_id": self.image_token_id,
            "projector_hidden_size": self.projector_hidden_size,
            "projector_hidden_act": self.projector_hidden_act,
            "projector_bias": self.projector_bias,
            "projector_use_layernorm": self.projector_use_layernorm,
            "downsample_factor": self.downsample_factor,
            "tie_word_embeddings": self.tie_word_embeddings,
            "vision_feature_layer": -1,
        }

    def with_text(self, **changes: Any) -> Lfm2VlConfig:
        return replace(self, text=replace(self.text, **changes))


# The two released checkpoints, as their config.json files describe them (docs/architecture.md).
MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    "LFM2-VL-450M": {
        "model_type": "lfm2_vl",
        "text_config": {
            "model_type": "lfm2", "vocab_size": 65536, "hidden_size": 1024, "block_ff_dim": 6656,
            "intermediate_size": 6656, "num_hidden_layers": 16, "num_attention_heads": 16,
            "num_key_value_heads": 8, "full_attn_idxs": [2, 5, 8, 10, 12, 14], "rope_theta": 1e6,
            "norm_eps": 1e-5, "conv_L_cache": 3, "conv_bias": False, "block_multiple_of": 256,
            "block_ffn_dim_multiplier": 1.0, "block_auto_adjust_ff_dim": True,
            "max_position_embeddings": 128000, "tie_embedding": True,
            "bos_token_id": 1, "eos_token_id": 7, "pad_token_id": 0,
        },
        "vision_config": {
            "model_type": "siglip2_vision_model", "hidden_size": 768, "intermediate_size": 3072,
            "num_hidden_layers": 12, "num_attention_heads": 12, "num_patches": 256, "patch_size": 16,
            "vision_use_head": False,
        },
        "image_token_id": 396, "projector_hidden_size": 2560, "downsample_factor": 2,
    },
    "LFM2-VL-1.6B": {
        "model_type": "lfm2_vl",
        "text_config": {
            "model_type": "lfm2", "vocab_size": 65536, "hidden_size": 2048, "block_ff_dim": 12288,
            "intermediate_size": 12288, "num_hidden_layers": 16, "num_attention_heads": 32,
            "num_key_value_heads": 8, "full_attn_idxs": [2, 5, 8, 10, 12, 14], "rope_theta": 1e6,
            "norm_eps": 1e-5, "conv_L_cache": 3, "conv_bias": False, "block_multiple_of": 256,
            "block_ffn_dim_multiplier": 1.0, "block_auto_adjust_ff_dim": True,
            "max_position_embeddings": 128000, "tie_embedding": True,
            "bos_token_id": 1, "eos_token_id": 7, "pad_token_id": 0,
        },
        "vision_config": {
            "model_type": "siglip2_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
            "num_hidden_layers": 27, "num_attention_heads": 16, "num_patches": 256, "patch_size": 16,
            "vision_use_head": False,
        },
        # Liquid's remote-code config: a 27-layer so400m tower read at layer -2, i.e. 26 layers run.
        "vision_feature_layer": -2,
        "image_token_id": 396, "projector_hidden_size": 2560, "downsample_factor": 2,
    },
}


def model_config(name: str) -> Lfm2VlConfig:
    """`model_config("LFM2-VL-450M")` or `model_config("LFM2-VL-1.6B")` (a `LiquidAI/` prefix is accepted)."""
    key = name.split("/")[-1]
    if key not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODEL_CONFIGS)}")
    return Lfm2VlConfig.from_hf(MODEL_CONFIGS[key])
