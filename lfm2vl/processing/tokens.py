"""The checkpoint's tokenizer (tokenizer.json + tokenizer_config.json) through `tokenizers` alone.

Special tokens (bos, eos, pad, image) are resolved by name through tokenizer_config.json and the
vocabulary, never hard-coded: LFM2.5-VL-3B puts `<image>` at another id than LFM2-VL. Text is
encoded without added special tokens (the chat template writes bos), as the reference processor does.

User-typed control tokens are kept as text with transformers' own scheme (`mark_control_tokens` /
`encode_marked_chat` in `utils/chat_template_utils.py`): they are wrapped in private-use markers
before the template renders, and the marked pieces are encoded with the tokenizer's normalizer,
pre-tokenizer and model only, bypassing the added-token table.
"""

from __future__ import annotations

import functools

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

MARK_START, MARK_END = "\U000f0000", "\U000f0001"  # the markers transformers uses (Unicode private use)


def mark_control_tokens(obj: Any, tokens: tuple[str, ...]) -> Any:
    """Wrap every occurrence of `tokens` in the strings of obj (recursively) with the markers.

    Markers already present are dropped first, so that a user cannot forge a marked token.
    """
    if isinstance(obj, str):
        obj = obj.replace(MARK_START, "").replace(MARK_END, "")
        return _tokens_re(tokens).sub(lambda m: MARK_START + m.group(0) + MARK_END, obj)
    if isinstance(obj, dict):
        return {key: mark_control_tokens(value, tokens) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [mark_control_tokens(value, tokens) for value in obj]
    return obj


def unmark(text: str) -> str:
    return text.replace(MARK_START, "").replace(MARK_END, "")


@lru_cache(maxsize=8)
def _tokens_re(tokens: tuple[str, ...]) -> re.Pattern:
    longest_first = sorted(tokens, key=len, reverse=True)  # a token beats the tokens it contains
    return re.compile("|".join(map(re.escape, longest_first)) or "(?!)")


@lru_cache(maxsize=8)
def _markers_re(tokens: tuple[str, ...]) -> re.Pattern:
    return re.compile(f"{MARK_START}({_tokens_re(tokens).pattern}){MARK_END}|[{MARK_START}{MARK_END}]")


def _token_name(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string, or an AddedToken dict {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class TextTokenizer:
    """A `tokenizers.Tokenizer` plus the special tokens and padding side of tokenizer_config.json."""

    def __init__(self, tokenizer: Tokenizer, config: dict[str, Any] | None = None):
        self.tokenizer = tokenizer
        self.tokenizer.encode_special_tokens = False
        self.config = config or {}
        extra = self.config.get("extra_special_tokens") or {}
        extra = extra if isinstance(extra, dict) else {}
        self.bos_token = _token_name(self.config.get("bos_token"))
        self.eos_token = _token_name(self.config.get("eos_token"))
        self.pad_token = _token_name(self.config.get("pad_token"))
        self.image_token = _token_name(self.config.get("image_token") or extra.get("image_token")) or "<image>"
        self.padding_side = self.config.get("padding_side", "left")
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"tokenizer_config.json padding_side must be 'left' or 'right', got {self.padding_side!r}")
        self.added_tokens = {t.content: i for i, t in tokenizer.get_added_tokens_decoder().items()}
        self.special_tokens = tuple(
            t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special
        )

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> TextTokenizer:
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{folder} has no tokenizer.json (needed for text processing)")
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        return cls(Tokenizer.from_file(str(path)), config)

    # -- ids -----------------------------------------------------------------------------------
    def optional_id(self, token: str | None) -> int | None:
        return None if token is None else self.tokenizer.token_to_id(token)

    def token_id(self, token: str) -> int:
        """The id of a token that must exist as one entry (markers, `<image>`); a clear error otherwise."""
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"the tokenizer has no {token!r} token; this checkpoint cannot express that layout")
        return token_id

    @property
    def image_token_id(self) -> int:
        return self.token_id(self.image_token)

    @property
    def bos_token_id(self) -> int | None:
        return self.optional_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self.optional_id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self.optional_id(self.pad_token)

    def special_tokens_map(self) -> dict[str, str]:
        """What chat templates see as `bos_token`, `eos_token`, ... (transformers passes the same)."""
        names = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token,
                 "unk_token": _token_name(self.config.get("unk_token"))}
        return {k: v for k, v in names.items() if v is not None}

    # -- encoding --------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Ids of `text`; added tokens (`<|im_start|>`, `<image>`, ...) are recognised, nothing is added."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_as_text(self, text: str) -> list[int]:
        """Ids of `text` as plain text: no added token is matched (normalizer, pre-tokenizer, model)."""
        tok = self.tokenizer
        if tok.normalizer is not None:
            text = tok.normalizer.normalize_str(text)
        splits = [s for s, _ in tok.pre_tokenizer.pre_tokenize_str(text)] if tok.pre_tokenizer else [text]
        return [t.id for split in splits for t in tok.model.tokenize(split)]

    def encode_marked(self, text: str) -> list[int]:
        """Ids of a chat rendered from marked inputs: marked tokens as text, the rest as usual.

        Piece by piece as transformers' `encode_marked_chat`: each later piece is encoded after a
        newline that is then removed, so that SentencePiece-style prefix spaces do not appear.
        """
        pieces = _markers_re(tuple(self.added_tokens)).split(text)
        if len(pieces) == 1:
            return self.encode(text)
        newline = self.encode("\n")
        ids = self.encode(pieces[0])
        for i, piece in enumerate(pieces[1:], start=1):
            if not piece:
                continue  # empty text, or a lone marker (it still breaks the text, as upstream)
            as_text = i % 2 == 1  # odd pieces are the marked tokens
            encode = self.encode_as_text if as_text else self.encode
            piece_ids = encode("\n" + piece)
            piece_ids = piece_ids[len(newline):] if piece_ids[: len(newline)] == newline else encode(piece)
            if as_text and self.added_tokens.get(piece) in piece_ids:
                raise ValueError(f"cannot keep {piece!r} as text: the tokenizer produces it from plain text")
            ids += piece_ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes one token stands for (a byte-level piece of a multi-byte character is not
        valid UTF-8 on its own, which decode() would turn into U+FFFD)."""
        piece = self.tokenizer.id_to_token(token_id)
        if piece is None:
            return b""
        if piece in self.added_tokens:
            return piece.encode("utf-8")
        byte_values = _byte_decoder()
        if all(c in byte_values for c in piece):  # byte-level BPE (GPT-2's byte <-> character table)
            return bytes(byte_values[c] for c in piece)
        return self.decode([token_id], skip_special_tokens=False).encode("utf-8")


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's table: printable stand-in character -> byte (byte-level BPE vocabularies use it)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars, strict=True)}
