"""Linear layers on the CPU's fastest exact float32 kernel.

torch's float32 `F.linear` on the CPU calls MKL's sgemm; oneDNN's float32 matmul (the kernel torch
already uses for bfloat16) gives the same float32 products, summed in another order, and on a
2-core AMD EPYC (AVX-512) it ran 1.47x faster at 1,024 rows, 2.9x for one row, and streamed cold
weights 1.8x faster (`python benchmarks/bench_kernels.py`, docs/performance.md): MKL runs its AVX2
code on AMD CPUs. oneDNN also applies GELU / SiLU to the accumulator before writing it out (the activation
costs a pass over memory otherwise: 9% of the vision tower's time in float32).

`linear` takes that path for float32 CPU inference (no autograd: the op has no backward) and is
`F.linear` plus the activation everywhere else (bfloat16 already reaches oneDNN through F.linear;
training; GPUs). `Linear` is an `nn.Linear` (same parameters, same checkpoint keys, still what
quantization and LoRA look for) whose forward is `linear`; `apply` fuses an activation into a
layer's matmul while the layer is still a plain `Linear`.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = ("none", "gelu", "gelu_tanh", "silu")
# oneDNN's post-op names (torch.ops.mkldnn._linear_pointwise's attr and algorithm)
_ONEDNN_ACT = {"none": ("none", ""), "gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh"), "silu": ("swish", "")}


ONEDNN_FLOAT32 = True  # False: float32 layers keep torch's own F.linear (benchmarks A/B the two)


@functools.cache
def onednn_float32() -> bool:
    """Whether this torch has oneDNN's float32 CPU linear op."""
    try:
        x = torch.ones(2, 8)
        return bool(torch.ops.mkldnn._linear_pointwise(x, x, None, "none", [], "").eq(8).all())
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def _fast(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.device.type == "cpu"
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and ONEDNN_FLOAT32
        and onednn_float32()
    )


def activate(y: torch.Tensor, act: str) -> torch.Tensor:
    if act == "none":
        return y
    if act == "silu":
        return F.silu(y)
    return F.gelu(y, approximate="tanh" if act == "gelu_tanh" else "none")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, act: str = "none") -> torch.Tensor:
    """act(x (..., in) @ weight (out, in)^T + bias) -> (..., out); act one of ACTIVATIONS."""
    if _fast(x, weight):
        attr, algorithm = _ONEDNN_ACT[act]
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, attr, [], algorithm)
    return activate(F.linear(x, weight, bias), act)


def linear_mul(x: torch.Tensor, weight: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """(x @ weight^T) * other, the product taken in the matmul's epilogue where it can be (SwiGLU's up
    projection times its activated gate)."""
    if _fast(x, weight) and other.dtype == torch.float32 and other.shape[:-1] == x.shape[:-1]:
        return torch.ops.mkldnn._linear_pointwise.binary(x, other, weight, None, "mul")
    return F.linear(x, weight) * other


class Linear(nn.Linear):
    """nn.Linear whose forward is `linear` (the fast float32 CPU path)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def apply(layer: nn.Module, x: torch.Tensor, act: str = "none") -> torch.Tensor:
    """act(layer(x)), fused into the matmul when `layer` is a plain `Linear` (a quantized layer or a
    LoRA wrapper that replaced it runs as itself, then the activation)."""
    if type(layer) is Linear:
        return linear(x, layer.weight, layer.bias, act)
    return activate(layer(x), act)


def apply_mul(layer: nn.Module, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """layer(x) * other, the product fused into a plain `Linear`'s matmul."""
    if type(layer) is Linear and layer.bias is None:
        return linear_mul(x, layer.weight, other)
    return layer(x) * other
