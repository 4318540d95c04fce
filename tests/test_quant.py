"""int8 and int4 weights (lfm2vl/quant/): every kernel computes the dequantized layer; the quantized
bundled model agrees with fp32 teacher-forced and answers easy-VQA questions the same; what cannot work
says so. Also the half-precision decode paths of the text model (one-query attention, the conv tap)."""

import pytest
import torch
import torch.nn.functional as F

import lfm2vl
from lfm2vl.quant import (INT4_GROUP, INT4_KERNEL_ROWS, SMALL_ROWS, Int4Linear, Int8Linear, int4_available,
                          int8_matmul_available, int8_matmul_exact)

ROOT = __import__("pathlib").Path(__file__).parent.parent


@pytest.mark.parametrize("rows", [1, SMALL_ROWS, SMALL_ROWS + 1, 200])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_is_the_dequantized_layer(rows, dtype):
    """Decode rows (one new token for each of `rows` sequences): the weight is int8; up to SMALL_ROWS rows
    the activations are rounded too (lfm2vl's int8 x int8 kernel, or torch's GEMV in bf16), above it not."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 160)
    q = Int8Linear.from_linear(linear, dtype)
    x = torch.randn(rows, 1, 96)
    dequantized = q.qweight.float() * q.scale.float()[:, None]
    expected = F.linear(x, dequantized, linear.bias)
    got = q(x).float()
    assert got.shape == (rows, 1, 160)
    tol = 1e-4 if dtype == torch.float32 and rows > SMALL_ROWS else 3e-2
    assert torch.allclose(got, expected, atol=tol, rtol=tol), (got - expected).abs().max()
    if dtype == torch.float32:  # round to nearest (bf16 scales are themselves rounded)
        assert ((dequantized - linear.weight).abs() <= q.scale[:, None] / 2 + 1e-7).all()


@pytest.fixture
def int8_products(monkeypatch):
    """Prompt rows multiply int8 x int8 wherever torch._int_mm is exact, fast here or not (the tests
    check what it computes, not its speed)."""
    from lfm2vl import quant

    if not int8_matmul_exact():
        pytest.skip("this torch has no exact CPU int8 x int8 matmul")
    monkeypatch.setattr(quant, "int8_matmul_available", lambda: True)


@pytest.mark.parametrize("shape", [(1, 200, 96), (3, 9, 96), (300, 96)])  # prompt chunks, and the vision tower's 2-D rows
def test_int8_prompt_rows_are_int8_by_int8_with_one_scale_per_row(shape, int8_products):
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 160)
    q = Int8Linear.from_linear(linear, torch.float32)
    x = torch.randn(shape) * torch.linspace(0.1, 10, shape[-1])  # uneven channels, as real activations
    s = x.abs().amax(-1, keepdim=True) / 127
    xq = torch.round(x / s) * s  # each row on its own int8 grid
    dequantized = q.qweight.float() * q.scale.float()[:, None]
    x0 = x.clone()
    got = q(x)
    assert torch.equal(x, x0)  # the activations are quantized into a copy, never in place
    assert torch.allclose(got, F.linear(xq, dequantized, linear.bias), atol=1e-4, rtol=1e-4)
    full = F.linear(x, linear.weight, linear.bias)
    assert (got - full).norm() / full.norm() < 0.02  # both roundings together: about 1% here
    rows = x.reshape(-1, 96)
    alone = torch.stack([q(row.expand(1, 2, 96))[0, 0] for row in rows])  # each row in a 2-token chunk of its own
    assert torch.equal(alone, got.reshape(-1, 160)), "a row's result must not depend on the rows beside it"


@pytest.mark.parametrize("amx", [True, False])
def test_long_bf16_prompt_chunks_widen_on_amx_cpus_and_multiply_int8_elsewhere(amx, monkeypatch):
    """With AMX-BF16 the widened weight's bf16 GEMM beats int8 x int8 for a long chunk (torch._int_mm
    has no AMX path): from AMX_WIDEN_ROWS bf16 prompt rows multiply the int8 weights unrounded
    activations there; shorter chunks, float32 rows and other CPUs stay int8 x int8."""
    from lfm2vl import quant

    if not int8_matmul_exact():
        pytest.skip("this torch has no exact CPU int8 x int8 matmul: every CPU widens")
    flags = frozenset({"avx512_vnni", "avx512_bf16"} | ({"amx_bf16", "amx_int8", "amx_tile"} if amx else set()))
    monkeypatch.setattr(quant, "cpu_flags", lambda: flags)
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 160)
    q = Int8Linear.from_linear(linear, torch.bfloat16)
    w = q.qweight.float() * q.scale.float()[:, None]
    for rows in (40, quant.AMX_WIDEN_ROWS):
        x = torch.randn(1, rows, 96).bfloat16() * torch.linspace(0.1, 10, 96).bfloat16()
        x[..., 0] = 40  # an outlier channel: each row's int8 grid is coarse for the others
        widened = F.linear(x.float(), w, q.bias.float())
        s = x.float().abs().amax(-1, keepdim=True) / 127
        int8_by_int8 = F.linear(torch.round(x.float() / s) * s, w, q.bias.float())
        got = q(x).float()
        wide = amx and rows >= quant.AMX_WIDEN_ROWS
        assert quant.int8_prompt_products(torch.bfloat16, rows) is not wide
        assert quant.int8_prompt_products(torch.float32, rows)
        near, far = (widened, int8_by_int8) if wide else (int8_by_int8, widened)
        # mean errors here: 0.007-0.010 to the kernel taken (bf16 roundings), 0.042-0.044 to the other
        assert (got - near).abs().mean() < 0.4 * (got - far).abs().mean(), f"{rows} rows took the other kernel"


def test_a_short_prompt_chunk_never_takes_the_decode_gemv(monkeypatch):
    """Where prompt rows widen (no fast exact int8 matmul), a chunk of a few prompt rows widens too: the
    kernel follows the kind of row, not how many; decode rows keep theirs (lfm2vl's kernel, or torch's
    GEMV where it is not built)."""
    from lfm2vl import native, quant

    monkeypatch.setattr(quant, "int8_matmul_available", lambda: False)
    torch.manual_seed(0)
    q = Int8Linear.from_linear(torch.nn.Linear(96, 160), torch.bfloat16)
    x = torch.randn(1, 3, 96).bfloat16()

    def widen(i, j):
        return q.qweight[i:j].bfloat16().mul_(q.scale[i:j, None])

    decode = native.int8_rows(x[0], q.qweight, q.scale)
    if decode is None:
        decode = torch.ops.aten._weight_int8pack_mm(x[0], q.qweight, q.scale)
    decode = decode.bfloat16() + q.bias
    with torch.inference_mode():
        assert torch.equal(q(x)[0], quant.widened_linear(x[0], 160, widen, q.bias))  # a 3-token prompt chunk
        assert torch.equal(q(x.transpose(0, 1))[:, 0], decode)  # 3 sequences decoding one token each


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 200])  # a decode row (kernel, then the activation) and prompt rows (widened, fused)
def test_quantized_layers_take_the_activation_into_their_matmul(scheme, rows):
    from lfm2vl.model.linear import activate, apply

    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 192)
    cls = Int8Linear if scheme == "int8" else Int4Linear
    for dtype in (torch.float32, torch.bfloat16):
        q = cls.from_weight(linear.weight, linear.bias, dtype)
        x = torch.randn(1, rows, 128).to(dtype)
        for act in ("gelu_tanh", "silu"):
            with torch.inference_mode():
                fused, separate = apply(q, x, act), activate(q(x), act)
            assert fused.shape == separate.shape == (1, rows, 192) and fused.dtype == separate.dtype
            tol = 1e-5 if dtype == torch.float32 and scheme == "int8" and rows > SMALL_ROWS else 2e-2
            torch.testing.assert_close(fused.float(), separate.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("flags,fast", [({"avx2", "fma"}, False), ({"avx2", "avx512f", "avx512bw"}, False),
                                         ({"avx2", "avx_vnni"}, True), ({"avx512_vnni"}, True), ({"amx_int8"}, True)])
def test_int8_matmul_is_used_only_where_the_cpu_multiplies_int8(flags, fast, monkeypatch):
    """torch._int_mm can be exact and still 70x slower than the float32 GEMM (2-core AVX2 EPYC, torch
    2.13): without VNNI or AMX, prompt and image rows widen their weights instead."""
    from lfm2vl import quant

    monkeypatch.setattr(quant, "cpu_flags", lambda: frozenset(flags))
    assert int8_matmul_available() == (fast and int8_matmul_exact())


def test_int8_matmul_is_used_only_where_it_is_exact():
    """Without AVX512-VNNI oneDNN's int8 kernels saturate (ONEDNN_MAX_CPU_ISA=AVX2 reproduces it on any
    x86 CPU): there the probe must say no, and int8 layers multiply widened weights instead."""
    import subprocess
    import sys

    code = ("import torch; from lfm2vl.quant import int8_matmul_available as f; a = torch.full((8, 64), 127, "
            "dtype=torch.int8); exact = torch.equal(torch._int_mm(a, a.t().contiguous()).long(), "
            "a.long() @ a.long().t()); print(int(exact), int(f()))")
    for isa in ("AVX2", "AVX512_CORE"):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                           env={**__import__("os").environ, "ONEDNN_MAX_CPU_ISA": isa})
        assert r.returncode == 0, r.stderr
        exact, available = r.stdout.split()
        assert available == "0" or exact == "1", f"{isa}: the int8 matmul is inexact but was chosen"


@pytest.mark.parametrize("rows", [1, INT4_KERNEL_ROWS, INT4_KERNEL_ROWS + 1, 200])
def test_int4_linear_is_the_dequantized_layer(rows):
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 192)
    q = Int4Linear.from_weight(linear.weight, linear.bias, torch.float32)
    w = q.dequantized(torch.float32)  # (out, in)
    # round to nearest within each group: |error| <= scale / 2, plus the bf16 rounding of scale and zero
    scale, zero = (q.scales_zeros[..., i].float().t().repeat_interleave(INT4_GROUP, dim=1) for i in (0, 1))
    assert ((w - linear.weight).abs() <= scale / 2 + (zero.abs() + 8 * scale) * 2**-8).all()
    x = torch.randn(2, rows, 128)
    expected = F.linear(x.bfloat16().float(), w, linear.bias)  # the kernels multiply bf16 activations
    got = q(x)
    assert got.shape == (2, rows, 192) and got.dtype == torch.float32
    assert torch.allclose(got, expected, atol=2e-2, rtol=2e-2), (got - expected).abs().max()


def test_int4_prompt_rows_are_the_decode_kernel_row_by_row_on_cpus_without_int8_products():
    """Float32 prompt rows take lfm2vl's int4 kernel where the CPU has no int8 or bf16 matmul to widen
    into (AVX2 without VNNI): each row the same bits as that row decoded alone, whatever its
    neighbours; elsewhere the widened weight (the dequantized layer, to bf16 rounding)."""
    from lfm2vl import native
    from lfm2vl.quant import int4_prompt_kernel

    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 128)
    q = Int4Linear.from_weight(linear.weight, linear.bias, torch.float32)
    x = torch.randn(1, 37, 256)  # an odd count: the kernel's two-row tiles and a last row alone
    got = q(x, act="silu")
    alone = torch.cat([q(x[:, i : i + 1], act="silu") for i in range(x.shape[1])], 1)  # decode rows
    if int4_prompt_kernel() and native.library() is not None:
        assert torch.equal(got, alone)
        assert torch.equal(q(x[:, 5:9])[0], q(x)[0, 5:9])  # rows independent of the others
    expected = F.silu(F.linear(x, q.dequantized(torch.float32), linear.bias))
    assert torch.allclose(got, expected, atol=2e-2, rtol=2e-2), (got - expected).abs().max()


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("shape", [(1, 1, 256), (1, 37, 256), (37, 256)])  # a decode row, prompt rows, image rows
def test_a_gradient_flows_through_quantized_layers_to_their_input(kind, shape):
    """The kernels carry no gradient, so a backward through a frozen quantized layer (an adapter
    trained below it) takes the widened weight: the input's gradient is the dequantized weight's."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 128)
    cls = Int8Linear if kind == "int8" else Int4Linear
    q = cls.from_weight(linear.weight, linear.bias, torch.float32)
    w = q.qweight.float() * q.scale[:, None] if kind == "int8" else q.dequantized(torch.float32)
    x = torch.randn(*shape, requires_grad=True)
    q(x).sum().backward()
    assert x.grad is not None
    assert torch.allclose(x.grad, w.sum(0).expand(*shape), atol=1e-4, rtol=1e-4)


