"""int4: the language model's linear layers and its head keep 4-bit weights, asymmetric, one (scale,
zero) pair per group of INT4_GROUP input weights (torch's convention: w = (q - 8) * scale + zero);
the vision tower and projector stay int8 (they only run many rows, where int4 buys nothing). Decode
reads half the int8 bytes. Decode rows (up to SMALL_ROWS) take lfm2vl's kernel where it is built for
this CPU (lfm2vl/native: AVX512-VNNI or AVX2, activations rounded to int8 per group of 32, 55-67 G
weights/s against 32-35 for torch's on a 2-core AVX-512 EPYC), and so do float32 prompt rows where
torch has no int8 products (`int4_prompt_kernel`); other rows up to INT4_KERNEL_ROWS, and decode rows
elsewhere, torch's int4 kernel (`_weight_int4pack_mm_for_cpu`, bf16 activations). Above those rows the weight
is unpacked to bfloat16 (float32 where the compute dtype is: a bf16 GEMM is emulated there, and the
450M's int4 prefill took 21.4 s with it). torch packs int4 weights 64 output rows to a block with
AVX-512 kernels and 32 with AVX2 (`int4_block`); a checkpoint records its packing and loads repacked
on the other kind of CPU. A layer whose shape the kernel cannot take (out % 64, in % INT4_GROUP)
stays int8. A tied head is an int4 table that the token embedding reads its rows from (one copy).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from .. import native
from ..model.cast import cast
from ..model.linear import activate
from .common import SMALL_ROWS, _QuantizedLinear, kernel_rows, prompt_rows, widened_linear

INT4_GROUP = 32  # input weights per (scale, zero) pair (llama.cpp's Q4 block size)
INT4_KERNEL_ROWS = 96  # at or below: the int4 kernel; above: unpack to bf16 (measured crossover ~128)


def int4_fits(out_features: int, in_features: int) -> bool:
    """Shapes torch's CPU int4 kernel packs on any CPU: whole 64-row blocks (32 with AVX2), whole groups
    along the input."""
    return out_features % 64 == 0 and in_features % INT4_GROUP == 0


INT4_BLOCKS = native.INT4_BLOCKS  # output rows per block of torch's CPU int4 packings (AVX2, AVX-512), which lfm2vl's kernels read


@functools.cache  # a property of this torch and CPU: checked once, however many loads and CLI checks ask
def int4_block() -> int | None:
    """Output rows per block of the int4 packing torch uses on this CPU (INT4_BLOCKS), or None when it
    has no CPU int4 kernel or packs in a layout `_unpack_nibbles` does not read."""
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return None
    probe = torch.randint(0, 16, (128, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)
    if packed.dtype == torch.uint8 and packed.shape == (128, 32):
        for block in INT4_BLOCKS:
            if torch.equal(_unpack_nibbles(packed, 128, 64, block).int(), probe):
                return block
    return None


def int4_available() -> str | None:
    """None when this torch has the CPU int4 kernel with a packing `_unpack_nibbles` reads, else why not."""
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return f"torch {torch.__version__} has no CPU int4 kernel (_weight_int4pack_mm_for_cpu): use int8"
    if int4_block() is None:
        return f"torch {torch.__version__} packs int4 weights in a layout lfm2vl does not read: use int8"
    return None


def _unpack_nibbles(packed: torch.Tensor, n: int, k: int, block: int) -> torch.Tensor:
    """torch's CPU int4 packing (torch 2.6-2.13) -> (n, k) uint8 in 0..15. Each block of `block` output
    rows (64 where torch's kernels use AVX-512, 32 with AVX2: `int4_block`) is (k, block / 2) bytes:
    byte [kk, j] holds row j in its low nibble and row block / 2 + j in its high one."""
    b = packed.view(n // block, k, block // 2)
    return torch.stack((b & 15, b >> 4), 1).transpose(2, 3).reshape(n, k)


def repack_int4(packed: torch.Tensor, n: int, k: int, block: int) -> torch.Tensor:
    """An (n, k) int4 weight packed with `block` rows per block (another CPU's layout: a checkpoint
    written there) -> this CPU's packing."""
    if block == int4_block():
        return packed
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(_unpack_nibbles(packed.cpu(), n, k, block).int(), 1)


def _dequantize_groups(q: torch.Tensor, scales_zeros: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q (R, in) in 0..15 and scales_zeros (in/G, R, 2) -> (R, in) weights (q - 8) * scale + zero, in `dtype`."""
    r, k = q.shape
    scale, zero = scales_zeros.to(dtype).permute(2, 1, 0)  # 2 x (R, in/G)
    q = q.view(r, k // INT4_GROUP, INT4_GROUP).to(dtype)
    return ((q - 8) * scale[..., None] + zero[..., None]).view(r, k)


def quantize_int4(weight: torch.Tensor, chunk_rows: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float -> (packed uint8 (out, in/2), scales_zeros fp32 (in/G, out, 2)), a block of rows at a time."""
    n, k = weight.shape
    packed = torch.empty(n, k // 2, dtype=torch.uint8)
    sz = torch.empty(k // INT4_GROUP, n, 2, dtype=torch.float32)
    for i in range(0, n, chunk_rows):
        g = weight[i : i + chunk_rows].float().cpu().view(-1, k // INT4_GROUP, INT4_GROUP)  # (rows, in/G, G)
        low, high = g.amin(-1), g.amax(-1)
        scale = (high - low).clamp(min=1e-6) / 15
        q = torch.round((g - low[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.int32).view(-1, k)
        packed[i : i + chunk_rows] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        sz[:, i : i + chunk_rows] = torch.stack((scale, low + 8 * scale), -1).transpose(0, 1)
    return packed.to(weight.device), sz.to(weight.device)


@functools.cache
def int4_prompt_kernel() -> bool:
    """Whether float32 prompt rows take lfm2vl's int4 kernel rather than a widened weight: where torch
    has no exact int8 matmul (`int8_matmul_available()` False: AVX2 CPUs without VNNI or AMX, where the
    widened weight multiplies in float32), the kernel, which multiplies the 4-bit weights by int8-rounded
    rows, ran 1.6-2.0x faster for 512 rows of the 450M's layers (docs/performance.md). Elsewhere the
    widened path keeps them (AMX multiplies bf16 far faster)."""
    from . import int8_matmul_available

    return not int8_matmul_available()


class Int4Linear(_QuantizedLinear):
    """y = x W^T + b with W in 4 bits: W[o, i] ~= (q[o, i] - 8) * scale[i // G, o] + zero[i // G, o]."""

    KIND = "int4"

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                 device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        # bf16 whatever the compute dtype: the CPU kernel is 45x slower in float32
        self.register_buffer("scales_zeros", torch.empty(in_features // INT4_GROUP, out_features, 2,
                                                         dtype=torch.bfloat16, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)

    @staticmethod
    def quantized(weight: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        packed, sz = quantize_int4(weight)
        return {"qweight": packed, "scales_zeros": sz.to(torch.bfloat16)}  # bf16 whatever the dtype (below)

    def _apply(self, fn, recurse: bool = True) -> Int4Linear:
        super()._apply(fn, recurse)
        if self.scales_zeros.dtype != torch.bfloat16:  # a cast of the model (.to(float32)): the kernel wants bf16
            self.scales_zeros = self.scales_zeros.to(torch.bfloat16)
        return self

    def dequantized(self, dtype: torch.dtype = torch.bfloat16, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Rows [start, end) (whole 64-row blocks, or to the end) of the (out, in) weight the kernel
        multiplies by, in `dtype`."""
        end = self.out_features if end is None else end
        k, block = self.in_features, int4_block()
        packed = self.qweight.view(self.out_features // block, k // 2 * block)[start // block : -(-end // block)]
        q = _unpack_nibbles(packed, packed.shape[0] * block, k, block)[: end - start]  # (end - start, in)
        return _dequantize_groups(q, self.scales_zeros[:, start:end], dtype)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of the dequantized weight, (..., in) bf16: a tied head read as an embedding table."""
        n, k = self.out_features, self.in_features
        flat, half = ids.reshape(-1), int4_block() // 2
        b = self.qweight.view(n // (2 * half), k, half)[flat // (2 * half), :, flat % half]  # (T, in): each row's bytes
        q = torch.where((flat % (2 * half) >= half)[:, None], b >> 4, b & 15)  # (T, in)
        return _dequantize_groups(q, self.scales_zeros[:, flat], torch.bfloat16).view(*ids.shape, k)

    def forward(self, x: torch.Tensor, act: str = "none") -> torch.Tensor:
        """act(x W^T + b), x (..., in) -> (..., out) (act fused into the matmul where the weight is widened)."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # (M, in)
        out_dtype = x.dtype if self.bias is None else self.bias.dtype
        y, prompt = None, prompt_rows(x)
        kernels = kernel_rows(x2)
        if kernels and ((not prompt and x2.shape[0] <= SMALL_ROWS) or
                        (prompt and x2.dtype == torch.float32 and int4_prompt_kernel())):
            # lfm2vl's kernel, activations rounded to int8 per group of 32 (None: not built here): decode
            # rows, and float32 prompt rows where the CPU has no int8 or bf16 matmul to widen into
            y = native.int4_rows(x2, self.qweight, self.scales_zeros, self.out_features, int4_block())
        if y is None and kernels and x2.shape[0] <= INT4_KERNEL_ROWS:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(  # (M, out); scales_zeros is bf16 always (_apply, and the loader)
                x2.to(torch.bfloat16).contiguous(), self.qweight, INT4_GROUP, self.scales_zeros)
        if y is not None:
            y = cast(y, out_dtype)
            if self.bias is not None:
                y = y + self.bias
            y = activate(y, act)
        else:  # widened to the compute dtype: float32 where the CPU has no native bf16 (an emulated bf16 GEMM is
            # slow), float16 on a GPU without native bf16
            wide = x2.dtype if x2.dtype in (torch.float32, torch.float16) else torch.bfloat16
            bias = None if self.bias is None else self.bias.to(wide)
            y = widened_linear(x2.to(wide), self.out_features, lambda i, j: self.dequantized(wide, i, j), bias, act)
            y = y.to(out_dtype)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 groups of {INT4_GROUP}"


def tied_int4_head(module: nn.Module, scheme: str) -> bool:
    """Whether `scheme` gives this (tied) model an int4 head of its own, read from the embedding."""
    table = module.language_model.embed_tokens
    dims = (table.num_embeddings, table.embedding_dim)
    return scheme == "int4" and getattr(module, "lm_head", None) is None and int4_fits(*dims)


class Int4TiedEmbedding(nn.Module):
    """Token embeddings read from a tied int4 head (`Int4Linear.rows`): the table exists once, in the head."""

    def __init__(self, head: Int4Linear, dtype: torch.dtype):
        super().__init__()
        self.__dict__["head"] = head  # a reference, not a submodule: the head owns (and saves) the table
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        self.register_buffer("dtype_of_output", torch.empty(0, dtype=dtype), persistent=False)  # follows .to()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return cast(self.head.rows(ids), self.dtype_of_output.dtype)  # (..., D)


def add_int4_head(module: nn.Module, dtype: torch.dtype) -> None:
    """A tied model's int4 head (an empty shell: loading fills it from the embedding's weight) and the
    embedding that reads it."""
    table = module.language_model.embed_tokens
    head = Int4Linear(table.embedding_dim, table.num_embeddings, False, dtype, table.weight.device)
    module.lm_head = head
    module.language_model.embed_tokens = Int4TiedEmbedding(head, dtype)
