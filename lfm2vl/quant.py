"""Weight quantization for inference (`lfm2vl.load(..., quantize="int8" | "int4")`, `--quantize`).

int8: every nn.Linear of the vision tower, projector and language model, and the output head, keeps
its weight as int8 with one scale per output channel (symmetric, round to nearest); the token
embedding is an int8 table that a tied head reads too. A layer picks its kernel by the kind of rows
it multiplies (`prompt_rows`), and decode rows by their number only past SMALL_ROWS (more sequences
than the CPU engine's 8 slots), so a row's kernel does not depend on its neighbours:
- prompt and image rows (prefill chunks, the vision tower): int8 x int8 (`int8_dynamic_linear`): each
  row's activations are quantized to int8 with a scale of their own and multiplied exactly in int32
  by torch._int_mm; 1.4x the bf16 GEMM at 1,024 rows (2-core EPYC, docs/performance.md);
- decode rows, up to SMALL_ROWS of them: torch's int8 weight-only GEMV (`_weight_int8pack_mm`), with
  the activations in bfloat16 whatever the compute dtype (its float32 path is not vectorized: 1.8
  against 9.7-12 G weights/s in bf16, with torch and oneDNN held to AVX2 and on AVX-512);
- more decode rows, prompt rows where torch's CPU int8 matmul is missing or inexact (no
  AVX512-VNNI: `int8_matmul_available`; however few), and chunks of AMX_WIDEN_ROWS or more bf16
  prompt rows on CPUs with AMX-BF16 (faster there: `int8_prompt_products`): the int8 weight times
  its scale is widened to the compute dtype a block of rows at a time and multiplied there
  (`widened_linear`). That matmul (oneDNN's, as for any bf16 layer) may round a row differently
  at some row counts, where int8 x int8 rows and the GEMV's are the same bits alone or beside
  others; on AMX a prompt's rows thus take int8 x int8 or the widened weight by its chunk's size.
The compute dtype is bfloat16 where the CPU has native bf16 (AVX512-BF16 / AMX) or on a GPU, else
float32. On a GPU every call widens the weight (correct, but no faster than bf16). Norms, the short
convolutions, position embeddings and the vision patch embedding are not quantized.

int4: the language model's linear layers and its head keep 4-bit weights, asymmetric, one (scale,
zero) pair per group of INT4_GROUP input weights (torch's convention: w = (q - 8) * scale + zero);
the vision tower and projector stay int8 (they only run many rows, where int4 buys nothing). Decode
reads half the int8 bytes: torch's int4 kernel (`_weight_int4pack_mm_for_cpu`) streams 46 G weights/s
against 27 for int8 (AMD EPYC, benchmarks/bench_kernels.py). Above INT4_KERNEL_ROWS rows the weight
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

from .cpu import cpu_flags
from .model.linear import activate, linear

QUANTIZE = ("int8", "int4")
KEEP = ("patch_embedding",)  # tiny (768 x 768) and it sets the vision tower's input dtype: left as is
SMALL_ROWS = 8  # at or below: the int8 GEMV kernel; above: widen and multiply (measured crossover ~8-16)
INT4_GROUP = 32  # input weights per (scale, zero) pair (llama.cpp's Q4 block size)
INT4_KERNEL_ROWS = 96  # at or below: the int4 kernel; above: unpack to bf16 (measured crossover ~128)
WIDEN_BLOCK_BYTES = 4 * 2**20  # many-row calls widen this much of a weight at a time (see widened_linear)
DYNAMIC_BLOCK_BYTES = 8 * 2**20  # int8 x int8 products held at once (a block of rows)


@functools.cache
def int8_matmul_available() -> bool:
    """Whether this torch multiplies int8 x int8 -> int32 on this CPU (torch._int_mm), exactly.

    Without AVX512-VNNI (AVX2 CPUs, the first AVX-512 ones) oneDNN's int8 kernels sum pairs of
    products in int16 with saturation, so large activations and weights come out wrong (measured with
    ONEDNN_MAX_CPU_ISA=AVX2 and =AVX512_CORE): the probe multiplies 127s, whose pairs overflow int16,
    and random values, and compares with exact integer sums."""
    try:
        g = torch.Generator().manual_seed(0)
        for a, b in ((torch.full((32, 64), 127, dtype=torch.int8), torch.full((64, 32), 127, dtype=torch.int8)),
                     (torch.randint(-127, 128, (32, 256), dtype=torch.int8, generator=g),
                      torch.randint(-127, 128, (256, 32), dtype=torch.int8, generator=g))):
            if not torch.equal(torch._int_mm(a, b).long(), a.long() @ b.long()):
                return False
        return True
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


AMX_WIDEN_ROWS = 512  # bf16 prompt rows on AMX: int8 x int8 below, widened from here (crossover 300-500+)


def int8_prompt_products(dtype: torch.dtype, rows: int) -> bool:
    """Whether `rows` prompt or image rows in `dtype` multiply int8 x int8 on this CPU
    (`int8_dynamic_linear`) rather than widen the weight: where torch._int_mm is exact, except for
    AMX_WIDEN_ROWS or more bf16 rows on a CPU with AMX-BF16. Its bf16 GEMM runs on the AMX tiles and
    torch._int_mm does not, so there a whole prompt's rows are faster widened (a 1024 -> 6656 layer
    at 1,024 rows: 6.7 ms widened, 9.9 ms int8 x int8 with the quantizing, 5.3 ms for a bf16 weight;
    benchmarks/bench_kernels.py, docs/performance.md), while a short chunk (a follow-up message after
    a prefix-cache hit) is not worth widening every weight for (128 rows: 1.4 against 3.4 ms).
    Widened rows keep their activations unrounded (the weight times its scale is rounded to bf16)."""
    amx_widens = dtype == torch.bfloat16 and rows >= AMX_WIDEN_ROWS and "amx_bf16" in cpu_flags()
    return int8_matmul_available() and not amx_widens


def int8_dynamic_linear(x2: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x2 (M, in) float @ (qweight (out, in) int8 * scale (out,))^T -> (M, out) in x2's dtype, with each
    row of x2 quantized to int8 on its own (symmetric, one scale per row) and the products summed
    exactly in int32 (torch._int_mm: VNNI / AMX int8 GEMM, 2x the bf16 GEMM of a 2-core EPYC; 1.4x
    with the quantizing and scaling around it, benchmarks/bench_kernels.py).
    One scale per row keeps a row's result independent of the rows beside it (a per-tensor scale,
    as torch's quantize_dynamic uses, would make a prompt's numbers depend on its batch)."""
    # A block of rows at a time (their int32 products at most DYNAMIC_BLOCK_BYTES), in place where it
    # can be: on a 2-core VM a fresh (M, out) temporary costs as much in page faults as the multiply
    # it feeds, and the 1.6B's whole-prompt int32 products were 43 MB a layer beside the activations.
    # The products are rounded to x2's dtype before scaling (bf16: 2^-9).
    m, out_features = x2.shape[0], qweight.shape[0]
    step = max(16, DYNAMIC_BLOCK_BYTES // (4 * out_features))
    y = x2.new_empty(m, out_features)
    # float16 cannot hold the int32 sums (up to 127 * 127 * in > 65504): they are scaled in float32 first
    narrow = x2.dtype == torch.float16
    w_t, w_scale = qweight.t(), scale.to(torch.float32 if narrow else x2.dtype)
    for i in range(0, m, step):
        xf = x2[i : i + step].to(torch.float32, copy=True)  # quantized in this copy, never in x2 itself
        # max |x| per row as two reductions (no |x| temporary; 30x faster here than vector_norm(inf))
        row_scale = torch.maximum(xf.amax(-1, keepdim=True), xf.amin(-1, keepdim=True).neg_()).clamp_(min=1e-12).div_(127.0)
        xq = xf.div_(row_scale).round_().to(torch.int8)  # (rows, in), |xq| <= 127
        block = y[i : i + step]
        if narrow:
            block.copy_(torch._int_mm(xq, w_t).float().mul_(row_scale).mul_(w_scale))
        else:
            block.copy_(torch._int_mm(xq, w_t))  # exact int32 sums, rounded to y's dtype
            block.mul_(row_scale.to(x2.dtype)).mul_(w_scale)
    return y


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


def widened_linear(x2: torch.Tensor, out_features: int, widen, bias: torch.Tensor | None = None,
                   act: str = "none") -> torch.Tensor:
    """act(x2 (M, in) @ W^T + bias) -> (M, out) for many rows, with W widened to x2's dtype a block of
    output rows at a time: `widen(i, j)` gives rows [i, j) of W as (j - i, in), scales applied.
    Widening the whole weight at once held a full widened copy beside the activations (33 MB in
    bf16 for the 1.6B's 2,048 x 8,192 layers); a block (WIDEN_BLOCK_BYTES, whole 64-row groups)
    stays in cache, and measured 8-28% faster (docs/performance.md). Each block's bias and
    activation are applied in its matmul's epilogue (model/linear.py); the products are the same
    bits row by row."""
    m, k = x2.shape
    rows = max(64, WIDEN_BLOCK_BYTES // (k * x2.element_size()) // 64 * 64)
    if rows >= out_features:
        return linear(x2, widen(0, out_features), bias, act)
    y = x2.new_empty(m, out_features)
    for i in range(0, out_features, rows):
        j = min(i + rows, out_features)
        y[:, i:j] = linear(x2, widen(i, j), None if bias is None else bias[i:j], act)  # (M, j - i)
    return y


def prompt_rows(x: torch.Tensor) -> bool:
    """Whether x holds prompt or image rows (a (B, T > 1, in) chunk, or 2-D rows: the vision tower),
    not one new token per sequence (a decode step, (B, 1, in)). The choice is by kind of row, never
    by how many: prompt rows always take a prompt path (int8 x int8, or widened where int8 products
    are inexact, or on AMX for a long chunk: `int8_prompt_products`); decode rows never do, however
    many decode together. A one-token prompt chunk (a prefix hit one short) counts as a decode step."""
    return x.dim() == 2 or x.shape[-2] > 1


class _QuantizedLinear(nn.Module):
    KIND = ""
    FUSES_ACTIVATION = True  # forward(x, act): model/linear.py's `apply` hands it the activation

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> _QuantizedLinear:
        """A layer holding `weight` (out, in) quantized as this class does, and `bias`."""
        layer = cls(weight.shape[1], weight.shape[0], bias is not None, dtype, weight.device)
        for name, t in quantized_tensors(cls.KIND, weight.detach(), dtype).items():
            getattr(layer, name).copy_(t)
        if bias is not None:
            layer.bias.copy_(bias.detach())
        return layer


class Int8Linear(_QuantizedLinear):
    """y = x W^T + b with W int8 (out, in) and a per-output-channel scale: W ~= qweight * scale[:, None]."""

    KIND = "int8"

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                 device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.empty(out_features, dtype=dtype, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype: torch.dtype) -> Int8Linear:
        return cls.from_weight(linear.weight, linear.bias, dtype)

    def forward(self, x: torch.Tensor, act: str = "none") -> torch.Tensor:
        """act(x W^T + b), x (..., in) -> (..., out); act one of model/linear.py's ACTIVATIONS (fused
        into the matmul where the weight is widened)."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(self.scale.dtype)  # (M, in)
        cpu, prompt = x2.device.type == "cpu", prompt_rows(x)
        if prompt and cpu and int8_prompt_products(x2.dtype, x2.shape[0]):
            y = int8_dynamic_linear(x2, self.qweight, self.scale)
        elif not prompt and cpu and x2.shape[0] <= SMALL_ROWS:
            # bf16 activations whatever the compute dtype: the GEMV's float32 path is not vectorized
            y = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16).contiguous(), self.qweight,
                                                   self.scale.to(torch.bfloat16)).to(x2.dtype)  # (M, out)
        else:  # the scale goes into the widened rows, so that bias and activation fuse into the matmul
            def widen(i: int, j: int) -> torch.Tensor:
                return self.qweight[i:j].to(x2.dtype).mul_(self.scale[i:j, None])

            return widened_linear(x2, self.out_features, widen, self.bias, act).reshape(*lead, self.out_features)
        if self.bias is not None:
            y = y + self.bias
        return activate(y, act).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def int4_fits(out_features: int, in_features: int) -> bool:
    """Shapes torch's CPU int4 kernel packs on any CPU: whole 64-row blocks (32 with AVX2), whole groups
    along the input."""
    return out_features % 64 == 0 and in_features % INT4_GROUP == 0


INT4_BLOCKS = (64, 32)  # output rows per block of torch's CPU int4 packing: AVX-512 kernels, AVX2 kernels


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
        if x2.shape[0] <= INT4_KERNEL_ROWS and x2.device.type == "cpu":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(  # (M, out); scales_zeros is bf16 always (_apply, and the loader)
                x2.to(torch.bfloat16).contiguous(), self.qweight, INT4_GROUP, self.scales_zeros).to(out_dtype)
            if self.bias is not None:
                y = y + self.bias
            y = activate(y, act)
        else:  # widened to the compute dtype: float32 where the CPU has no native bf16 (an emulated bf16 GEMM is slow)
            wide = torch.float32 if x2.dtype == torch.float32 else torch.bfloat16
            bias = None if self.bias is None else self.bias.to(wide)
            y = widened_linear(x2.to(wide), self.out_features, lambda i, j: self.dequantized(wide, i, j), bias, act)
            y = y.to(out_dtype)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 groups of {INT4_GROUP}"


def layer_kind(scheme: str, name: str, out_features: int, in_features: int) -> str:
    """What one linear layer becomes under `scheme`: "int4" for the language model's layers and head
    (when the kernel takes their shape), else "int8"."""
    text = name.startswith("language_model.") or name == "lm_head"
    return "int4" if scheme == "int4" and text and int4_fits(out_features, in_features) else "int8"


def quantized_tensors(kind: str, weight: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The buffers (by name) of a `kind` layer holding `weight`, as loading fills them."""
    if kind == "int4":
        packed, sz = quantize_int4(weight)
        return {"qweight": packed, "scales_zeros": sz.to(torch.bfloat16)}
    qweight, scale = quantize_weight(weight)
    return {"qweight": qweight, "scale": scale.to(dtype)}


LINEAR = {"int8": Int8Linear, "int4": Int4Linear}  # layer kind -> its module


def linear_names(module: nn.Module) -> list[str]:
    """The nn.Linear layers quantization replaces (every one but KEEP)."""
    return [name for name, m in module.named_modules() if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] not in KEEP]


def replace_linears(module: nn.Module, dtype: torch.dtype, names: list[str] | None = None, scheme: str = "int8") -> None:
    """Swap the named nn.Linear layers for empty quantized shells on the same device (loading fills them)."""
    for name in linear_names(module) if names is None else names:
        old = module.get_submodule(name)
        cls = LINEAR[layer_kind(scheme, name, old.out_features, old.in_features)]
        module.set_submodule(name, cls(old.in_features, old.out_features, old.bias is not None, dtype, old.weight.device))


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
        return self.head.rows(ids).to(self.dtype_of_output.dtype)  # (..., D)


def add_int4_head(module: nn.Module, dtype: torch.dtype) -> None:
    """A tied model's int4 head (an empty shell: loading fills it from the embedding's weight) and the
    embedding that reads it."""
    table = module.language_model.embed_tokens
    head = Int4Linear(table.embedding_dim, table.num_embeddings, False, dtype, table.weight.device)
    module.lm_head = head
    module.language_model.embed_tokens = Int4TiedEmbedding(head, dtype)


def is_quantized(module: nn.Module) -> str | None:
    """"int4" / "int8" when the model's layers are quantized so (however it got so), else None."""
    kinds = {type(m) for m in module.modules()}
    return "int4" if Int4Linear in kinds else "int8" if Int8Linear in kinds else None


def check_scheme(scheme: str) -> None:
    if scheme not in QUANTIZE:
        raise ValueError(f"quantize={scheme!r} is not supported; use one of {list(QUANTIZE)}")
    if scheme == "int4" and (why := int4_available()) is not None:
        raise ValueError(why)


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
    if isinstance(head, Int4Linear) or not isinstance(table, Int8Embedding):  # own table, or not quantized
        return
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
    text = module.language_model
    for name in linear_names(module):  # from the weights' own precision, before any cast
        old = module.get_submodule(name)
        cls = LINEAR[layer_kind(scheme, name, old.out_features, old.in_features)]
        module.set_submodule(name, cls.from_weight(old.weight, old.bias, dtype))
    if tied_int4_head(module, scheme):
        module.lm_head = Int4Linear.from_weight(text.embed_tokens.weight, None, dtype)
        text.embed_tokens = Int4TiedEmbedding(module.lm_head, dtype)
    else:
        text.embed_tokens = Int8Embedding.from_weight(text.embed_tokens.weight, dtype)
    share_int8_head(module)
    return module.to(dtype)  # the rest (int8 buffers stay int8)
