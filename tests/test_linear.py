"""lfm2vl/model/linear.py: the float32 and bfloat16 CPU linear layers (oneDNN, activations in the
epilogue) compute what F.linear and torch's activations compute, fall back where the fast op cannot serve (autograd,
other dtypes), and keep nn.Linear's parameters."""

import pytest
import torch
import torch.nn.functional as F

from lfm2vl.model import linear as L


@pytest.fixture(params=["oneDNN", "MKL"])
def float32_kernel(request, monkeypatch):
    """Both float32 paths on any CPU: oneDNN (AMD CPUs take it) and MKL (Intel CPUs keep it)."""
    monkeypatch.setattr(L, "mkl_rows", lambda: 0 if request.param == "MKL" else None)
    return request.param


@pytest.mark.parametrize("act", L.ACTIVATIONS)
@pytest.mark.parametrize("shape", [(1, 256), (3, 7, 256), (0, 256), (2, 5, 256)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_with_its_activation_is_f_linear_then_the_activation(act, shape, bias, float32_kernel):
    torch.manual_seed(0)
    x, w = torch.randn(shape), torch.randn(320, 256) / 16
    b = torch.randn(320) if bias else None
    if len(shape) == 3 and shape[0] == 2:
        x = torch.randn(5, 2, 256).transpose(0, 1)  # a strided input
    with torch.inference_mode():
        got = L.linear(x, w, b, act)
    expected = L.activate(F.linear(x, w, b), act)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_linear_mul_and_the_module_helpers(float32_kernel):
    torch.manual_seed(0)
    layer, gate = L.Linear(64, 96, bias=False), L.Linear(64, 96, bias=False)
    x = torch.randn(2, 3, 64)
    with torch.inference_mode():
        fused = L.apply_mul(layer, x, L.apply(gate, x, "silu"))
        assert torch.equal(L.apply(layer, x), layer(x))
    torch.testing.assert_close(fused, F.linear(x, layer.weight) * F.silu(F.linear(x, gate.weight)), rtol=1e-5, atol=1e-5)

    class Wrapped(torch.nn.Module):  # a quantized layer or a LoRA wrapper: runs as itself, then the activation
        def forward(self, x):
            return x * 2

    assert torch.equal(L.apply(Wrapped(), x, "gelu"), F.gelu(x * 2))
    assert torch.equal(L.apply_mul(Wrapped(), x, x), x * 2 * x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_frozen_layer_still_passes_gradients_to_its_bias_and_epilogue_operand(dtype, float32_kernel):
    """oneDNN's op has no backward: a frozen layer whose input needs no gradient must still take
    F.linear when its bias or the product's other operand needs one (LoRA on a SwiGLU gate: w3 x *
    silu(w1 x) with only w1 adapted, in the first layer, whose input is frozen)."""
    torch.manual_seed(0)
    x, w = torch.randn(4, 32, dtype=dtype), torch.randn(64, 32, dtype=dtype)
    other = torch.randn(4, 64, dtype=dtype, requires_grad=True)
    bias = torch.randn(64, dtype=dtype, requires_grad=True)
    L.linear_mul(x, w, other).float().sum().backward()
    L.linear(x, w, bias, "silu").float().sum().backward()
    torch.testing.assert_close(other.grad, F.linear(x, w))
    assert bias.grad is not None and bias.grad.abs().sum() > 0


def test_training_takes_f_linear_and_gets_gradients():
    torch.manual_seed(0)
    layer = L.Linear(32, 48)
    assert isinstance(layer, torch.nn.Linear) and set(layer.state_dict()) == {"weight", "bias"}
    x = torch.randn(4, 32, requires_grad=True)
    L.apply(layer, x, "gelu_tanh").sum().backward()
    ref = layer.weight.detach().clone().requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    F.gelu(F.linear(xr, ref, layer.bias.detach()), approximate="tanh").sum().backward()
    torch.testing.assert_close(layer.weight.grad, ref.grad)
    torch.testing.assert_close(x.grad, xr.grad)


def test_float16_and_the_switch_keep_torch_linear(monkeypatch):
    torch.manual_seed(0)
    x, w = torch.randn(3, 64).half(), torch.randn(80, 64).half()
    with torch.inference_mode():
        assert torch.equal(L.linear(x, w, None, "gelu"), F.gelu(F.linear(x, w)))
        monkeypatch.setattr(L, "ONEDNN_FLOAT32", False)
        xf, wf = x.float(), w.float()
        assert torch.equal(L.linear(xf, wf, None, "silu"), F.silu(F.linear(xf, wf)))


@pytest.mark.skipif(not L.onednn_bfloat16(), reason="oneDNN runs no native bfloat16 on this CPU")
@pytest.mark.parametrize("act", ["gelu_tanh", "gelu", "silu"])
def test_bfloat16_applies_the_activation_to_the_float32_accumulator(act):
    """bf16 takes oneDNN's epilogue too: the activation of the unrounded sums, one bf16 rounding fewer
    than F.linear then the activation, so closer to the float32 result (and never a pass of its own)."""
    torch.manual_seed(0)
    x, w, b = torch.randn(64, 256).bfloat16(), (torch.randn(384, 256) / 16).bfloat16(), torch.randn(384).bfloat16()
    with torch.inference_mode():
        got = L.linear(x, w, b, act)
        two_roundings = L.activate(F.linear(x, w, b), act)
        gated = L.linear_mul(x, w, got)
    exact = L.activate(F.linear(x.float(), w.float(), b.float()), act)
    assert got.dtype == torch.bfloat16 and not torch.equal(got, two_roundings)
    assert (got.float() - exact).abs().mean() < (two_roundings.float() - exact).abs().mean()
    torch.testing.assert_close(got.float(), exact, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gated.float(), F.linear(x.float(), w.float()) * got.float(), rtol=2e-2, atol=5e-2)


@pytest.mark.skipif(not L.onednn_float32(), reason="this torch has no oneDNN float32 linear")
@pytest.mark.parametrize("vendor,flags", [("GenuineIntel", {"avx2", "avx512f"}), ("AuthenticAMD", {"avx2", "avx512f"}),
                                          ("AuthenticAMD", {"avx2", "fma"})])
def test_float32_takes_mkl_or_onednn_by_cpu_and_rows(vendor, flags, monkeypatch):
    """MKL is at its best on Intel CPUs and runs AVX2 code on AMD ones: oneDNN there, but where the CPU
    has AVX2 only MKL's GEMM wins from MKL_ROWS_AVX2 rows. Each path is checked bit for bit against
    the op it should call, for decode rows, prompt rows and the vision tower's 2-D rows."""
    monkeypatch.setattr(L, "cpu_vendor", lambda: vendor)
    monkeypatch.setattr(L, "cpu_flags", lambda: frozenset(flags))
    L.mkl_rows.cache_clear()
    try:
        torch.manual_seed(0)
        w = torch.randn(512, 1024) / 32
        attr, algorithm = L._ONEDNN_ACT["silu"]
        many = L.MKL_ROWS_AVX2
        with torch.inference_mode():
            for x in (torch.randn(3, 1, 1024), torch.randn(1, 7, 1024), torch.randn(7, 1024),
                      torch.randn(1, many - 1, 1024), torch.randn(1, many, 1024), torch.randn(many + 5, 1024)):
                onednn = torch.ops.mkldnn._linear_pointwise(x, w, None, attr, [], algorithm)
                mkl = F.silu(F.linear(x, w))
                rows = x.numel() // 1024
                takes_mkl = vendor == "GenuineIntel" or ("avx512f" not in flags and rows >= many)
                assert torch.equal(L.linear(x, w, None, "silu"), mkl if takes_mkl else onednn), (vendor, tuple(x.shape))
            assert not torch.equal(onednn, mkl)  # the two kernels are told apart here
        assert L.float32_kernels() == {"GenuineIntel": "MKL"}.get(vendor, "oneDNN" if "avx512f" in flags else
                                                                  f"oneDNN below {many} rows, MKL from {many}")
    finally:
        L.mkl_rows.cache_clear()
