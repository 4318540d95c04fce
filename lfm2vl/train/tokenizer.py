"""Build a small byte-level BPE tokenizer that carries the LFM2 special tokens at their real ids.

The released LFM2 tokenizer (65,536 entries) cannot be downloaded here, so tests and the bundled
model use one built with `tokenizers`: ids 0..499 hold the LFM2 control and image tokens exactly
where the real vocabulary has them (docs/architecture.md §8), ordinary BPE entries follow. Everything downstream
resolves special ids through the tokenizer, so a smaller vocabulary changes nothing but its size.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

# The LFM2 chat template (ChatML; images become "<image>" in list order; bos from the template).
CHAT_TEMPLATE = (
    "{{- bos_token -}}\n"
    "{%- for message in messages -%}\n"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}\n"
    "{%- if message['content'] is string -%}\n"
    "{{- message['content'] -}}\n"
    "{%- else -%}\n"
    "{%- for item in message['content'] -%}\n"
    "{%- if item['type'] == 'image' -%}{{- '<image>' -}}\n"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}{%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- endif -%}\n"
    "{{- '<|im_end|>\\n' -}}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}\n"
)

_NAMED = {
    0: "<|pad|>",
    1: "<|startoftext|>",
    2: "<|endoftext|>",
    3: "<|fim_pre|>",
    4: "<|fim_mid|>",
    5: "<|fim_suf|>",
    6: "<|im_start|>",
    7: "<|im_end|>",
    396: "<image>",
    497: "<|img_thumbnail|>",
    498: "<|image_start|>",
    499: "<|image_end|>",
}


def lfm2_special_tokens() -> list[str]:
    """The 500 reserved LFM2 tokens in id order (row/col markers at 397 + (r-1)*10 + (c-1))."""
    tokens = []
    for i in range(500):
        if i in _NAMED:
            tokens.append(_NAMED[i])
        elif 397 <= i <= 496:
            r, c = divmod(i - 397, 10)
            tokens.append(f"<|img_row_{r + 1}_col_{c + 1}|>")
        else:
            tokens.append(f"<|reserved_{i}|>")
    return tokens


def build_tokenizer(corpus: Iterable[str], vocab_size: int = 1024) -> Tokenizer:
    """Train a byte-level BPE on `corpus`; ids 0..499 are the LFM2 special tokens."""
    specials = lfm2_special_tokens()
    if vocab_size < len(specials) + 256:
        raise ValueError(f"vocab_size must be at least {len(specials) + 256} (specials + byte alphabet)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    for i, t in enumerate(specials):  # the trainer must have kept the reserved ids in place
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t), i)
    return tok


def save_tokenizer_files(tok: Tokenizer, folder: str | Path, chat_template: str = CHAT_TEMPLATE) -> None:
    """Write tokenizer.json, tokenizer_config.json and chat_template.jinja as the Hub repos have them."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|startoftext|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|pad|>",
        "padding_side": "left",
        "model_max_length": 128000,
        "legacy": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "chat_template.jinja").write_text(chat_template)
