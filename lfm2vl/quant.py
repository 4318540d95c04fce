"""int8 weight quantization for inference (`lfm2vl.load(..., quantize="int8")`, `--quantize int8`).

Every nn.Linear of the vision tower, projector and language model, and the output head, keeps its
weight as int8 with one scale per output channel (symmetric, round to nearest); activations stay in
floating point. A layer picks its kernel by the number of rows it multiplies (measured on a 2-core
AMX Xeon, docs/performance.md):
- few rows (decode, <= SMALL_ROWS): torch's int8 weight-only GEMV (`_weight_int8pack_mm`), which reads
  a quarter of the fp32 bytes: 0.20 ms for 1024 -> 6656 against 0.54 ms fp32 and 0.47 ms bf16;
- many rows (prefill, vision): the int8 weight is widened to the compute dtype and multiplied there
  (7.1 ms for 1024 rows against 39.8 ms fp32; bf16 alone takes 5.5 ms).
The compute dtype is bfloat16 where the CPU has native bf16 (AVX512-BF16 / AMX) or on a GPU, else
float32. Embeddings, norms, the short convolutions and the vision patch embedding are not quantized.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

QUANTIZE = ("int8",)
KEEP = ("patch_embedding",)  # tiny (768 x 768) and it sets the vision tower's input dtype: left as is
SMALL_ROWS = 8  # at or below: the int8 GEMV kernel; above: widen and multiply (measured crossover ~8-16)


def compute_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 where it is fast (GPU, or a CPU with native bf16), else float32."""
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    return torch.float32


class Int8Linear(nn.Module):
    """y = x W^T + b with W int8 (out, in) and a per-output-channel scale: W ~= qweight * scale[:, None]."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        w = weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (out,)
        self.register_buffer("qweight", torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(dtype))
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype))

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype: torch.dtype) -> Int8Linear:
        return cls(linear.weight, linear.bias, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(self.scale.dtype)  # (M, in)
        if x2.shape[0] <= SMALL_ROWS and x2.device.type == "cpu":
            y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.qweight, self.scale)  # (M, out)
        else:
            y = F.linear(x2, self.qweight.to(x2.dtype)) * self.scale
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def quantize_model(module: nn.Module, scheme: str = "int8") -> nn.Module:
    """Replace every nn.Linear (and give the model an int8 output head) in place; returns the module.

    The non-quantized parameters are cast to the compute dtype. The tied embedding stays for lookups;
    the head gets its own int8 copy of it (a quarter of its fp32 size).
    """
    if scheme not in QUANTIZE:
        raise ValueError(f"quantize={scheme!r} is not supported; use one of {list(QUANTIZE)}")
    device = next(module.parameters()).device
    dtype = compute_dtype(device)
    module.to(dtype)
    for name, child in list(module.named_modules()):
        for leaf, layer in list(child.named_children()):
            if isinstance(layer, nn.Linear) and leaf not in KEEP:
                setattr(child, leaf, Int8Linear.from_linear(layer, dtype))
    if getattr(module, "lm_head", "absent") is None:  # tied: the head reads the embedding
        module.lm_head = Int8Linear(module.language_model.embed_tokens.weight, None, dtype)
    return module
