"""Linear layers on the CPU's fastest exact kernel, with their activation fused in.

torch's float32 `F.linear` on the CPU calls MKL's sgemm; oneDNN's float32 matmul (the kernel torch
already uses for bfloat16) gives the same float32 products, summed in another order, and on a
2-core AMD EPYC (AVX-512) it ran 1.47x faster at 1,024 rows, 2.9x for one row, and streamed cold
weights 1.8x faster (`python benchmarks/bench_kernels.py`, docs/performance.md): MKL runs its AVX2
code on AMD CPUs. On Intel CPUs MKL is at its best and as fast or faster, fused activations
included, so there float32 layers keep F.linear; on CPUs with AVX2 only, MKL's GEMM wins from a few
hundred rows and oneDNN below (`mkl_rows`). oneDNN also applies GELU / SiLU to
the accumulator before writing it out (the activation costs a pass over memory otherwise: 9% of
the vision tower's time in float32).

In bfloat16, F.linear reaches the same oneDNN matmul already, but the activation is a pass of its
own, and a slow one: on a 2-core Xeon with AMX, a 1,300 x 1024 -> 4608 layer took 4.7 ms and its
GELU 5.5 ms more; in the epilogue 6.2 ms in all (vision GELU, 12% of the bf16 tower's time before).
The epilogue also applies it to the float32 accumulator, one bf16 rounding fewer.

`linear` takes that path for float32 and bfloat16 CPU inference (no autograd: the op has no
backward; bf16 only where oneDNN runs it natively) and is `F.linear` plus the activation everywhere
else (training; GPUs; float16). `Linear` is an `nn.Linear` (same parameters, same checkpoint keys,
still what quantization and LoRA look for) whose forward is `linear`; `apply` fuses an activation
into a layer's matmul while the layer is a plain `Linear` or a quantized layer that fuses it itself.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..cpu import cpu_flags, cpu_vendor

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


@functools.cache
def onednn_bfloat16() -> bool:
    """Whether oneDNN runs bfloat16 natively on this CPU (AVX512-BF16 / AMX) and this torch has its op."""
    try:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
        x = torch.ones(2, 8, dtype=torch.bfloat16)
        return bool(torch.ops.mkldnn._linear_pointwise(x, x, None, "none", [], "").eq(8).all())
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def _fast(x: torch.Tensor, weight: torch.Tensor, *others: torch.Tensor | None) -> bool:
    """Whether this call takes oneDNN's op: CPU inference only, since the op has no backward (`others`:
    the bias or the epilogue's operand, whose gradient would be lost too: a LoRA-adapted gate)."""
    if x.dtype != weight.dtype or x.device.type != "cpu":
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, *others)):
        return False
    if x.dtype == torch.float32:
        rows = mkl_rows()
        return ONEDNN_FLOAT32 and onednn_float32() and (rows is None or x.numel() < rows * x.shape[-1])
    return x.dtype == torch.bfloat16 and onednn_bfloat16()


MKL_ROWS_AVX2 = 384  # float32 rows from which MKL's AVX2 GEMM beats oneDNN's (AMD CPUs without AVX-512)


@functools.cache
def mkl_rows() -> int | None:
    """From how many rows a float32 layer keeps MKL's F.linear: 0 (always) on Intel CPUs, where MKL
    runs its best code (2-core Xeon with AMX, the 450M in fp32: a decode step 57.5 ms with MKL against
    64.5 ms with oneDNN, a 1,300-token prefill 2.70-2.91 s against 2.76-2.99 s with oneDNN and its
    fused SiLU, the vision tower even); None (never) on AMD CPUs with AVX-512, where MKL runs its
    AVX2 code and oneDNN's kernels are 1.5-2.8x faster; MKL_ROWS_AVX2 on other CPUs (AVX2 only: a
    2-core AVX2 EPYC, interleaved A/B: the 450M's 1,300-token prefill 5.40 s with MKL against 6.43
    with oneDNN, a 1,024-patch crop 1.47 against 1.81 s, but a decode step 84.5 against 63.2 ms; a
    1024 -> 4608 layer crosses over between 256 and 384 rows). docs/performance.md."""
    if cpu_vendor() == "GenuineIntel":
        return 0
    return None if "avx512f" in cpu_flags() else MKL_ROWS_AVX2


def float32_kernels() -> str:
    """Which float32 matmul this CPU's layers take, in words (the bench reports it)."""
    rows = mkl_rows()
    if not (ONEDNN_FLOAT32 and onednn_float32()) or rows == 0:
        return "MKL"
    return "oneDNN" if rows is None else f"oneDNN below {rows} rows, MKL from {rows}"


def activate(y: torch.Tensor, act: str, inplace: bool = False) -> torch.Tensor:
    """act(y); with `inplace`, written over y (the same bits; no fresh (M, out) tensor, whose page
    faults cost a 2-core VM about what the activation does: 1,024 x 4,304 GELU 23 ms fresh)."""
    if act == "none":
        return y
    if act == "silu":
        return F.silu(y, inplace=inplace)
    approximate = "tanh" if act == "gelu_tanh" else "none"
    return torch.ops.aten.gelu_(y, approximate=approximate) if inplace else F.gelu(y, approximate=approximate)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, act: str = "none") -> torch.Tensor:
    """act(x (..., in) @ weight (out, in)^T + bias) -> (..., out); act one of ACTIVATIONS."""
    if _fast(x, weight, bias):
        attr, algorithm = _ONEDNN_ACT[act]
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, attr, [], algorithm)
    return activate(F.linear(x, weight, bias), act)


def linear_mul(x: torch.Tensor, weight: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """(x @ weight^T) * other, the product taken in the matmul's epilogue where it can be (SwiGLU's up
    projection times its activated gate)."""
    if _fast(x, weight, other) and other.dtype == x.dtype and other.shape[:-1] == x.shape[:-1]:
        return torch.ops.mkldnn._linear_pointwise.binary(x, other, weight, None, "mul")
    return F.linear(x, weight) * other


class Linear(nn.Linear):
    """nn.Linear whose forward is `linear` (the fast float32 CPU path)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def apply(layer: nn.Module, x: torch.Tensor, act: str = "none") -> torch.Tensor:
    """act(layer(x)), fused into the matmul when `layer` is a plain `Linear` or a quantized layer that
    says it fuses (FUSES_ACTIVATION); a LoRA wrapper that replaced it runs as itself, then the activation."""
    if type(layer) is Linear:
        return linear(x, layer.weight, layer.bias, act)
    if getattr(layer, "FUSES_ACTIVATION", False):  # a quantized layer (lfm2vl/quant/) fuses it itself
        return layer(x, act=act)
    return activate(layer(x), act)


def apply_mul(layer: nn.Module, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """layer(x) * other, the product fused into a plain `Linear`'s matmul."""
    if type(layer) is Linear and layer.bias is None:
        return linear_mul(x, layer.weight, other)
    return layer(x) * other