def test_int4_keeps_the_vision_tower_int8_and_unfit_shapes_int8():
    from lfm2vl.quant import layer_kind

    model = lfm2vl.load(quantize="int4").module
    kinds = {name: type(m).__name__ for name, m in model.named_modules()
             if type(m).__name__.endswith("Linear") and not name.endswith("patch_embedding")}  # KEEP: float
    assert all(k == "Int4Linear" for n, k in kinds.items() if n.startswith("language_model.")), kinds
    assert all(k == "Int8Linear" for n, k in kinds.items() if n.startswith(("vision_tower.", "multi_modal"))), kinds
    assert kinds["lm_head"] == "Int4Linear"  # a tied head: the one int4 table, which the embedding reads
    table = model.language_model.embed_tokens
    assert type(table).__name__ == "Int4TiedEmbedding" and table.head is model.lm_head
    assert not any(k.startswith("language_model.embed_tokens") for k in model.state_dict())
    ids = torch.tensor([[0, 5, 63, 64, 100, 1023]])  # rows from both nibbles of several blocks
    assert torch.equal(table(ids)[0].bfloat16(), model.lm_head.dequantized()[ids[0]])
    assert layer_kind("int4", "language_model.layers.0.conv.in_proj", 100, 128) == "int8"  # out % 64
    assert layer_kind("int4", "language_model.layers.0.conv.in_proj", 128, 48) == "int8"  # in % group


