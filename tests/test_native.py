"""lfm2vl's own CPU kernels (lfm2vl/native): built with the system C compiler and cached; the same bits
as the torch code they stand in for, whatever the rows beside, the thread count or the dtype; and
where they cannot be built, the layers keep torch's kernels and say why."""

import os
import subprocess
import sys

import pytest
import torch

from lfm2vl import native
from lfm2vl.quant import SMALL_ROWS, Int8Linear, int8_dynamic_linear, quantize_weight

needs_kernels = pytest.mark.skipif(native.library() is None, reason=f"kernels not built: {native.why_not()}")


def _layer(n: int, k: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    qweight, scale = quantize_weight(torch.randn(n, k, generator=g) * 0.05)
    return qweight, scale.to(dtype)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,n,k", [(1, 160, 96), (3, 4608, 1024), (8, 1024, 4608), (5, 640, 768), (2, 96, 2048)])
def test_int8_rows_are_the_bits_of_int8_dynamic_linear(dtype, m, n, k):
    qweight, scale = _layer(n, k, dtype)
    g = torch.Generator().manual_seed(1)
    for magnitude in (1e-3, 1.0, 300.0):
        x = (torch.randn(m, k, generator=g) * magnitude * torch.linspace(0.1, 10, k)).to(dtype)
        x[0, k // 3] = 40 * magnitude  # an outlier channel, as real activations have
        got = native.int8_rows(x, qweight, scale)
        assert got.dtype == dtype and got.shape == (m, n)
        assert torch.equal(got, int8_dynamic_linear(x, qweight, scale))


@needs_kernels
def test_int8_rows_do_not_depend_on_their_neighbours_or_the_threads():
    qweight, scale = _layer(1024, 512, torch.bfloat16)
    x = torch.randn(SMALL_ROWS, 512).bfloat16()
    x[2] = 0  # an all-zero row: scale clamped, products 0
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
def test_a_row_with_nan_gives_nan_as_torch_does():
    qweight, scale = _layer(64, 96, torch.float32)
    x = torch.randn(2, 96)
    x[1, 5] = float("nan")
    got = native.int8_rows(x, qweight, scale)
    assert torch.equal(got[0], int8_dynamic_linear(x[:1], qweight, scale)[0]) and got[1].isnan().all()


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_layers_take_the_kernel_for_decode_rows_and_short_prompt_chunks(dtype):
    """Decode rows (B, 1, in) and prompt chunks of up to SMALL_ROWS rows compute int8_dynamic_linear's
    bits (the long-prompt kernel), so a token's numbers do not depend on the path its row took."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 320)
    q = Int8Linear.from_linear(linear, dtype)
    for shape in ((1, 1, 256), (SMALL_ROWS, 1, 256), (1, 3, 256)):
        x = torch.randn(shape).to(dtype)
        with torch.inference_mode():
            expected = int8_dynamic_linear(x.reshape(-1, 256), q.qweight, q.scale) + q.bias
            assert torch.equal(q(x).reshape(-1, 320), expected), shape


def test_operands_the_kernels_do_not_take_are_left_to_torch():
    qweight, scale = _layer(64, 96, torch.float32)
    assert native.int8_rows(torch.randn(1, 96).half(), qweight, scale.half()) is None
    assert native.int8_rows(torch.randn(1, 96).bfloat16(), qweight, scale) is None  # mixed dtypes


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
