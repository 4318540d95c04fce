"""`Processor`: chat messages / text + images -> the model's input tensors, and ids -> text.

Mirrors transformers' `Lfm2VlProcessor` (`models/lfm2_vl/processing_lfm2_vl.py`): every `<image>`
placeholder of the text becomes `TilePlan.placeholder()`, the text is tokenized without added
special tokens, batches are padded on the tokenizer's side (left), and all crops of all images of
the batch form one vision batch. Output keys, shapes and dtypes are the reference's: input_ids and
attention_mask (B, T) int64, pixel_values (N, P, 768) float32, pixel_attention_mask (N, P) int32,
spatial_shapes (N, 2) int64; `packed=True` gives pixel_values (sum of patches, 768) without padding
and no pixel_attention_mask.

One deliberate difference (transformers#47217): in `apply_chat_template(..., tokenize=True)` a
literal "<image>" typed by the user stays text; only image parts become image slots.
In `processor(text=...)` the text is the prompt, and "<image>" in it is the placeholder.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from .chat import ChatPrompt, check_conversation, load_chat_template, render
from .image import load_image, make_crops
from .patches import crops_to_packed, crops_to_padded
from .prompt import Prompt, PromptImage
from .settings import ImageSettings
from .tiling import TilePlan, plan_tiles
from .tokens import MARK_START, TextTokenizer


class Processor:
    """Tokenizer + image settings + chat template of one checkpoint."""

    def __init__(self, tokenizer: TextTokenizer, settings: ImageSettings, chat_template: str | None = None):
        self.text_tokenizer = tokenizer
        self.settings = settings
        self.chat_template = chat_template

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> Processor:
        """Read tokenizer.json, tokenizer_config.json, the chat template and the image settings."""
        folder = Path(folder)
        return cls(TextTokenizer.from_pretrained(folder), ImageSettings.from_pretrained(folder),
                   load_chat_template(folder))

    def __repr__(self) -> str:
        return f"Processor(vocab={self.tokenizer.get_vocab_size()}, settings={self.settings})"

    # -- tokens ---------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Tokenizer:
        return self.text_tokenizer.tokenizer

    @property
    def image_token(self) -> str:
        return self.text_tokenizer.image_token

    @property
    def image_token_id(self) -> int:
        return self.text_tokenizer.image_token_id

    @property
    def bos_token_id(self) -> int | None:
        return self.text_tokenizer.bos_token_id

    @property
    def eos_token_id(self) -> int | None:
        return self.text_tokenizer.eos_token_id

    @property
    def pad_token_id(self) -> int | None:
        return self.text_tokenizer.pad_token_id

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (special-token strings in it are recognised; nothing is added)."""
        return self.text_tokenizer.encode(text)

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        return self.text_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    # -- images without pixels ------------------------------------------------------------------
    def plan(self, width: int, height: int, **image_settings: Any) -> TilePlan:
        """The tiling plan of a width x height image under the checkpoint's settings and overrides."""
        return plan_tiles(width, height, self.settings.with_overrides(**image_settings))

    def count_image_tokens(self, width: int, height: int, **image_settings: Any) -> int:
        """<image> tokens (= image features) for a width x height image; markers not included."""
        return self.plan(width, height, **image_settings).image_tokens

    # -- chat -----------------------------------------------------------------------------------
    def apply_chat_template(
        self,
        messages: Any,
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        *,
        sanitize_control_tokens: bool = False,
        template_kwargs: dict[str, Any] | None = None,
        packed: bool = False,
        **image_settings: Any,
    ) -> str | list[str] | dict[str, torch.Tensor]:
        """Render messages (one conversation, or a list of them) with the checkpoint's template.

        tokenize=False: the prompt text, as the reference renders it. tokenize=True: the model
        inputs of `__call__`, with the images taken from the image parts. There, a literal "<image>"
        in user text is encoded as text; with sanitize_control_tokens=True every control token the
        user typed (`<|im_end|>`, ...) is, as transformers' option of the same name does.
        """
        if self.chat_template is None:
            raise ValueError("this checkpoint ships no chat template (chat_template.jinja or tokenizer_config.json)")
        batched = isinstance(messages, (list, tuple)) and bool(messages) and isinstance(messages[0], (list, tuple))
        protected = (self.image_token,)
        if sanitize_control_tokens:
            protected = tuple(dict.fromkeys((*self.text_tokenizer.special_tokens, *self._template_tokens(), self.image_token)))
        prompts = [
            render(conv, self.chat_template, self.text_tokenizer.special_tokens_map(), add_generation_prompt,
                   protected, **(template_kwargs or {}))
            for conv in (messages if batched else [messages])
        ]
        if not tokenize:
            texts = [p.text for p in prompts]
            return texts if batched else texts[0]
        return self._chat_inputs(prompts, packed, image_settings)

    def prompt(self, conversation: Any, *, sanitize_control_tokens: bool = False, **image_settings: Any) -> Prompt:
        """One conversation (with the generation prompt) -> `Prompt` (ids + lazily processed images).

        The ids are exactly those of `apply_chat_template(..., tokenize=True)`; pixels are made only
        when the engine needs them.
        """
        if self.chat_template is None:
            raise ValueError("this checkpoint ships no chat template (chat_template.jinja or tokenizer_config.json)")
        check_conversation(conversation)
        protected = (self.image_token,)
        if sanitize_control_tokens:
            protected = tuple(dict.fromkeys((*self.text_tokenizer.special_tokens, *self._template_tokens(), self.image_token)))
        chat = render(conversation, self.chat_template, self.text_tokenizer.special_tokens_map(), True, protected)
        if any(source is None for source in chat.images):
            raise ValueError("an image part has no image/url/path/base64 source")
        return self._prompt(chat.marked, list(chat.images), True, image_settings)

    def text_prompt(self, text: str, images: Any = None, **image_settings: Any) -> Prompt:
        """A raw prompt (one "<image>" per image, as in `__call__`) -> `Prompt` for the engine."""
        return self._prompt(text, _group_images(images, [self._count_slots(text, marked=False)])[0], False,
                            image_settings)

    def _prompt(self, text: str, sources: list[Any], marked: bool, image_settings: dict) -> Prompt:
        settings = self.settings.with_overrides(**image_settings)
        if self._count_slots(text, marked) != len(sources):
            raise ValueError(
                f"the prompt has {self._count_slots(text, marked)} {self.image_token} placeholders but "
                f"{len(sources)} images were given: pass exactly one image per placeholder, in order"
            )
        loaded = [load_image(src, settings.max_image_pixels) for src in sources]
        plans = [plan_tiles(int(im.shape[2]), int(im.shape[1]), settings) for im in loaded]
        expanded = self._expand(text, plans, settings, marked)
        ids = self.text_tokenizer.encode_marked(expanded) if marked else self.text_tokenizer.encode(expanded)
        images = [PromptImage(im, plan, settings) for im, plan in zip(loaded, plans, strict=True)]
        return Prompt(ids, images, self.image_token_id)

    def _template_tokens(self) -> list[str]:
        # Non-special added tokens written by the template itself are control tokens too (as upstream).
        return [t for t in self.text_tokenizer.added_tokens if t in (self.chat_template or "") and not t.isspace()]

    def _chat_inputs(self, prompts: list[ChatPrompt], packed: bool, image_settings: dict) -> dict[str, torch.Tensor]:
        for prompt in prompts:
            if any(source is None for source in prompt.images):
                raise ValueError("an image part has no image/url/path/base64 source; tokenize=True needs the images")
        images = [list(p.images) for p in prompts]
        return self._process([p.marked for p in prompts], images, True, packed, image_settings)

    # -- text + images --------------------------------------------------------------------------
    def __call__(
        self,
        text: str | list[str] | None = None,
        images: Any = None,
        *,
        packed: bool = False,
        return_tensors: str | None = "pt",
        padding: bool | str = True,
        **image_settings: Any,
    ) -> dict[str, torch.Tensor]:
        """Prompt text(s) with one "<image>" per image -> model inputs (see the module docstring).

        `return_tensors="pt"` and `padding=True` are accepted so reference-style calls work
        unchanged; outputs are always torch tensors, batches always padded (to the longest).
        """
        if return_tensors not in ("pt", None):
            raise ValueError(f"return_tensors={return_tensors!r}: only PyTorch tensors ('pt') are returned")
        if padding not in (True, "longest"):
            raise ValueError(f"padding={padding!r}: batches are always padded to the longest prompt")
        if text is None:
            raise ValueError("text is required: a prompt with one <image> placeholder per image")
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise TypeError("text must be a string or a non-empty list of strings")
        per_sample = _group_images(images, [self._count_slots(t, marked=False) for t in texts])
        return self._process(texts, per_sample, False, packed, image_settings)

    def _count_slots(self, text: str, marked: bool) -> int:
        return len(self._slot_re(marked).findall(text))

    def _slot_re(self, marked: bool) -> re.Pattern:
        # Marked text (chat path): an <image> right after a marker is user text, not a slot.
        return re.compile((f"(?<!{MARK_START})" if marked else "") + re.escape(self.image_token))

    def _process(
        self, texts: list[str], images: list[list[Any]], marked: bool, packed: bool, image_settings: dict
    ) -> dict[str, torch.Tensor]:
        settings = self.settings.with_overrides(**image_settings)
        slots = [self._count_slots(t, marked) for t in texts]
        if slots != [len(x) for x in images]:
            raise ValueError(
                f"the prompt has {slots} {self.image_token} placeholders per sample but {[len(x) for x in images]} "
                "images were given: pass exactly one image per placeholder, in order"
            )
        loaded = [[load_image(src, settings.max_image_pixels) for src in sample] for sample in images]
        plans = [[plan_tiles(int(im.shape[2]), int(im.shape[1]), settings) for im in sample] for sample in loaded]
        expanded = [self._expand(t, p, settings, marked) for t, p in zip(texts, plans, strict=True)]
        encode = self.text_tokenizer.encode_marked if marked else self.text_tokenizer.encode
        out = self._pad([encode(t) for t in expanded])
        pairs = [(im, plan) for ims, ps in zip(loaded, plans, strict=True) for im, plan in zip(ims, ps, strict=True)]
        crops = [crop for im, plan in pairs for crop in make_crops(im, plan, settings.resample)]  # batch order
        if crops and packed:
            out["pixel_values"], out["spatial_shapes"] = crops_to_packed(crops, settings)
        elif crops:
            values, mask, shapes = crops_to_padded(crops, settings)
            out.update(pixel_values=values, pixel_attention_mask=mask, spatial_shapes=shapes)
        return out

    def _expand(self, text: str, plans: list[TilePlan], s: ImageSettings, marked: bool) -> str:
        for plan in plans:
            for marker in plan.markers(s.use_image_special_tokens):
                self.text_tokenizer.token_id(marker)  # a layout the vocabulary cannot express is an error, not text
        it = iter(plans)
        return self._slot_re(marked).sub(
            lambda _: next(it).placeholder(s.use_image_special_tokens, self.image_token), text
        )

    def _pad(self, ids: list[list[int]]) -> dict[str, torch.Tensor]:
        length = max(len(x) for x in ids)
        pad = self.pad_token_id
        if pad is None and any(len(x) != length for x in ids):
            raise ValueError("texts of different lengths need a pad token, and tokenizer_config.json names none")
        input_ids = torch.full((len(ids), length), pad or 0, dtype=torch.int64)  # (B, T)
        attention_mask = torch.zeros(len(ids), length, dtype=torch.int64)  # (B, T)
        for i, x in enumerate(ids):
            span = slice(length - len(x), length) if self.text_tokenizer.padding_side == "left" else slice(0, len(x))
            input_ids[i, span] = torch.tensor(x, dtype=torch.int64)
            attention_mask[i, span] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}


def _group_images(images: Any, slots: list[int]) -> list[list[Any]]:
    """Images as one list per text: None, one image, a flat list (split by placeholder counts) or nested."""
    if images is None:
        return [[] for _ in slots]
    if not isinstance(images, (list, tuple)):
        images = [images]
    images = list(images)
    if images and all(isinstance(x, (list, tuple)) for x in images):
        if len(images) != len(slots):
            raise ValueError(f"got image lists for {len(images)} samples but {len(slots)} texts")
        return [list(x) for x in images]
    if len(slots) == 1:
        return [images]
    if len(images) != sum(slots):
        raise ValueError(
            f"the texts hold {sum(slots)} <image> placeholders in all but {len(images)} images were given"
        )
    grouped, start = [], 0
    for n in slots:
        grouped.append(images[start:start + n])
        start += n
    return grouped
