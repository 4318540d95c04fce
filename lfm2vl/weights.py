"""Checkpoint weights: read Hugging Face LFM2-VL safetensors into `Lfm2Vl`, and write them back.

Loading is a short prefix table plus a strict check: every stored tensor is consumed
and every parameter filled, or one error lists the missing, unexpected and mis-shaped keys with
their files. Tensors are read one at a time straight into their final buffers (our own small
safetensors header reader; no mmap), so peak memory is one copy of the model plus one tensor,
and a truncated file is reported by name instead of failing somewhere in the middle.
Saving writes the Hub layout (`model.vision_tower.vision_model.*`, tied `lm_head` not stored),
sharded with an index above `max_shard_size`, readable by transformers 4.57 / 5.x and converters.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .config import Lfm2VlConfig
from .memory import release_freed_memory
from .model.lfm2vl import Lfm2Vl
from .quant import (INT4_BLOCKS, add_int4_head, int4_block, layer_kind, linear_names, quantized_tensors, repack_int4,
                    replace_embedding, replace_linears, share_int8_head, tied_int4_head, use_native_step)

# Stored prefix -> our module prefix; the first match wins, so longer prefixes come first.
PREFIXES = (
    ("model.language_model.model.", "language_model."),  # some fine-tunes nest the causal-LM wrapper
    ("model.language_model.", "language_model."),
    ("model.vision_tower.vision_model.", "vision_tower."),  # as stored on the Hub (transformers 4.57)
    ("model.vision_tower.", "vision_tower."),  # transformers 5.x in-memory layout
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("lm_head.", "lm_head."),
)
SAVE_PREFIXES = (
    ("language_model.", "model.language_model."),
    ("vision_tower.", "model.vision_tower.vision_model."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
    ("lm_head.", "lm_head."),
)
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be loaded as LFM2-VL; the message names file and key."""


def map_key(key: str) -> str | None:
    for old, new in PREFIXES:
        if key.startswith(old):
            return new + key[len(old) :]
    return None


def _is_unused(name: str, cfg: Lfm2VlConfig) -> bool:
    """Tensors that exist in some checkpoints but that LFM2-VL never uses (dropped on purpose)."""
    if name.startswith("vision_tower.head."):  # SigLIP2 pooling head: not part of LFM2-VL
        return True
    if name == "lm_head.weight" and cfg.tie_word_embeddings:  # a tied head saved explicitly
        return True
    parts = name.split(".")
    if name.startswith("vision_tower.encoder.layers.") and int(parts[3]) >= cfg.vision.num_hidden_layers:
        return cfg.vision.stored_layers is not None  # layers past vision_feature_layer
    return False