@pytest.mark.parametrize("scheme,min_agreement,max_kl", [("int8", 0.9, 0.05), ("int4", 0.75, 0.2)])
def test_quantized_bundled_model_agrees_with_fp32(scheme, min_agreement, max_kl):
    fp32, quantized = lfm2vl.load(), lfm2vl.load(quantize=scheme)
    cls = Int8Linear if scheme == "int8" else Int4Linear
    assert sum(isinstance(m, cls) for m in quantized.module.modules()) > 20
    ids = torch.tensor([fp32.processor.text_tokenizer.encode(
        "Return the number of items in a container. Raise an error when the key is missing.")])
    with torch.inference_mode():
        a = fp32.module(ids).float().log_softmax(-1)
        b = quantized.module(ids).float().log_softmax(-1)
    agreement = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    kl = (a.exp() * (a - b)).sum(-1).mean().item()
    assert agreement >= min_agreement and kl < max_kl, (agreement, kl)
    questions = [[{"role": "user", "content": [{"type": "image", "image": str(ROOT / f"examples/{name}.png")},
                                               {"type": "text", "text": q}]}]
                 for name in ("red_circle", "blue_triangle")
                 for q in ("what shape is in the image?", "what color is the shape?", "is there a circle?")]
    assert quantized.generate(questions) == fp32.generate(questions)
    with pytest.raises(ValueError, match="quantized model cannot be saved"):
        quantized.save_pretrained(ROOT / "never-written")
    with pytest.raises(ValueError, match="quantize='int3'"):
        lfm2vl.load(quantize="int3")


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantizing_while_loading_equals_quantizing_after(scheme):
    from lfm2vl.quant import quantize_model

    during = lfm2vl.load(quantize=scheme).module.state_dict()
    after = quantize_model(lfm2vl.load().module, scheme).state_dict()  # from the same fp32 weights
    assert during.keys() == after.keys() and any(k.endswith(".qweight") for k in during)
    for k in during:
        assert during[k].dtype == after[k].dtype and torch.equal(during[k], after[k]), k


