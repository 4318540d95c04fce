"""lfm2vl's own CPU kernels for decode rows (lfm2vl/native): built with the system C compiler and
cached; the dequantized layer times group-rounded activations, whatever the rows beside or the thread
count; and where they cannot be built, the layers keep torch's kernels and say why."""

import os
import subprocess
import sys

import pytest
import torch

from lfm2vl import native
from lfm2vl.quant import (SMALL_ROWS, Int4Linear, Int8Linear, int4_block, int8_dynamic_linear, int8_matmul_available,
                          quantize_weight)
from lfm2vl.quant.int4 import _dequantize_groups, _unpack_nibbles

needs_kernels = pytest.mark.skipif(native.library() is None, reason=f"kernels not built: {native.why_not()}")


def _layer(n: int, k: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    qweight, scale = quantize_weight(torch.randn(n, k, generator=g) * 0.05)
    return qweight, scale.to(dtype)


def _group_rounded(x: torch.Tensor) -> torch.Tensor:
    """x (M, in) on the int8 grid of each group of 32 inputs (what the kernels multiply)."""
    g = x.float().reshape(x.shape[0], -1, 32)
    s = g.abs().amax(-1, keepdim=True).clamp(min=1e-30) / 127
    return (torch.round(g / s) * s).reshape(x.shape)


@needs_kernels
@pytest.mark.parametrize("m,n,k", [(1, 160, 96), (3, 4608, 1024), (8, 1024, 4608), (5, 640, 768), (2, 96, 2048)])
def test_int8_rows_multiply_the_weight_by_group_rounded_activations(m, n, k):
    qweight, scale = _layer(n, k, torch.float32)
    g = torch.Generator().manual_seed(1)
    w = qweight.double() * scale.double()[:, None]
    for magnitude in (1e-3, 1.0, 300.0):
        x = torch.randn(m, k, generator=g) * magnitude * torch.linspace(0.1, 10, k)
        x[0, k // 3] = 40 * magnitude  # an outlier channel, as real activations have: only its group coarsens
        got = native.int8_rows(x, qweight, scale)
        assert got.dtype == torch.float32 and got.shape == (m, n)
        expected = _group_rounded(x).double() @ w.t()
        assert (got.double() - expected).abs().max() / expected.abs().max() < 1e-5  # float32 sums of exact int32 ones
        full = x.double() @ w.t()
        assert (got.double() - full).norm() / full.norm() < 0.01


@needs_kernels
def test_int8_rows_do_not_depend_on_their_neighbours_or_the_threads():
    qweight, scale = _layer(1024, 512, torch.bfloat16)
    x = torch.randn(SMALL_ROWS, 512).bfloat16()
    x[2] = 0  # an all-zero row: products 0
    together = native.int8_rows(x, qweight, scale)
    alone = torch.cat([native.int8_rows(row[None], qweight, scale) for row in x])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = native.int8_rows(x, qweight, scale)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(together, alone) and torch.equal(together, one_thread)
    assert not together[2].any()


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_layers_take_the_kernel_for_decode_rows_only(dtype):
    """Decode rows (B, 1, in) take the kernel; prompt rows, however few, int8_dynamic_linear (one scale a
    row), so a prompt's numbers do not depend on how it was chunked."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 320)
    q = Int8Linear.from_linear(linear, dtype)
    x = torch.randn(SMALL_ROWS, 1, 256).to(dtype)
    with torch.inference_mode():
        decode = native.int8_rows(x.reshape(-1, 256), q.qweight, q.scale).to(dtype) + q.bias
        assert torch.equal(q(x).reshape(-1, 320), decode)
        if int8_matmul_available():
            prompt = x.reshape(1, SMALL_ROWS, 256)
            assert torch.equal(q(prompt)[0], int8_dynamic_linear(prompt[0], q.qweight, q.scale) + q.bias)


def test_layers_the_kernels_do_not_take_are_left_to_torch():
    qweight, scale = _layer(64, 80, torch.float32)  # 80 inputs: not whole groups of 32
    assert native.int8_rows(torch.randn(1, 80), qweight, scale) is None


def _probe(env: dict[str, str]) -> str:
    code = "from lfm2vl import native; print(native.library() is not None, native.why_not())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_without_a_working_compiler_the_kernels_are_off_and_say_why(tmp_path):
    assert _probe({"LFM2VL_NATIVE": "0"}) == "False turned off (LFM2VL_NATIVE=0)"
    assert _probe({"CC": "no-such-compiler-xyz", "LFM2VL_CACHE": str(tmp_path)}).startswith("False no C compiler")
    broken = tmp_path / "cc"
    broken.write_text("#!/bin/sh\necho 'cc: error: no such thing' >&2\nexit 1\n")
    broken.chmod(0o755)
    out = _probe({"CC": str(broken), "LFM2VL_CACHE": str(tmp_path)})
    assert out.startswith("False could not build lfm2vl/native/") and "no such thing" in out


@needs_kernels
def test_the_build_is_cached_per_machine(tmp_path):
    assert _probe({"LFM2VL_CACHE": str(tmp_path)}) == "True None"
    built = sorted((tmp_path / "native").iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"
    stamp = built[0].stat().st_mtime_ns
    assert _probe({"LFM2VL_CACHE": str(tmp_path)}) == "True None"
    assert sorted((tmp_path / "native").iterdir()) == built and built[0].stat().st_mtime_ns == stamp


def test_the_bench_names_the_decode_kernel_it_ran():
    from types import SimpleNamespace

    from lfm2vl.bench.ours import kernels

    text = SimpleNamespace(decode_state=None)  # no decode step has run, or torch's layers took it
    model = SimpleNamespace(engine=SimpleNamespace(vision_patches=1024), device=torch.device("cpu"),
                            quantization="int8", dtype=torch.bfloat16, module=SimpleNamespace(language_model=text))
    isa = native.isa()
    expected = f"lfm2vl native int8 x int8 ({isa})" if isa else f"torch GEMV ({native.why_not()})"
    assert kernels(model)["int8_decode_rows"] == expected
    assert kernels(model)["decode_step"] == "torch's layers"
    text.decode_state = ([0], None)  # a table was asked for and refused: torch's layers
    assert kernels(model)["decode_step"] == "torch's layers"
    text.decode_state = ([0], object())  # lfm2vl/quant/step.py keeps (watch, table) once the C step ran
    assert kernels(model)["decode_step"] == "one C call (lfm2vl/native/step.c)"


needs_int4 = pytest.mark.skipif(native.library() is None or int4_block() not in native.INT4_BLOCKS,
                                reason="the int4 kernel needs the kernels and a torch int4 packing they read")


@needs_int4
@pytest.mark.parametrize("m,n,k", [(1, 4608, 1024), (3, 1024, 4608), (8, 128, 96), (2, 192, 2048)])
def test_int4_rows_multiply_the_dequantized_weight_by_group_rounded_activations(m, n, k):
    torch.manual_seed(0)
    q = Int4Linear.from_weight(torch.randn(n, k) * 0.05, None, torch.bfloat16)
    x = torch.randn(m, k) * torch.linspace(0.1, 5, k)
    x[0, 7] = 60  # an outlier: only its own group's grid coarsens
    got = native.int4_rows(x, q.qweight, q.scales_zeros, n, int4_block())
    w = q.dequantized(torch.float32).double()
    expected = _group_rounded(x).double() @ w.t()
    assert got.dtype == torch.float32 and got.shape == (m, n)
    assert ((got.double() - expected).abs().max() / expected.abs().max()) < 1e-5  # float32 sums of exact int32 ones
    full = x.double() @ w.t()
    assert (got.double() - full).norm() / full.norm() < 0.01  # the activations' rounding: ~0.5%
    alone = torch.cat([native.int4_rows(row[None], q.qweight, q.scales_zeros, n, int4_block()) for row in x])
    assert torch.equal(alone, got), "a row's result must not depend on the rows beside it"


def _pack_int4(q: torch.Tensor, block: int) -> torch.Tensor:
    """(n, k) nibbles -> torch's CPU int4 packing of `block` rows (lfm2vl/quant/int4.py: _unpack_nibbles reads it)."""
    n, k = q.shape
    b = q.view(n // block, 2, block // 2, k).transpose(2, 3)  # (blocks, low/high, k, block / 2)
    return (b[:, 0] | (b[:, 1] << 4)).reshape(n, k // 2).contiguous()


@pytest.mark.skipif(native.library() is None, reason=f"kernels not built: {native.why_not()}")
@pytest.mark.parametrize("block", native.INT4_BLOCKS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_rows_read_both_of_torchs_packings_from_either_input_dtype(block, dtype):
    """The AVX2 packing (32 rows a block) and the AVX-512 one (64), whichever this CPU's torch uses: a
    checkpoint from another machine, or torch told to use other kernels, still decodes right."""
    g = torch.Generator().manual_seed(3)
    n, k = 192, 160
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    assert torch.equal(_unpack_nibbles(_pack_int4(q, block), n, k, block), q)
    scales_zeros = (torch.rand(k // 32, n, 2, generator=g) * 0.02).bfloat16()
    x = (torch.randn(3, k, generator=g) * torch.linspace(0.1, 5, k)).to(dtype)
    got = native.int4_rows(x, _pack_int4(q, block), scales_zeros, n, block)
    w = _dequantize_groups(q, scales_zeros, torch.float64)
    expected = _group_rounded(x.float()).double() @ w.t()
    assert ((got.double() - expected).abs().max() / expected.abs().max()) < 1e-5
    other = native.INT4_BLOCKS[1 - native.INT4_BLOCKS.index(block)]
    assert torch.equal(got, native.int4_rows(x, _pack_int4(q, other), scales_zeros, n, other))  # the same bits


@needs_kernels
def test_int8_rows_take_bfloat16_activations_and_scales_as_their_float32_values():
    qweight, scale = _layer(256, 512, torch.bfloat16)
    x = torch.randn(2, 512).bfloat16()
    assert torch.equal(native.int8_rows(x, qweight, scale), native.int8_rows(x.float(), qweight, scale.float()))


@needs_kernels
def test_the_avx2_kernels_agree_with_the_ones_in_use(tmp_path):
    """LFM2VL_NATIVE=avx2 keeps to the AVX2 kernels (on a VNNI CPU: other kernels, the same numbers)."""
    code = ("import sys, torch; from lfm2vl import native; from lfm2vl.quant import quantize_weight; "
            "from lfm2vl.quant.int4 import Int4Linear, int4_block; g = torch.Generator().manual_seed(0); "
            "w = torch.randn(640, 1024, generator=g) * 0.05; qw, s = quantize_weight(w); "
            "q4 = Int4Linear.from_weight(w, None, torch.float32); x = torch.randn(3, 1024, generator=g); "
            "print(native.isa()); torch.save((native.int8_rows(x, qw, s), "
            "native.int4_rows(x, q4.qweight, q4.scales_zeros, 640, int4_block())), sys.argv[1])")
    isas, ys = {}, {}
    for setting in ("1", "avx2"):
        out = tmp_path / f"{setting}.pt"
        done = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "LFM2VL_NATIVE": setting})
        assert done.returncode == 0, done.stderr
        isas[setting], ys[setting] = done.stdout.strip(), torch.load(out)
    assert isas == {"1": native.isa(), "avx2": "AVX2"}
    (int8, int4), (int8_avx2, int4_avx2) = ys["1"], ys["avx2"]
    assert torch.allclose(int8_avx2, int8, rtol=0, atol=1e-5 * int8.abs().max().item())  # float32 sums, another order
    assert torch.equal(int4_avx2, int4)  # the same float32 steps in the same order


@needs_int4
def test_int4_layers_take_the_kernel_for_decode_rows_only():
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 320)
    q = Int4Linear.from_weight(linear.weight, linear.bias, torch.bfloat16)
    x = torch.randn(2, 1, 256).bfloat16()
    with torch.inference_mode():
        kernel = native.int4_rows(x.reshape(2, 256), q.qweight, q.scales_zeros, 320, int4_block()).bfloat16() + q.bias
        assert torch.equal(q(x).reshape(2, 320), kernel)  # two sequences decoding a token each
        prompt = x.reshape(1, 2, 256)  # the same rows as a 2-token prompt chunk: torch's kernel, bf16 activations
        torch_kernel = torch.ops.aten._weight_int4pack_mm_for_cpu(prompt[0], q.qweight, 32, q.scales_zeros) + q.bias
        assert torch.equal(q(prompt)[0], torch_kernel)


@needs_int4
@pytest.mark.parametrize("k", [64, 70])  # 70: gemm.c's last inputs one at a time
def test_a_nan_in_a_row_makes_that_rows_outputs_nan_and_leaves_the_others(k):
    """int8 holds no NaN, and the rounding's max over |x| drops one: a row with a NaN gets a NaN scale,
    so its outputs are NaN as a float32 product's would be (never finite garbage), and only its own."""
    from lfm2vl.quant import quantize_weight

    torch.manual_seed(0)
    x = torch.randn(4, k)
    bad = x.clone()
    bad[1, k - 1] = float("nan")
    w8, s8 = quantize_weight(torch.randn(96, k))
    calls = [lambda a: native.int8_gemm(a, w8, s8)]
    if k % 32 == 0:
        q4 = Int4Linear.from_weight(torch.randn(64, k), None, torch.float32)
        calls += [lambda a: native.int8_rows(a, w8, s8),
                  lambda a: native.int4_rows(a, q4.qweight, q4.scales_zeros, 64, int4_block())]
    for call in calls:
        clean, y = call(x), call(bad)
        assert y[1].isnan().all()
        assert torch.equal(y[[0, 2, 3]], clean[[0, 2, 3]])
