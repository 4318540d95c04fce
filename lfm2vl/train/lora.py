"""LoRA for `nn.Linear`: wrap, merge back, and save / load the adapter alone.

y = base(x) + (alpha / r) * B(A(dropout(x))), with A (r, in) Kaiming-uniform and B (out, r) zero,
so a fresh adapter changes nothing (Hu et al. 2021; the layout PEFT uses). Module and parameter
names follow PEFT (`<name>.base_layer`, `<name>.lora_A.weight`, `<name>.lora_B.weight`), and the
adapter file uses PEFT's `base_model.model.<Hub name>` keys, so PEFT can read it.

Targets name LFM2-VL's own layers (docs/architecture.md §9: `o_proj`, `gate_proj`, ... do not exist here and
would silently match nothing elsewhere); every target must match at least one layer, or a
ValueError lists the names that do exist.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..model.linear import Linear
from ..weights import SAVE_PREFIXES, map_key

# The three top-level parts of `Lfm2Vl`; a target may be scoped to one ("vision_tower.fc1").
SCOPES = ("language_model", "vision_tower", "multi_modal_projector")
# Every linear layer of the language model (attention, gated conv, SwiGLU).
DEFAULT_TARGETS = tuple(
    f"language_model.{n}" for n in ("q_proj", "k_proj", "v_proj", "out_proj", "in_proj", "w1", "w2", "w3")
)
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class LoraConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ValueError("LoRA needs at least one target module name")
        object.__setattr__(self, "targets", tuple(self.targets))


class LoraLinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base_layer = base
        self.r, self.alpha = r, alpha
        self.scaling = alpha / r
        device, dtype = base.weight.device, base.weight.dtype
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=device, dtype=dtype)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as PEFT
        nn.init.zeros_(self.lora_B.weight)
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x (..., in) -> (..., out)
        return self.base_layer(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling  # (out, in)

    def merged(self) -> nn.Linear:
        """A plain `Linear` (the model's own, lfm2vl/model/linear.py) computing the same function
        (in the base layer's dtype)."""
        base = self.base_layer
        out = Linear(base.in_features, base.out_features, bias=base.bias is not None,
                     device=base.weight.device, dtype=base.weight.dtype)
        with torch.no_grad():
            out.weight.copy_((base.weight.float() + self.delta_weight()).to(base.weight.dtype))
            if base.bias is not None:
                out.bias.copy_(base.bias)
        return out


def _matches(name: str, target: str) -> bool:
    """Dotted-suffix match; a leading scope ("vision_tower.fc1") also pins the prefix."""
    parts = target.split(".")
    if parts[0] in SCOPES:
        if not (name == parts[0] or name.startswith(parts[0] + ".")):
            return False
        parts = parts[1:]
        if not parts:  # a bare scope: every linear layer under it
            return True
    return name.split(".")[-len(parts):] == parts


def _linear_names(module: nn.Module) -> list[str]:
    return [n for n, m in module.named_modules() if isinstance(m, nn.Linear) and not _inside_lora(n)]


def _inside_lora(name: str) -> bool:
    return any(p in ("lora_A", "lora_B", "base_layer") for p in name.split("."))


def find_targets(module: nn.Module, targets: tuple[str, ...] | list[str]) -> list[str]:
    """Names of the linear layers the targets select; a target that selects none is a ValueError."""
    names = _linear_names(module)
    chosen, unmatched = [], []
    for target in targets:
        hits = [n for n in names if _matches(n, target)]
        if not hits:
            unmatched.append(target)
        chosen += hits
    if unmatched:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise ValueError(
            f"LoRA target(s) {unmatched} match no linear layer of this model. Valid layer names: {leaves} "
            f"(optionally scoped, e.g. 'language_model.q_proj' or 'vision_tower.fc1'; scopes: {list(SCOPES)}). "
            "Note LFM2 names: FFN w1/w2/w3, attention out_proj, conv in_proj/out_proj."
        )
    return list(dict.fromkeys(chosen))


def apply_lora(
    module: nn.Module,
    targets: tuple[str, ...] | list[str],
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
) -> list[str]:
    """Replace the targeted `nn.Linear` layers by `LoraLinear` in place; returns their names.

    Only the wrapped base layers are frozen here; which other parameters train is the caller's
    choice (the trainer freezes everything but the adapters).
    """
    names = find_targets(module, tuple(targets))
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, leaf, LoraLinear(getattr(parent, leaf), r, alpha, dropout))
    return names


def lora_layers(module: nn.Module) -> dict[str, LoraLinear]:
    return {n: m for n, m in module.named_modules() if isinstance(m, LoraLinear)}


def merge_lora(module: nn.Module) -> int:
    """Fold every adapter into its base weight and put plain `nn.Linear`s back; returns how many."""
    layers = lora_layers(module)
    for name, layer in layers.items():
        parent_name, _, leaf = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, leaf, layer.merged())
    return len(layers)


def lora_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors, under our module names (`...q_proj.lora_A.weight`)."""
    return {k: v for k, v in module.state_dict().items() if ".lora_A." in k or ".lora_B." in k}


def _to_hub(name: str) -> str:
    for ours, theirs in SAVE_PREFIXES:
        if name.startswith(ours):
            return theirs + name[len(ours):]
    raise ValueError(f"no Hub name for module {name}")


def save_adapter(module: nn.Module, folder: str | Path, config: LoraConfig, base_model: str | None = None) -> Path:
    """Write adapter_model.safetensors (PEFT keys) and adapter_config.json (r, alpha, targets)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {"base_model.model." + _to_hub(k): v.detach().cpu().contiguous() for k, v in lora_state_dict(module).items()}
    if not state:
        raise ValueError("the model carries no LoRA layers: nothing to save")
    save_file(state, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    layers = sorted(_to_hub(n) for n in lora_layers(module))
    meta = {
        "peft_type": "LORA", "r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
        "target_modules": layers, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "base_model_name_or_path": base_model, "task_type": None,
        "lfm2vl_targets": list(config.targets),  # our own (scoped) target names, for load_adapter
    }
    (folder / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    return folder


def load_adapter(module: nn.Module, folder: str | Path) -> LoraConfig:
    """Wrap the layers an adapter folder names and load its weights (strict); returns its config."""
    folder = Path(folder)
    meta = json.loads((folder / ADAPTER_CONFIG).read_text())
    config = LoraConfig(r=int(meta["r"]), alpha=float(meta["lora_alpha"]), dropout=float(meta.get("lora_dropout", 0.0)),
                        targets=tuple(meta.get("lfm2vl_targets") or meta["target_modules"]))
    apply_lora(module, config.targets, config.r, config.alpha, config.dropout)
    state = {}
    for key, t in load_file(str(folder / ADAPTER_WEIGHTS)).items():
        ours = map_key(key.removeprefix("base_model.model."))
        if ours is None:
            raise ValueError(f"{folder / ADAPTER_WEIGHTS}: key {key} names no LFM2-VL module")
        state[ours] = t
    expected = lora_state_dict(module)
    if set(state) != set(expected):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise ValueError(f"adapter {folder} does not fit this model: missing {missing[:5]}, unexpected {extra[:5]}")
    with torch.no_grad():
        for k, t in state.items():
            expected[k].copy_(t)
    return config