@pytest.mark.parametrize("scheme,max_size", [("int8", 0.4), ("int4", 0.3)])
def test_a_quantized_checkpoint_loads_straight_into_place(tmp_path, scheme, max_size):
    import subprocess
    import sys

    out = tmp_path / scheme
    r = subprocess.run([sys.executable, "-m", "lfm2vl", "quantize", str(ROOT / "lfm2vl/assets/bundled_model"), str(out),
                        "--scheme", scheme], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    bundled = ROOT / "lfm2vl/assets/bundled_model/model.safetensors"
    assert (out / f"model.{scheme}.safetensors").stat().st_size < max_size * bundled.stat().st_size
    assert not (out / "model.safetensors").exists()  # transformers must refuse the folder, not load noise
    assert (out / "tokenizer.json").exists() and "quantization_config" in (out / "config.json").read_text()
    loaded = lfm2vl.load(out)
    assert loaded.quantization == scheme
    stored, during = loaded.module.state_dict(), lfm2vl.load(quantize=scheme).module.state_dict()
    assert stored.keys() == during.keys() and all(torch.equal(stored[k], during[k]) for k in stored)
    from lfm2vl.api import quantize_checkpoint

    with pytest.raises(ValueError, match="already quantized"):
        quantize_checkpoint(out, tmp_path / "again")
    assert not (tmp_path / "again").exists()  # a refusal leaves no folder behind
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ValueError, match="cannot create the output folder"):  # before any quantizing
        quantize_checkpoint(ROOT / "lfm2vl/assets/bundled_model", tmp_path / "a_file" / "out")
    # any compute dtype (float32 is the default on CPUs without native bf16): int4 scales stay bf16
    wide = lfm2vl.load(out, dtype="float32")
    conv = [{"role": "user", "content": [{"type": "image", "image": str(ROOT / "examples/red_circle.png")},
                                         {"type": "text", "text": "what shape is in the image?"}]}]
    assert wide.generate(conv) == "circle"
    if scheme == "int4":
        assert all(m.scales_zeros.dtype == torch.bfloat16 for m in wide.module.modules() if isinstance(m, Int4Linear))