def shard_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
        files = [folder / f for f in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{index} names shard files that are missing: {missing}")
        return files
    single = folder / "model.safetensors"
    if single.exists():
        return [single]
    for name in QUANTIZED_WEIGHTS.values():
        if (folder / name).exists():
            return [folder / name]
    if list(folder.glob("*.bin")):
        raise CheckpointError(f"{folder} holds only PyTorch .bin weights; convert them to safetensors first")
    raise CheckpointError(f"{folder} has no model.safetensors or model.safetensors.index.json")


def read_header(path: Path) -> tuple[dict, int]:
    """Parse a safetensors header -> ({key: {dtype, shape, data_offsets}}, data start offset)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > 100_000_000:
            raise CheckpointError(f"{path}: corrupt or truncated safetensors header (claims {n} bytes of {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from e
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path}: truncated: the header describes {8 + n + end} bytes but the file has {size}; "
            "the download is incomplete, delete the file and fetch it again"
        )
    return header, 8 + n


class StoredTensor:
    """A 2-D tensor still in its file: `t[i:j]` reads rows i:j only. Quantizing one of these a block of
    rows at a time never holds the float weight whole (the 65k-row embedding is 268 MB in fp32)."""

    def __init__(self, f: Any, path: Path, key: str, offset: int, dtype: torch.dtype, shape: list[int]):
        self.f, self.path, self.key, self.offset, self.dtype = f, path, key, offset, dtype
        self.shape = torch.Size(shape)
        self.device = torch.device("cpu")
        self.row_bytes = self.shape[1] * torch.empty((), dtype=dtype).element_size()

    def __getitem__(self, rows: slice) -> torch.Tensor:
        start, stop, _ = rows.indices(self.shape[0])
        buf = torch.empty(max(stop - start, 0) * self.row_bytes, dtype=torch.uint8)
        self.f.seek(self.offset + start * self.row_bytes)
        if self.f.readinto(memoryview(buf.numpy())) != buf.numel():
            raise CheckpointError(f"{self.path}: truncated while reading tensor {self.key}")
        return buf.view(self.dtype).reshape(-1, self.shape[1])


def iter_tensors(path: Path, keys: list[str] | None = None, lazy: set[str] = frozenset()
                 ) -> Iterator[tuple[str, torch.Tensor | StoredTensor]]:
    """Yield (key, tensor) read directly from the file, one at a time; keys in `lazy` (2-D) come as
    `StoredTensor`s, read by the consumer a block of rows at a time, before the next key is yielded."""
    header, start = read_header(path)
    with open(path, "rb", buffering=0) as f:
        for key in keys if keys is not None else list(header):
            info = header[key]
            if info["dtype"] not in _DTYPES:
                raise CheckpointError(f"{path}: tensor {key} has unsupported dtype {info['dtype']}")
            a, b = info["data_offsets"]
            if key in lazy and len(info["shape"]) == 2:
                yield key, StoredTensor(f, path, key, start + a, _DTYPES[info["dtype"]], info["shape"])
                continue
            buf = torch.empty(b - a, dtype=torch.uint8)
            f.seek(start + a)
            if f.readinto(memoryview(buf.numpy())) != b - a:
                raise CheckpointError(f"{path}: truncated while reading tensor {key}")
            yield key, buf.view(_DTYPES[info["dtype"]]).reshape(info["shape"])


def stored_dtype(folder: Path) -> torch.dtype:
    header, _ = read_header(shard_files(folder)[0])
    for info in header.values():
        if info["dtype"] in ("F32", "F16", "BF16", "F64"):
            return _DTYPES[info["dtype"]]
    return torch.float32


def match_tensors(folder: Path, cfg: Lfm2VlConfig, expected: dict[str, tuple[int, ...]],
                  integer: dict[str, torch.dtype] | None = None) -> list[tuple[Path, list[str]]]:
    """Each shard of `folder` with the keys to read from it, checked against the model's tensors
    (`expected`: our name -> shape; `integer`: the dtype of its integer ones) from the headers alone,
    before anything is read: every problem at once in a CheckpointError (missing, unexpected,
    duplicate, wrong shape or dtype)."""
    integer = integer or {}
    plan, unexpected, mismatched, where = [], [], [], {}
    for path in shard_files(folder):
        header, _ = read_header(path)
        wanted = []
        for key, info in header.items():
            name = map_key(key)
            if name is None or (name not in expected and not _is_unused(name, cfg)):
                unexpected.append(f"{key} ({path.name})")
            elif name in expected:
                if tuple(info["shape"]) != expected[name]:
                    mismatched.append(f"{key} ({path.name}): stored {tuple(info['shape'])}, model {expected[name]}")
                elif name in integer and _DTYPES.get(info["dtype"]) != integer[name]:
                    mismatched.append(f"{key} ({path.name}): stored as {info['dtype']}, the model holds "
                                      f"{str(integer[name]).removeprefix('torch.')} there")
                elif name in where:
                    unexpected.append(f"{key} ({path.name}): duplicate of {where[name]}")
                else:
                    wanted.append(key)
                    where[name] = f"{key} in {path.name}"
        plan.append((path, wanted))
    missing = sorted(set(expected) - set(where))
    if missing or unexpected or mismatched:
        lines = [f"checkpoint {folder} does not match the LFM2-VL model its config.json describes:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
            if items:
                lines.append(f"  {len(items)} {title}: " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else ""))
        raise CheckpointError("\n".join(lines))
    return plan


def load_weights(
    folder: str | Path, cfg: Lfm2VlConfig, device: str | torch.device, dtype: torch.dtype, quantize: str | None = None,
    prequantized: bool = False,
) -> Lfm2Vl:
    """Build `Lfm2Vl` on the meta device and fill it strictly from the folder's safetensors.

    With quantize="int8" / "int4" each linear layer's weight is quantized as it is read
    (lfm2vl/quant/), so its float copy never exists beside the quantized one; everything else is
    cast to `dtype`. A `prequantized` folder (written by `write_quantized`, with quantize naming its
    scheme) holds the quantized tensors themselves.
    """
    folder = Path(folder)
    with torch.device("meta"):
        model = Lfm2Vl(cfg)
    int4_head = quantize is not None and tied_int4_head(model, quantize)
    stored_block = None  # a prequantized int4 folder's packing (written before it was recorded: 64, AVX-512's)
    if prequantized and quantize == "int4":
        stored_block = json.loads((folder / "config.json").read_text())["quantization_config"].get("block_rows", 64)
        if stored_block not in INT4_BLOCKS:
            raise CheckpointError(f"{folder}: int4 block_rows {stored_block!r} is not a packing lfm2vl reads "
                                  f"({list(INT4_BLOCKS)}); quantize the float checkpoint again: lfm2vl quantize IN OUT")
    if prequantized:  # the checkpoint's layout is the quantized model's
        replace_linears(model, dtype, scheme=quantize)
        if int4_head:
            add_int4_head(model, dtype)
        else:
            replace_embedding(model, dtype)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    integer = {k: v.dtype for k, v in model.state_dict().items() if not v.is_floating_point()}  # qweights
    quantized = {}  # layer -> "int8" | "int4", for layers quantized while reading
    if quantize is not None and not prequantized:
        shapes = {n: model.get_submodule(n).weight.shape for n in linear_names(model)}
        quantized = {n: layer_kind(quantize, n, *shape) for n, shape in shapes.items()}
        # an int8 table (a tied int8 head reads it too), or a tied int4 head's table (the embedding reads it)
        quantized["language_model.embed_tokens"] = "int4" if int4_head else "int8"
    state: dict[str, torch.Tensor] = {}
    for path, wanted in match_tensors(folder, cfg, expected, integer):
        lazy = {k for k in wanted if (n := map_key(k)).endswith(".weight") and n.removesuffix(".weight") in quantized}
        for key, t in iter_tensors(path, wanted, lazy):
            name = map_key(key)
            layer = name.removesuffix(".weight")
            if layer in quantized and name.endswith(".weight"):
                target = "lm_head" if int4_head and layer == "language_model.embed_tokens" else layer
                for suffix, q in quantized_tensors(quantized[layer], t, dtype).items():
                    state[f"{target}.{suffix}"] = q.to(device)
            elif stored_block is not None and t.dtype == torch.uint8 and name.endswith(".qweight"):
                shell = model.get_submodule(name.removesuffix(".qweight"))  # an Int4Linear: (out, in)
                state[name] = repack_int4(t, shell.out_features, shell.in_features, stored_block).to(device)
            else:
                # int4 scales stay bf16 whatever the compute dtype: the kernel takes no other (lfm2vl/quant/int4.py)
                keep = not t.is_floating_point() or name.endswith(".scales_zeros")
                state[name] = t.to(device=device, dtype=t.dtype if keep else dtype)
            del t
            if quantized:
                release_freed_memory()
    if quantized:
        replace_linears(model, dtype, sorted(set(quantized) - {"language_model.embed_tokens"}), quantize)
        if int4_head:
            add_int4_head(model, dtype)
        else:
            replace_embedding(model, dtype)
    model.load_state_dict(state, strict=True, assign=True)
    if quantize is not None:
        share_int8_head(model)
        use_native_step(model)
    return model.eval()


# A quantized folder's weights file has its own name, so that transformers (which would fill every
# missing float weight with random values and only warn) refuses the folder instead of loading noise.
QUANTIZED_WEIGHTS = {"int8": "model.int8.safetensors", "int4": "model.int4.safetensors"}
QUANTIZATION_CONFIGS = {
    "int8": {"quant_method": "lfm2vl", "weights": "int8", "symmetric": True,
             "scales": "one per output channel of each linear layer, one per row of the embedding"},
    "int4": {"quant_method": "lfm2vl", "weights": "int4", "group_size": 32, "symmetric": False,
             "layout": "torch CPU int4pack (lfm2vl/quant/)",
             "layers": "language model and head int4 (.qweight U8 + .scales_zeros; a tied head is also the "
                       "embedding table), vision and projector int8"},
}


def write_quantized(src: str | Path, dst: str | Path, cfg: Lfm2VlConfig, scheme: str = "int8") -> Path:
    """A quantized copy of a checkpoint folder: for every layer `lfm2vl.load(quantize=scheme)` quantizes,
    its quantized buffers (int8: `.qweight` I8 + `.scale`; int4: `.qweight` U8 + `.scales_zeros`), the
    other tensors as stored, and config.json with a `quantization_config`, in QUANTIZED_WEIGHTS[scheme].
    It loads straight into place (no float weights ever), but only with lfm2vl."""
    src, dst = Path(src), Path(dst)
    with torch.device("meta"):
        model = Lfm2Vl(cfg)
    match_tensors(src, cfg, {k: tuple(v.shape) for k, v in model.state_dict().items()})  # before writing anything
    kinds = {n: layer_kind(scheme, n, *model.get_submodule(n).weight.shape) for n in linear_names(model)}
    int4_head = tied_int4_head(model, scheme)
    kinds["language_model.embed_tokens"] = "int4" if int4_head else "int8"
    out: dict[str, torch.Tensor] = {}
    for path in shard_files(src):
        for key, t in iter_tensors(path):
            name = map_key(key)
            layer = None if name is None else name.removesuffix(".weight")
            if name is not None and name.endswith(".weight") and layer in kinds:
                base = "lm_head." if int4_head and layer == "language_model.embed_tokens" else key[: -len("weight")]
                for suffix, q in quantized_tensors(kinds[layer], t, torch.float32).items():
                    out[base + suffix] = q
            else:
                out[key] = t
    dst.mkdir(parents=True, exist_ok=True)
    for old in list(dst.glob("model*.safetensors")) + list(dst.glob("model.safetensors.index.json")):
        old.unlink()
    _atomic_save(out, dst / QUANTIZED_WEIGHTS[scheme])
    qconfig = QUANTIZATION_CONFIGS[scheme]
    if scheme == "int4":  # the packing depends on the CPU's kernels: a loader on another CPU repacks
        qconfig = qconfig | {"block_rows": int4_block()}
    config = json.loads((src / "config.json").read_text()) | {"quantization_config": qconfig}
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return dst


def checkpoint_quantization(folder: str | Path) -> str | None:
    """"int8" / "int4" for a folder written by `write_quantized`; None for a float checkpoint, or for
    anything that is not a local checkpoint folder (a Hub id not yet resolved)."""
    path = Path(folder).expanduser() / "config.json"
    q = json.loads(path.read_text()).get("quantization_config") if path.exists() else None
    if q is None:
        return None
    if q.get("quant_method") != "lfm2vl" or q.get("weights") not in QUANTIZATION_CONFIGS:
        raise CheckpointError(f"{folder}: quantization_config {q} is not one lfm2vl reads (it reads its own int8 "
                              "and int4: lfm2vl quantize IN OUT); load the unquantized checkpoint instead")
    return q["weights"]


def hub_state_dict(model: Lfm2Vl) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in model.state_dict().items():
        for ours, theirs in SAVE_PREFIXES:
            if name.startswith(ours):
                out[theirs + name[len(ours) :]] = t.detach().contiguous()
                break
        else:
            raise AssertionError(f"no save prefix for {name}")
    return out


def save_weights(model: Lfm2Vl, folder: str | Path, max_shard_size: int = 5 * 2**30) -> None:
    """config.json + model.safetensors (or shards + index) in the Hugging Face layout."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = hub_state_dict(model)
    dtype = next(iter(state.values())).dtype
    config = model.cfg.to_hf() | {"torch_dtype": str(dtype).removeprefix("torch."), "dtype": str(dtype).removeprefix("torch.")}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(state):
        nbytes = state[key].numel() * state[key].element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][key] = state[key]
        size += nbytes
    for old in list(folder.glob("model*.safetensors")) + list(folder.glob("model.safetensors.index.json")):
        old.unlink()  # never leave a stale shard next to the new ones
    if len(shards) == 1:
        _atomic_save(shards[0], folder / "model.safetensors")
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            _atomic_save(shard, folder / name)
            weight_map.update({k: name for k in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    try:
        save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    except BaseException:  # a full disk: no half-written file left beside the old one
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
