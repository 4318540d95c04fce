"""lfm2vl's int8 x int8 GEMM for prompt rows on AVX2 CPUs without VNNI (lfm2vl/native/gemm.c): each row
rounded to int8 of its own max, products summed exactly in int32, the same bits as the VNNI CPUs'
path (int8_dynamic_linear) whatever the rows beside it, the tile edges or the threads; and the int8
layers take it for prompt rows exactly there."""

import pytest
import torch

import lfm2vl.quant as quant
from lfm2vl import native
from lfm2vl.quant import Int8Linear, int8_dynamic_linear, int8_matmul_exact, quantize_weight

needs_kernels = pytest.mark.skipif(native.library() is None, reason=f"kernels not built: {native.why_not()}")


def _layer(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return quantize_weight(torch.randn(n, k, generator=g) * 0.05)


def _expected(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """What gemm.c computes, in torch: q = round(x / s) with s = max(max|x|, 1e-12) / 127 (float32,
    nearest even), exact integer sums, then float32(sum) * s * w_scale in that order."""
    s = x.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 127  # (M, 1)
    sums = (torch.round(x / s).double() @ qweight.double().t()).float()  # exact: |sums| < 2^53
    return sums * s * scale


@needs_kernels
@pytest.mark.parametrize("m,n,k", [(1, 1, 32), (2, 3, 64), (3, 64, 96), (4, 65, 768), (7, 130, 160),
                                   (130, 127, 1024), (512, 192, 3072),
                                   (2, 5, 1), (3, 4, 17), (5, 66, 80), (6, 70, 4304)])  # inputs not whole 32s
def test_int8_gemm_multiplies_the_weight_by_rows_rounded_to_int8(m, n, k):
    """Every edge of the tiling (3 rows x 2 weight rows, blocks of 64 weight rows, vectors of 32 inputs):
    counts around them (the 1.6B's vision MLP has 4,304 inputs); the result is the emulation's bits exactly, and int8_dynamic_linear's (the VNNI CPUs'
    path, where torch._int_mm is exact here: slow on AVX2, but exact)."""
    qweight, scale = _layer(n, k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)) * torch.logspace(-3, 2, m)[:, None]
    got = native.int8_gemm(x, qweight, scale)
    assert got.shape == (m, n) and got.dtype == torch.float32
    assert torch.equal(got, _expected(x, qweight, scale))
    if int8_matmul_exact():
        assert torch.equal(got, int8_dynamic_linear(x, qweight, scale))


@needs_kernels
def test_int8_gemm_extremes_do_not_saturate():
    """Activations at +-max and weights at +-127 everywhere: the largest pairs AVX2's vpmaddubsw sums in
    int16 with saturation (2 x 127 x 127, below 2^15), with every combination of signs."""
    k, n = 256, 6
    qweight = torch.full((n, k), 127, dtype=torch.int8)
    qweight[1::2] = -127
    qweight[2, ::2] = -127
    x = torch.ones(5, k)
    x[1] = -1
    x[2, ::2] = -3.0
    x[2, 1::2] = 3.0
    x[3] = 0  # a row of zeros gives zeros
    x[4, 0] = 1000.0  # one outlier: the rest of its row rounds to 0
    scale = torch.full((n,), 0.01)
    got = native.int8_gemm(x, qweight, scale)
    assert torch.equal(got, _expected(x, qweight, scale))
    assert not got[3].any()
    assert got[0, 0] == pytest.approx(127 * 127 * k * (1 / 127) * 0.01, rel=1e-6)


@needs_kernels
def test_int8_gemm_rows_do_not_depend_on_their_neighbours_or_the_threads():
    qweight, scale = _layer(200, 512)
    x = torch.randn(11, 512)
    together = native.int8_gemm(x, qweight, scale)
    alone = torch.cat([native.int8_gemm(row[None], qweight, scale) for row in x])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one_thread = native.int8_gemm(x, qweight, scale)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(together, alone) and torch.equal(together, one_thread)


def test_int8_gemm_leaves_what_it_does_not_take_to_torch():
    qweight, scale = _layer(64, 96)
    assert native.int8_gemm(torch.randn(4, 96).bfloat16(), qweight, scale) is None  # float32 rows only


@needs_kernels
def test_int8_layers_take_the_gemm_for_prompt_rows_where_the_cpu_has_no_fast_int8_matmul(monkeypatch):
    """Prompt and image rows (a (1, T, in) chunk, 2-D vision rows) take gemm.c when torch's int8 matmul
    is not available; decode rows keep the decode kernel; bias and activation are applied after."""
    monkeypatch.setattr(quant, "int8_matmul_available", lambda: False)
    torch.manual_seed(0)
    q = Int8Linear.from_linear(torch.nn.Linear(256, 320), torch.float32)
    x = torch.randn(1, 9, 256)
    with torch.inference_mode():
        want = native.int8_gemm(x[0], q.qweight, q.scale) + q.bias
        assert torch.equal(native.int8_gemm(x[0], q.qweight, q.scale, q.bias), want)  # the bias added in C
        assert torch.equal(q(x)[0], want)
        assert torch.equal(q(x[0]), want)  # 2-D rows (the vision tower)
        assert torch.equal(q(x, "silu")[0], torch.nn.functional.silu(want))  # in place over the output
        for act, approximate in (("gelu", "none"), ("gelu_tanh", "tanh")):
            assert torch.equal(q(x, act)[0], torch.nn.functional.gelu(want, approximate=approximate))
        decode = native.int8_rows(x[0, :2], q.qweight, q.scale) + q.bias
        assert torch.equal(q(x[0, :2, None]).reshape(2, 320), decode)