def test_int8_prompt_rows_in_float16_do_not_overflow(int8_products):
    """The int32 sums (up to 127 * 127 * in) exceed float16's range: they are scaled in float32 first."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 128)
    q = Int8Linear.from_linear(linear, torch.float16)
    x = torch.randn(1, 10, 256)
    got = q(x.half()).float()
    expected = q.to(torch.float32)(x)
    assert torch.isfinite(got).all()
    assert torch.allclose(got, expected, atol=2e-2, rtol=1e-2), (got - expected).abs().max()


def test_quantize_refuses_folders_it_did_not_write_and_checks_the_source_first(tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from lfm2vl.api import quantize_checkpoint
    from lfm2vl.weights import CheckpointError

    bundled = ROOT / "lfm2vl/assets/bundled_model"
    other = tmp_path / "float"  # somebody's float checkpoint in the way: refused, and left as it was
    shutil.copytree(bundled, other)
    before = {p.name: p.read_bytes() for p in other.iterdir()}
    with pytest.raises(ValueError, match="not a checkpoint lfm2vl quantize wrote"):
        quantize_checkpoint(bundled, other)
    with pytest.raises(ValueError, match="not a checkpoint lfm2vl quantize wrote"):  # before any download
        quantize_checkpoint("LiquidAI/LFM2-VL-450M-not-downloaded", other)
    assert {p.name: p.read_bytes() for p in other.iterdir()} == before
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        quantize_checkpoint(bundled, tmp_path / "a-file")
    # an earlier output is replaced whole: int8, then int4 of a source without generation_config.json
    out = quantize_checkpoint(bundled, tmp_path / "q", "int8")
    src = tmp_path / "src"
    shutil.copytree(bundled, src)
    (src / "generation_config.json").unlink()
    quantize_checkpoint(src, out, "int4")
    assert [p.name for p in out.glob("*.safetensors")] == ["model.int4.safetensors"]
    assert not (out / "generation_config.json").exists()  # the int8 source's, not this one's
    assert lfm2vl.load(out).quantization == "int4"
    # weights that do not match the config: refused from the headers, before any folder is made
    tensors = load_file(str(src / "model.safetensors"))
    dropped = sorted(tensors)[0]
    save_file({k: v for k, v in tensors.items() if k != dropped}, str(src / "model.safetensors"))
    with pytest.raises(CheckpointError, match=f"1 missing: {dropped.removeprefix('model.')}"):
        quantize_checkpoint(src, tmp_path / "never", "int8")
    assert not (tmp_path / "never").exists()


def test_quantize_int4_says_how_many_layers_took_four_bits(tmp_path):
    import subprocess
    import sys

    import reference

    # hidden size 48: no layer's shape fits the int4 kernel (out % 64, in % 32), so all stay int8
    narrow = tmp_path / "narrow"
    reference.make_reference_checkpoint(narrow, text={"hidden_size": 48, "intermediate_size": 96})
    for src, fits in ((ROOT / "lfm2vl/assets/bundled_model", True), (narrow, False)):
        r = subprocess.run([sys.executable, "-m", "lfm2vl", "quantize", str(src), str(tmp_path / f"q-{fits}"),
                            "--scheme", "int4"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        int4 = int(r.stderr.split(" layers int4")[0].rsplit("; ", 1)[1])
        assert (int4 > 0) is fits and ("every layer is int8" in r.stderr) is not fits, r.stderr


def _pack_int4(q: torch.Tensor, block: int) -> torch.Tensor:
    """(n, k) 0..15 -> torch's CPU int4 packing with `block` rows per block, written out independently
    of torch: byte [b, kk, j] = row b*block + j (low nibble) | row b*block + block/2 + j (high nibble)."""
    n, k = q.shape
    b = q.to(torch.uint8).view(n // block, 2, block // 2, k).transpose(2, 3)  # (blocks, lo/hi, k, block/2)
    return (b[:, 0] | (b[:, 1] << 4)).reshape(n, k // 2)


@pytest.mark.skipif(int4_available() is not None, reason="this torch has no CPU int4 kernel")
def test_int4_packing_of_each_cpu_kind_reads_back_and_repacks():
    """AVX-512 kernels pack 64 output rows per block, AVX2 kernels 32 (checked on this CPU's packing;
    the other layout is written by hand)."""
    from lfm2vl.quant.int4 import INT4_BLOCKS, _unpack_nibbles, int4_block, repack_int4

    q = torch.randint(0, 16, (192, 96), dtype=torch.int32, generator=torch.Generator().manual_seed(1))
    here = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    assert torch.equal(here, _pack_int4(q, int4_block())), "the hand-written packing must be torch's on this CPU"
    for block in INT4_BLOCKS:
        packed = _pack_int4(q, block)
        assert torch.equal(_unpack_nibbles(packed, 192, 96, block).int(), q)
        assert torch.equal(repack_int4(packed, 192, 96, block), here)


@pytest.mark.skipif(int4_available() is not None, reason="this torch has no CPU int4 kernel")
def test_an_int4_checkpoint_written_on_another_kind_of_cpu_loads_repacked(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    from lfm2vl.api import quantize_checkpoint
    from lfm2vl.quant.int4 import INT4_BLOCKS, _unpack_nibbles, int4_block

    out = quantize_checkpoint(ROOT / "lfm2vl/assets/bundled_model", tmp_path / "int4", "int4")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["block_rows"] == int4_block()
    other = next(b for b in INT4_BLOCKS if b != int4_block())  # rewrite it as the other kind of CPU would have
    tensors = load_file(out / "model.int4.safetensors")
    for key, t in tensors.items():
        if key.endswith(".qweight") and t.dtype == torch.uint8:
            n, k = t.shape[0], t.shape[1] * 2
            tensors[key] = _pack_int4(_unpack_nibbles(t, n, k, int4_block()).int(), other)
    save_file(tensors, out / "model.int4.safetensors")
    config["quantization_config"]["block_rows"] = other
    (out / "config.json").write_text(json.dumps(config))
    stored, during = lfm2vl.load(out).module.state_dict(), lfm2vl.load(quantize="int4").module.state_dict()
    assert all(torch.equal(stored[k], during[k]) for k in during)
    config["quantization_config"]["block_rows"] = 48
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match="block_rows 48"):
        lfm2vl.load(out)


def test_a_quantized_model_moved_or_cast_still_shares_its_table():
    model = lfm2vl.load(quantize="int8")
    model.to(dtype="float32")
    head, table = model.module.lm_head, model.module.language_model.embed_tokens
    assert head.qweight is table.qweight and head.scale is table.scale and table.scale.dtype == torch.float32
    conv = [{"role": "user", "content": [{"type": "image", "image": str(ROOT / "examples/red_circle.png")},
                                         {"type": "text", "text": "what shape is in the image?"}]}]
    assert model.generate(conv) == "circle"


def test_one_query_attention_is_sdpa():
    from lfm2vl.model.text import one_query_attention

    torch.manual_seed(0)
    q, k, v = torch.randn(3, 8, 1, 32), torch.randn(3, 2, 50, 32), torch.randn(3, 2, 50, 32)
    mask = torch.arange(50)[None, :] < torch.tensor([50, 20, 1])[:, None]  # rows of different lengths
    mask = mask[:, None, None, :]  # (B, 1, 1, S)
    for m in (None, mask):
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True)
        kt = k.transpose(-1, -2)  # the cache's K^T layout
        assert torch.allclose(one_query_attention(q, kt, v, m), expected, atol=1e-5)
        got = one_query_attention(q.bfloat16(), kt.bfloat16(), v.bfloat16(), m).float()
        assert torch.allclose(got, expected, atol=3e-2), (got - expected).abs().max()
        # a bf16 query over the CPU's float32 cache of bf16 values: bf16 out, closer than all-bf16
        wide = one_query_attention(q.bfloat16(), kt.bfloat16().float(), v.bfloat16().float(), m)
        assert wide.dtype == torch.bfloat16
        assert (wide.float() - expected).abs().max() <= (got - expected).abs().max()


def test_cpu_half_precision_cache_keeps_float32_kv_of_the_same_values():
    """A bf16 model's cache on the CPU holds K/V in float32 (a bf16 CPU matmul JITs a kernel for every
    new number of keys: lfm2vl.py); writes keep the bf16 values exactly, a prefix reads out in bf16."""
    model = lfm2vl.load(dtype="bfloat16")
    net = model.module
    cache = net.make_cache(2, 16)
    assert cache.dtype == torch.bfloat16 and cache.kv_dtype == torch.float32
    assert all(t.dtype == torch.float32 for t in [*cache.kt.values(), *cache.v.values()])
    assert all(t.dtype == torch.bfloat16 for t in cache.conv.values())
    ids = torch.randint(0, net.cfg.text.vocab_size, (1, 9))
    with torch.inference_mode():
        net.forward(ids, cache=cache.view([1], 9), logits_to_keep=1)
    state = cache.read_prefix(1, 9)
    layer = net.cfg.text.attention_layers[0]
    assert state.k[layer].dtype == torch.bfloat16 and state.k[layer].shape[1] == 9
    assert torch.equal(state.k[layer].float(), cache.kt[layer][1, :, :, :9].transpose(-1, -2))
    assert torch.equal(state.v[layer].float(), cache.v[layer][1, :, :9])
    cache.write_prefix(0, state, 9, state.conv)  # round trip into another slot
    assert torch.equal(cache.kt[layer][0, :, :, :9], cache.kt[layer][1, :, :, :9])
    assert net.to(torch.float32).make_cache(1, 4).kv_dtype == torch.float32  # fp32: one dtype


def test_bfloat16_decoding_follows_its_own_full_forward():
    """Decode (one query per step: the one-query attention and the conv tap) against one forward over
    the whole sequence (SDPA and conv1d), in bf16: each greedy token is that forward's argmax."""
    model = lfm2vl.load(dtype="bfloat16")
    conv = [{"role": "user", "content": "Return the number of items in a container."}]
    out = model.complete([conv], max_new_tokens=12, min_new_tokens=12, ignore_eos=True)[0]
    prompt = model.request(conv).ids
    ids = torch.tensor([prompt + out.token_ids])
    with torch.inference_mode():
        logits = model.module(ids)[0, len(prompt) - 1 : -1].float()  # (12, V): the prediction of each new token
    top2 = logits.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.1  # near-ties may flip in bf16 either way
    assert clear.sum() >= 8
    assert torch.equal(logits.argmax(-1)[clear], torch.tensor(out.token_ids)[clear])


