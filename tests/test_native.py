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
    assert out.startswith("False could not build lfm2vl/native/kernels.c") and "no such thing" in out


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

    model = SimpleNamespace(engine=SimpleNamespace(vision_patches=1024), device=torch.device("cpu"),
                            quantization="int8", dtype=torch.bfloat16)
    expected = "lfm2vl native int8 x int8" if native.library() is not None else f"torch GEMV ({native.why_not()})"
    assert kernels(model)["int8_decode_rows"] == expected


needs_int4 = pytest.mark.skipif(native.library() is None or int4_block() != native.INT4_BLOCK_ROWS,
                                reason="the int4 kernel needs the kernels and torch's AVX-512 int4 packing")


@needs_int4
@pytest.mark.parametrize("m,n,k", [(1, 4608, 1024), (3, 1024, 4608), (8, 128, 96), (2, 192, 2048)])
def test_int4_rows_multiply_the_dequantized_weight_by_group_rounded_activations(m, n, k):
    torch.manual_seed(0)
    q = Int4Linear.from_weight(torch.randn(n, k) * 0.05, None, torch.bfloat16)
    x = torch.randn(m, k) * torch.linspace(0.1, 5, k)
    x[0, 7] = 60  # an outlier: only its own group's grid coarsens
    got = native.int4_rows(x, q.qweight, q.scales_zeros, n)
    w = q.dequantized(torch.float32).double()
    expected = _group_rounded(x).double() @ w.t()
    assert got.dtype == torch.float32 and got.shape == (m, n)
    assert ((got.double() - expected).abs().max() / expected.abs().max()) < 1e-5  # float32 sums of exact int32 ones
    full = x.double() @ w.t()
    assert (got.double() - full).norm() / full.norm() < 0.01  # the activations' rounding: ~0.5%
    alone = torch.cat([native.int4_rows(row[None], q.qweight, q.scales_zeros, n) for row in x])
    assert torch.equal(alone, got), "a row's result must not depend on the rows beside it"


@needs_int4
def test_int4_layers_take_the_kernel_for_decode_rows_only():
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 320)
    q = Int4Linear.from_weight(linear.weight, linear.bias, torch.bfloat16)
    x = torch.randn(2, 1, 256).bfloat16()
    with torch.inference_mode():
        kernel = native.int4_rows(x.reshape(2, 256), q.qweight, q.scales_zeros, 320).bfloat16() + q.bias
        assert torch.equal(q(x).reshape(2, 320), kernel)  # two sequences decoding a token each
        prompt = x.reshape(1, 2, 256)  # the same rows as a 2-token prompt chunk: torch's kernel, bf16 activations
        torch_kernel = torch.ops.aten._weight_int4pack_mm_for_cpu(prompt[0], q.qweight, 32, q.scales_zeros) + q.bias
        assert torch.equal(q(prompt)[0], torch_kernel)
