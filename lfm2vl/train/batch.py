"""Records -> token ids + labels (loss on assistant turns only) + packed image patches; and collate.

A conversation is rendered and tokenized by the checkpoint's own chat template through the
processor (`apply_chat_template(..., tokenize=True, packed=True)`), so training sees exactly the
tokens inference sees. Labels are then derived from the token ids, not from character offsets:
every `<|im_start|>ROLE\\n ... <|im_end|>` span whose ROLE is `assistant` is a target, its closing
`<|im_end|>` included (so the model learns to stop); the role header, system / user turns, image
tokens and padding are -100. (docs/architecture.md §9: the cookbook's collate masks only padding.)

Labels are aligned with `input_ids` (Hugging Face convention): the loss predicts labels[t + 1]
from position t. A batch concatenates the crops of all its images, in token order, as the packed
(N_real, 768) patches the vision encoder runs on.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from .data import DataError, Record

IGNORE = -100
IM_START, IM_END = "<|im_start|>", "<|im_end|>"


@dataclass(frozen=True)
class Example:
    input_ids: torch.Tensor  # (T,) int64
    labels: torch.Tensor  # (T,) int64, IGNORE where no loss
    pixel_values: torch.Tensor | None  # (N_real, 768) packed patches of all crops, or None
    spatial_shapes: torch.Tensor | None  # (N_crops, 2) int64 patch grid of each crop
    where: str  # the record's file:line, for errors


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T) 1 = real token
    labels: torch.Tensor  # (B, T)
    pixel_values: torch.Tensor | None  # (N_real, 768)
    spatial_shapes: torch.Tensor | None  # (N_crops, 2), always on the CPU (no device sync)

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def n_targets(self) -> int:
        """Positions that carry a loss (labels shifted by one, as the loss uses them)."""
        return int((self.labels[:, 1:] != IGNORE).sum())

    def to(self, device: torch.device | str) -> Batch:
        pv = None if self.pixel_values is None else self.pixel_values.to(device, non_blocking=True)
        return replace(self, input_ids=self.input_ids.to(device), attention_mask=self.attention_mask.to(device),
                       labels=self.labels.to(device), pixel_values=pv)


def assistant_labels(ids: list[int], processor: Any) -> list[int]:
    """Labels for one tokenized conversation: the ids inside assistant turns, IGNORE elsewhere.

    The role is read by decoding the tokens after each `<|im_start|>` up to the first newline, so
    any tokenizer works, whatever pieces it splits "assistant\\n" into. A turn without its
    `<|im_end|>` (cut by truncation) is a target up to the end.
    """
    tok = processor.text_tokenizer
    start, end = tok.optional_id(IM_START), tok.optional_id(IM_END)
    if start is None or end is None:
        raise ValueError(f"assistant-only labels need a ChatML template: the tokenizer lacks {IM_START} / {IM_END}")
    labels = [IGNORE] * len(ids)
    i = 0
    while i < len(ids):
        if ids[i] != start:
            i += 1
            continue
        j, header = i + 1, ""
        while j < len(ids) and "\n" not in header and ids[j] not in (start, end):
            header += processor.decode([ids[j]], skip_special_tokens=False)
            j += 1
        k = j
        while k < len(ids) and ids[k] not in (start, end):
            k += 1
        if header.split("\n", 1)[0].strip() == "assistant":
            stop = k + 1 if k < len(ids) and ids[k] == end else k  # the closing <|im_end|> is a target
            labels[j:stop] = ids[j:stop]
        i = k
    image_id = processor.image_token_id
    return [IGNORE if t == image_id else lab for t, lab in zip(ids, labels)]


def encode(processor: Any, record: Record, max_length: int) -> Example:
    """One record -> Example; a record longer than `max_length` is cut, unless the cut splits an image."""
    if record.messages is not None:
        out = processor.apply_chat_template(record.messages, add_generation_prompt=False, tokenize=True, packed=True)
        ids = out["input_ids"][0].tolist()
        labels = assistant_labels(ids, processor)
        pixel_values, shapes = out.get("pixel_values"), out.get("spatial_shapes")
    else:
        bos = processor.bos_token_id
        ids = ([] if bos is None else [bos]) + processor.text_tokenizer.encode_as_text(record.text)
        labels = [IGNORE] + ids[1:]  # plain text: every token after the first is a target
        pixel_values = shapes = None
    if len(ids) > max_length:
        image_id = processor.image_token_id
        if image_id in ids[max_length:]:
            raise DataError(
                f"{record.where}: {len(ids)} tokens, more than max_length={max_length}, and cutting would split an "
                "image: raise max_length, or lower the image budget (max_image_tokens) in processor_config.json"
            )
        ids, labels = ids[:max_length], labels[:max_length]
    return Example(torch.tensor(ids, dtype=torch.int64), torch.tensor(labels, dtype=torch.int64),
                   pixel_values, shapes, record.where)


def collate(examples: list[Example], pad_id: int, padding_side: str = "right") -> Batch:
    """Pad to the longest example (pad ids, attention 0, labels IGNORE) and concatenate all crops."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    length = max(len(e.input_ids) for e in examples)
    b = len(examples)
    input_ids = torch.full((b, length), pad_id, dtype=torch.int64)  # (B, T)
    attention_mask = torch.zeros(b, length, dtype=torch.int64)  # (B, T)
    labels = torch.full((b, length), IGNORE, dtype=torch.int64)  # (B, T)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        span = slice(0, n) if padding_side == "right" else slice(length - n, length)
        input_ids[i, span], labels[i, span], attention_mask[i, span] = e.input_ids, e.labels, 1
    with_images = [e for e in examples if e.pixel_values is not None]
    pixel_values = torch.cat([e.pixel_values for e in with_images]) if with_images else None  # (N_real, 768)
    shapes = torch.cat([e.spatial_shapes for e in with_images]) if with_images else None  # (N_crops, 2)
    return Batch(input_ids, attention_mask, labels, pixel_values, shapes)