def test_one_query_attention_scores_a_half_precision_cache_in_float32():
    """A GPU keeps K/V in bf16: the q.k scores are float32 products (as SDPA's kernels keep them), not
    rounded to bf16, which moves large scores by tenths and the softmax by percents."""
    from lfm2vl.model.text import one_query_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 8, 1, 64) * 4).bfloat16(), (torch.randn(2, 2, 300, 64) * 4).bfloat16(), \
        torch.randn(2, 2, 300, 64).bfloat16()
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), enable_gqa=True)  # scores ~ +-16
    got = one_query_attention(q, k.transpose(-1, -2), v, None).float()
    rounded = torch.matmul(q.reshape(2, 2, 4, 64) * 0.125, k.transpose(-1, -2)).float().softmax(-1)  # bf16 scores
    old = torch.matmul(rounded.bfloat16(), v).reshape(2, 8, 1, 64).float()
    assert (got - expected).abs().max() < 0.5 * (old - expected).abs().max()
    assert torch.allclose(got, expected, atol=2e-2), (got - expected).abs().max()


def test_a_failed_quantize_leaves_nothing_behind(tmp_path, monkeypatch):
    import lfm2vl.api as api

    def full_disk(*_args):
        (tmp_path / "out/deeper/model.int8.safetensors.tmp").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(api, "write_quantized", full_disk)
    with pytest.raises(OSError, match="No space"):
        api.quantize_checkpoint(ROOT / "lfm2vl/assets/bundled_model", tmp_path / "out" / "deeper")
    assert list(tmp_path.iterdir()) == []  # the folders it made, and what was in them
