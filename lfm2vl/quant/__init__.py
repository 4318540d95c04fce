"""Weight quantization for inference (`lfm2vl.load(..., quantize="int8" | "int4")`, `--quantize`).

int8: every nn.Linear of the vision tower, projector and language model, and the output head, keeps
its weight as int8 with one scale per output channel (symmetric, round to nearest); the token
embedding is an int8 table that a tied head reads too. A layer picks its kernel by the kind of rows
it multiplies (`prompt_rows`), and decode rows by their number only past SMALL_ROWS (more sequences
than the CPU engine's 8 slots), so a row's kernel does not depend on its neighbours:
- prompt and image rows (prefill chunks, the vision tower): int8 x int8 (`int8_dynamic_linear`): each
  row's activations are quantized to int8 with a scale of their own and multiplied exactly in int32
  by torch._int_mm; 1.4x the bf16 GEMM at 1,024 rows (2-core EPYC, docs/performance.md);
- decode rows, up to SMALL_ROWS of them: lfm2vl's own kernel (lfm2vl/native: activations rounded to
  int8 per group of 32, exact int32 sums; at the memory's speed, 2x torch's GEMV on a 2-core AVX-512
  EPYC) where a C compiler built it for a CPU with AVX512-VNNI or AVX2, else torch's int8 weight-only GEMV
  (`_weight_int8pack_mm`; activations in bf16 whatever the compute dtype, its float32 path is not
  vectorized: 1.8 against 9.7-12 G weights/s);
- prompt and image rows on CPUs with AVX2 but no VNNI or AMX (where torch._int_mm is slow:
  `int8_matmul_available`), in float32: lfm2vl's own int8 x int8 GEMM (lfm2vl/native/gemm.c), with
  the same bits as int8_dynamic_linear; 1.1-1.7x the float32 GEMM on a 2-core AVX2 EPYC
  (docs/performance.md);
- more decode rows, prompt rows where neither int8 path runs (no VNNI or AMX, and no native GEMM:
  not built, or bf16 / float16 rows; however few), and chunks of AMX_WIDEN_ROWS or more bf16
  prompt rows on CPUs with AMX-BF16 (faster there: `int8_prompt_products`): the int8 weight times
  its scale is widened to the compute dtype a block of rows at a time and multiplied there
  (`widened_linear`), which may round a row differently at some row counts (oneDNN's bf16 matmul).
The compute dtype is bfloat16 where the CPU has native bf16 (AVX512-BF16 / AMX) or the GPU does
(float16 on older GPUs), else float32. On a GPU every call widens the weight (correct and smaller,
but slower than the unquantized model; `lfm2vl.load` warns). Norms, the short
convolutions, position embeddings and the vision patch embedding are not quantized.

int4: lfm2vl/quant/int4.py. Shared by both: lfm2vl/quant/common.py.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from .. import native
from ..cpu import cpu_flags
from ..model.cast import cast
from ..model.linear import activate

# this package's public face: the loader (weights.py), the CLI, the bench and the tests import from here
from .common import (SMALL_ROWS, WIDEN_BLOCK_BYTES, _QuantizedLinear, kernel_rows, prompt_rows,  # noqa: F401
                     widened_linear)
from .int4 import (INT4_BLOCKS, INT4_GROUP, INT4_KERNEL_ROWS, Int4Linear, Int4TiedEmbedding,  # noqa: F401
                   add_int4_head, int4_available, int4_block, int4_fits, int4_prompt_kernel, quantize_int4, repack_int4,
                   tied_int4_head)
from .step import use_native_step  # noqa: F401

QUANTIZE = ("int8", "int4")
KEEP = ("patch_embedding",)  # tiny (768 x 768) and it sets the vision tower's input dtype: left as is
DYNAMIC_BLOCK_BYTES = 8 * 2**20  # int8 x int8 products held at once (a block of rows)


# x86 flags under which oneDNN multiplies int8 x int8 in hardware (VNNI, AMX). Elsewhere torch._int_mm
# may still be exact, but slow: on a 2-core AVX2 EPYC (torch 2.13) 1.9 GFLOP/s against 130 for the
# float32 GEMM, which made the 450M's int8 vision tower take 205 s where float32 takes 10.5 (docs/performance.md).
INT8_MATMUL_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


@functools.cache
def int8_matmul_exact() -> bool:
    """Whether this torch multiplies int8 x int8 -> int32 on this CPU (torch._int_mm) exactly.

    oneDNN's int8 kernels for CPUs without VNNI (AVX2, the first AVX-512 ones) sum pairs of products
    in int16 with saturation, so large activations and weights come out wrong (measured with
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


def int8_matmul_available() -> bool:
    """Whether prompt and image rows multiply int8 x int8 here: torch._int_mm is exact on this CPU and
    the CPU multiplies int8 in hardware (INT8_MATMUL_FLAGS). Elsewhere int8 layers widen their weights
    for those rows (as fast as the compute dtype's GEMM; the weights still stream as int8)."""
    return bool(cpu_flags() & INT8_MATMUL_FLAGS) and int8_matmul_exact()


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
    """bfloat16 where it is fast (a GPU with native bf16, or a CPU with native bf16), float16 on older GPUs
    (before Ampere bf16 is emulated), else float32."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
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

    @staticmethod
    def quantized(weight: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        qweight, scale = quantize_weight(weight)
        return {"qweight": qweight, "scale": scale.to(dtype)}

    def forward(self, x: torch.Tensor, act: str = "none") -> torch.Tensor:
        """act(x W^T + b), x (..., in) -> (..., out); act one of model/linear.py's ACTIVATIONS (fused
        into the matmul where the weight is widened)."""
        lead = x.shape[:-1]
        x2 = cast(x.reshape(-1, self.in_features), self.scale.dtype)  # (M, in)
        kernels, prompt, few = kernel_rows(x2), prompt_rows(x), x2.shape[0] <= SMALL_ROWS
        y, biased = None, False
        if prompt and kernels and int8_prompt_products(x2.dtype, x2.shape[0]):
            y = int8_dynamic_linear(x2, self.qweight, self.scale)
        elif prompt and kernels and not int8_matmul_available():
            y = native.int8_gemm(x2, self.qweight, self.scale, self.bias)  # AVX2 without VNNI (None: not built, or bf16)
            biased = True  # gemm.c adds the bias
        elif not prompt and kernels and few:
            y = native.int8_rows(x2, self.qweight, self.scale)  # lfm2vl's kernel (None: not built here)
            if y is None:  # torch's GEMV: bf16 activations whatever the compute dtype (its float32 path is slow)
                y = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16).contiguous(), self.qweight,
                                                       self.scale.to(torch.bfloat16))
            y = cast(y, x2.dtype)  # (M, out)
        if y is None:  # the scale goes into the widened rows, so that bias and activation fuse into the matmul
            def widen(i: int, j: int) -> torch.Tensor:
                return self.qweight[i:j].to(x2.dtype).mul_(self.scale[i:j, None])

            return widened_linear(x2, self.out_features, widen, self.bias, act).reshape(*lead, self.out_features)
        # y is this call's own (M, out): bias and activation in place (the same bits as y + bias and
        # act(y); a fresh (M, out) for each cost prompt rows as much in page faults as the work)
        if self.bias is not None and not biased:
            y.add_(self.bias)
        return activate(y, act, inplace=True).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def layer_kind(scheme: str, name: str, out_features: int, in_features: int) -> str:
    """What one linear layer becomes under `scheme`: "int4" for the language model's layers and head
    (when the kernel takes their shape), else "int8"."""
    text = name.startswith("language_model.") or name == "lm_head"
    return "int4" if scheme == "int4" and text and int4_fits(out_features, in_features) else "int8"


def quantized_tensors(kind: str, weight: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The buffers (by name) of a `kind` layer holding `weight`, as loading fills them."""
    return LINEAR[kind].quantized(weight, dtype)


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
    use_native_step(module)
    return module.to(dtype)  # the rest (int8 buffers stay int8)
