"""int8 weight quantization for inference (`lfm2vl.load(..., quantize="int8")`, `--quantize int8`).

Every nn.Linear of the vision tower, projector and language model, and the output head, keeps its
weight as int8 with one scale per output channel (symmetric, round to nearest); activations stay in
floating point. A layer picks its kernel by the number of rows it multiplies (measured on a 2-core
AMX Xeon, docs/performance.md). The token embedding is an int8 table too, and a tied head reads
that same table:
- few rows (decode, <= SMALL_ROWS): torch's int8 weight-only GEMV (`_weight_int8pack_mm`), which reads
  a quarter of the fp32 bytes: 0.20 ms for 1024 -> 6656 against 0.54 ms fp32 and 0.47 ms bf16;
- many rows (prefill, vision): the int8 weight is widened to the compute dtype and multiplied there
  (7.1 ms for 1024 rows against 39.8 ms fp32; bf16 alone takes 5.5 ms).
The compute dtype is bfloat16 where the CPU has native bf16 (AVX512-BF16 / AMX) or on a GPU, else
float32. On a GPU every call widens the weight (correct, but no faster than bf16: a GPU int8 kernel
is still to come). Norms, the short convolutions, position embeddings and the vision patch embedding are not quantized.
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


def quantize_weight(weight: torch.Tensor, chunk_rows: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float -> (int8 (out, in), fp32 scale (out,)), a block of rows at a time (small transients)."""
    rows = weight.shape[0]
    qweight = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scale = torch.empty(rows, dtype=torch.float32, device=weight.device)
    for i in range(0, rows, chunk_rows):
        block = weight[i : i + chunk_rows].float()
        s = block.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        scale[i : i + chunk_rows] = s
        qweight[i : i + chunk_rows] = torch.round(block / s[:, None]).clamp_(-127, 127).to(torch.int8)
    return qweight, scale


class Int8Linear(nn.Module):
    """y = x W^T + b with W int8 (out, in) and a per-output-channel scale: W ~= qweight * scale[:, None]."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                 device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.empty(out_features, dtype=dtype, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> Int8Linear:
        layer = cls(weight.shape[1], weight.shape[0], bias is not None, dtype, weight.device)
        qweight, scale = quantize_weight(weight.detach())
        layer.qweight.copy_(qweight)
        layer.scale.copy_(scale)
        if bias is not None:
            layer.bias.copy_(bias.detach())
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype: torch.dtype) -> Int8Linear:
        return cls.from_weight(linear.weight, linear.bias, dtype)

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


def linear_names(module: nn.Module) -> list[str]:
    """The nn.Linear layers quantization replaces (every one but KEEP)."""
    return [name for name, m in module.named_modules() if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] not in KEEP]


def replace_linears(module: nn.Module, dtype: torch.dtype, names: list[str] | None = None) -> None:
    """Swap the named nn.Linear layers for empty Int8Linear shells on the same device (loading fills them)."""
    for name in linear_names(module) if names is None else names:
        old = module.get_submodule(name)
        module.set_submodule(name, Int8Linear(old.in_features, old.out_features, old.bias is not None, dtype,
                                              old.weight.device))


def is_quantized(module: nn.Module) -> str | None:
    """"int8" when the model's layers are Int8Linear (however it got so), else None."""
    return "int8" if any(isinstance(m, Int8Linear) for m in module.modules()) else None


def check_scheme(scheme: str) -> None:
    if scheme not in QUANTIZE:
        raise ValueError(f"quantize={scheme!r} is not supported; use one of {list(QUANTIZE)}")


class Int8Embedding(nn.Module):
    """Token embeddings stored as int8 rows with one scale each; a tied head reads the same table."""

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype,
                 device: torch.device | str | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.register_buffer("qweight", torch.empty(num_embeddings, embedding_dim, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.empty(num_embeddings, dtype=dtype, device=device))

    @classmethod
    def from_weight(cls, weight: torch.Tensor, dtype: torch.dtype) -> Int8Embedding:
        layer = cls(weight.shape[0], weight.shape[1], dtype, weight.device)
        qweight, scale = quantize_weight(weight.detach())
        layer.qweight.copy_(qweight)
        layer.scale.copy_(scale)
        return layer

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.qweight[ids].to(self.scale.dtype) * self.scale[ids].unsqueeze(-1)  # (..., D)


def replace_embedding(module: nn.Module, dtype: torch.dtype) -> None:
    """Swap the token embedding for an empty Int8Embedding shell (loading fills it)."""
    old = module.language_model.embed_tokens
    module.language_model.embed_tokens = Int8Embedding(old.num_embeddings, old.embedding_dim, dtype, old.weight.device)


def share_int8_head(module: nn.Module) -> None:
    """A tied model's head reads the int8 embedding table itself (no second copy of 65k x D). Called
    again after a move or cast (`Model.to`), which converts the two modules' buffers separately."""
    table = module.language_model.embed_tokens
    head = getattr(module, "lm_head", "absent")
    if isinstance(head, Int8Linear) and isinstance(table, Int8Embedding) and getattr(head, "tied", False):
        head._buffers["qweight"], head._buffers["scale"] = table.qweight, table.scale
        return
    if head is not None:
        return
    head = Int8Linear(table.embedding_dim, table.num_embeddings, False, table.scale.dtype, "meta")
    head._buffers["qweight"], head._buffers["scale"] = table.qweight, table.scale  # shared, not copied
    head.tied = True
    module.lm_head = head


def quantize_model(module: nn.Module, scheme: str = "int8", dtype: torch.dtype | None = None) -> nn.Module:
    """Quantize a loaded model in place (lfm2vl.load(quantize=...) does it while reading instead, which
    never holds the float weights of the linear layers); returns the module."""
    check_scheme(scheme)
    device = next(module.parameters()).device
    dtype = dtype or compute_dtype(device)
    for name in linear_names(module):  # from the weights' own precision, before any cast
        module.set_submodule(name, Int8Linear.from_linear(module.get_submodule(name), dtype))
    text = module.language_model
    text.embed_tokens = Int8Embedding.from_weight(text.embed_tokens.weight, dtype)
    share_int8_head(module)
    return module.to(dtype)  # the rest (int8 buffers stay int8)
