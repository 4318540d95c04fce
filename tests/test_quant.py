"""int8 weights (lfm2vl/quant.py): both kernels compute the dequantized layer; the quantized bundled
model agrees with fp32 teacher-forced and answers easy-VQA questions the same; what cannot work says so."""

import pytest
import torch
import torch.nn.functional as F

import lfm2vl
from lfm2vl.quant import SMALL_ROWS, Int8Linear

ROOT = __import__("pathlib").Path(__file__).parent.parent


@pytest.mark.parametrize("rows", [1, SMALL_ROWS, SMALL_ROWS + 1, 200])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_is_the_dequantized_layer(rows, dtype):
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 160)
    q = Int8Linear.from_linear(linear, dtype)
    x = torch.randn(2, rows, 96)
    dequantized = q.qweight.float() * q.scale.float()[:, None]
    expected = F.linear(x, dequantized, linear.bias)
    got = q(x).float()
    assert got.shape == (2, rows, 160)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert torch.allclose(got, expected, atol=tol, rtol=tol), (got - expected).abs().max()
    if dtype == torch.float32:  # round to nearest (bf16 scales are themselves rounded)
        assert ((dequantized - linear.weight).abs() <= q.scale[:, None] / 2 + 1e-7).all()


def test_quantized_bundled_model_agrees_with_fp32():
    fp32, int8 = lfm2vl.load(), lfm2vl.load(quantize="int8")
    assert sum(isinstance(m, Int8Linear) for m in int8.module.modules()) > 30
    ids = torch.tensor([fp32.processor.text_tokenizer.encode(
        "Return the number of items in a container. Raise an error when the key is missing.")])
    with torch.inference_mode():
        a = fp32.module(ids).float().log_softmax(-1)
        b = int8.module(ids).float().log_softmax(-1)
    agreement = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    kl = (a.exp() * (a - b)).sum(-1).mean().item()
    assert agreement >= 0.9 and kl < 0.05, (agreement, kl)
    questions = [[{"role": "user", "content": [{"type": "image", "image": str(ROOT / f"examples/{name}.png")},
                                               {"type": "text", "text": q}]}]
                 for name in ("red_circle", "blue_triangle")
                 for q in ("what shape is in the image?", "what color is the shape?", "is there a circle?")]
    assert int8.generate(questions) == fp32.generate(questions)
    with pytest.raises(ValueError, match="quantized model cannot be saved"):
        int8.save_pretrained(ROOT / "never-written")
    with pytest.raises(ValueError, match="quantize='int3'"):
        lfm2vl.load(quantize="int3")


def test_quantizing_while_loading_equals_quantizing_after():
    from lfm2vl.quant import quantize_model

    during = lfm2vl.load(quantize="int8").module.state_dict()
    after = quantize_model(lfm2vl.load().module).state_dict()  # from the same fp32 weights
    assert during.keys() == after.keys() and any(k.endswith(".qweight") for k in during)
    for k in during:
        assert during[k].dtype == after[k].dtype and torch.equal(during[k], after[k]), k


def test_an_int8_checkpoint_loads_straight_into_place(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "q8"
    r = subprocess.run([sys.executable, "-m", "lfm2vl", "quantize", str(ROOT / "lfm2vl/assets/bundled_model"), str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    bundled = ROOT / "lfm2vl/assets/bundled_model/model.safetensors"
    assert (out / "model.int8.safetensors").stat().st_size < 0.4 * bundled.stat().st_size
    assert not (out / "model.safetensors").exists()  # transformers must refuse the folder, not load noise
    assert (out / "tokenizer.json").exists() and "quantization_config" in (out / "config.json").read_text()
    stored, during = lfm2vl.load(out).module.state_dict(), lfm2vl.load(quantize="int8").module.state_dict()
    assert stored.keys() == during.keys() and all(torch.equal(stored[k], during[k]) for k in stored)
    from lfm2vl.api import quantize_checkpoint

    with pytest.raises(ValueError, match="already quantized"):
        quantize_checkpoint(out, tmp_path / "again")


def test_a_quantized_model_moved_or_cast_still_shares_its_table():
    model = lfm2vl.load(quantize="int8")
    model.to(dtype="float32")
    head, table = model.module.lm_head, model.module.language_model.embed_tokens
    assert head.qweight is table.qweight and head.scale is table.scale and table.scale.dtype == torch.float32
    conv = [{"role": "user", "content": [{"type": "image", "image": str(ROOT / "examples/red_circle.png")},
                                         {"type": "text", "text": "what shape is in the image?"}]}]
    assert model.generate(conv) == "circle"
