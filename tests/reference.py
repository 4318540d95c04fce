"""Test-only access to the reference (transformers) and tiny checkpoints saved in its format.

transformers' LFM2-VL image processor imports torchvision. Beside the CPU torch wheel the
torchvision wheel's compiled ops fail to register unless their schemas already exist, so we
declare the two it checks for before the import (the processor only uses pure-torch resize code).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

_TV_LIB = None


def _declare_torchvision_ops() -> None:
    global _TV_LIB
    if _TV_LIB is not None:
        return
    try:
        torch.ops.torchvision.nms  # already registered (a matching torchvision build)
        return
    except (AttributeError, RuntimeError):
        pass
    _TV_LIB = torch.library.Library("torchvision", "DEF")
    _TV_LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _TV_LIB.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


@functools.cache
def transformers():
    """Import transformers (and torchvision) the way the tests need it."""
    _declare_torchvision_ops()
    import torchvision  # noqa: F401
    import transformers as tf

    tf.logging.set_verbosity_error()
    return tf


CORPUS = [
    "What is in this image? Describe the picture in detail. The cat sits on a red sofa.",
    "Hello! How are you today? I am fine, thank you. Numbers: 0 1 2 3 42 1000.",
    "A photo of two dogs playing in the snow near a small wooden house.",
    "Unicode: café, naïve, 東京, emoji 🙂 and more text to learn merges from.",
] * 4

TINY_TEXT = dict(
    vocab_size=512, hidden_size=64, intermediate_size=192, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
    layer_types=["conv", "full_attention", "conv", "full_attention"],
    norm_eps=1e-5, conv_L_cache=3, block_multiple_of=32, block_ffn_dim_multiplier=1.0,
    block_auto_adjust_ff_dim=True, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    pad_token_id=0, bos_token_id=1, eos_token_id=7,
)
TINY_VISION = dict(
    hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_channels=3, patch_size=16, num_patches=64, layer_norm_eps=1e-6,
    hidden_act="gelu_pytorch_tanh", vision_use_head=False,
)


@functools.cache
def tokenizer():
    from lfm2vl.train.tokenizer import build_tokenizer

    return build_tokenizer(CORPUS, vocab_size=1024)


def make_reference_checkpoint(
    folder: str | Path,
    *,
    text: dict | None = None,
    vision: dict | None = None,
    projector_use_layernorm: bool = True,
    projector_hidden_size: int = 80,
    image_processor: dict | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
):
    """Save a tiny random LFM2-VL with transformers' own save_pretrained (model + processor).

    Returns the reference model (eval mode, eager attention) for comparisons.
    """
    tf = transformers()
    from lfm2vl.train.tokenizer import CHAT_TEMPLATE, save_tokenizer_files

    folder = Path(folder)
    tok = tokenizer()
    text_cfg = {**TINY_TEXT, **(text or {})}
    text_cfg["vocab_size"] = max(text_cfg["vocab_size"], tok.get_vocab_size())
    config = tf.Lfm2VlConfig(
        text_config=tf.Lfm2Config(**text_cfg),
        vision_config=tf.Siglip2VisionConfig(**{**TINY_VISION, **(vision or {})}),
        projector_hidden_size=projector_hidden_size,
        projector_use_layernorm=projector_use_layernorm,
        image_token_id=tok.token_to_id("<image>"),
    )
    torch.manual_seed(seed)
    model = tf.Lfm2VlForConditionalGeneration(config).eval()
    with torch.no_grad():  # the default init leaves norms at 1 and biases at 0: randomise them
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model = model.to(dtype)
    model.save_pretrained(folder)
    save_tokenizer_files(tok, folder)
    fast_tok = tf.PreTrainedTokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"),
        bos_token="<|startoftext|>", eos_token="<|im_end|>", pad_token="<|pad|>", padding_side="left",
    )
    ip = tf.Lfm2VlImageProcessor(**(image_processor or {}))
    processor = tf.Lfm2VlProcessor(image_processor=ip, tokenizer=fast_tok, chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(folder)
    model.config._attn_implementation = "eager"
    model.set_attn_implementation("eager")
    return model


def load_reference_processor(folder: str | Path):
    return transformers().AutoProcessor.from_pretrained(str(folder))
