"""The front door: `lfm2vl.load()` and the `Model` it returns (network + processor together).

The CLI, trainer, evaluation and benchmarks all go through here, so device / dtype handling and
file layout are decided in one place. Generation runs on the model's engine (lfm2vl/engine/):
a list of conversations is continuously batched, and repeated images and conversation prefixes
are served from its caches.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .budget import BudgetChoice, check_target
from .completion import checkpoint_defaults, make_request, make_text_request, normalize_conversations
from .config import Lfm2VlConfig
from .engine import Completion, Engine, EngineConfig, EngineError, Request, RequestHandle
from .hub import SIDE_FILES, resolve
from .model.lfm2vl import Lfm2Vl
from .sampling import RECOMMENDED, SamplingParams
from .weights import (
    CheckpointError, checkpoint_quantization, load_weights, save_weights, stored_dtype, write_quantized,
)

log = logging.getLogger(__name__)

_DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPE_NAMES)} or 'auto'")
    return _DTYPE_NAMES[dtype]


def check_device(device: str | torch.device) -> torch.device:
    """The device, or a ValueError saying why this machine cannot use it (before anything loads)."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {str(device)!r}: use cpu, cuda, cuda:N or mps") from e
    if d.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"device {str(device)!r} is not available: {why}; use cpu")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r} does not exist: this machine has {torch.cuda.device_count()} "
                             f"CUDA device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif d.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device {str(device)!r} is not available: Apple's Metal (MPS) backend needs macOS on "
                             "Apple silicon and a torch built with it; use cpu")
    elif d.type != "cpu":
        backend = getattr(torch, d.type, None)
        if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
            raise ValueError(f"device {str(device)!r} is not available on this machine; use cpu")
    return d


def read_config(folder: Path) -> Lfm2VlConfig:
    path = folder / "config.json"
    if not path.exists():
        raise CheckpointError(f"{folder} has no config.json: not a model checkpoint folder")
    try:
        return Lfm2VlConfig.from_hf(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from e
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{path}: {e}") from e


class Model:
    """An LFM2-VL model ready to use: `model(**processor_outputs)` -> logits, plus its processor."""

    def __init__(self, module: Lfm2Vl, processor: Any = None, source: Path | None = None):
        self.module = module
        self.processor = processor
        self.source = source
        self.default_params, self.eos_token_ids = checkpoint_defaults(source)
        self._engine: Engine | None = None
        self._engine_config: EngineConfig | None = None

    @property
    def config(self) -> Lfm2VlConfig:
        return self.module.cfg

    @property
    def device(self) -> torch.device:
        return self.module.device

    @property
    def quantization(self) -> str | None:
        """"int8" / "int4" for a quantized model, else None."""
        from .quant import is_quantized

        return is_quantized(self.module)

    @property
    def dtype(self) -> torch.dtype:
        return self.module.dtype

    # -- the engine ---------------------------------------------------------------------------
    @property
    def engine(self) -> Engine:
        """The continuous-batching engine every generation call runs on (built on first use)."""
        if self._engine is None:
            decode = self.processor.decode if self.processor is not None else None
            config = self._engine_config or EngineConfig.for_device(self.device)
            self._engine = Engine(self.module, decode, config)
        return self._engine

    def configure_engine(self, config: EngineConfig | None = None, **fields: Any) -> Engine:
        """Replace the engine (slots, token budget, cache sizes; see EngineConfig) and return it."""
        if self._engine is not None:
            self._engine.stop(drain=True)
        self._engine = None  # its caches are freed before a GPU's free memory sizes the new ones
        base = config or EngineConfig.for_device(self.device)
        self._engine_config = replace(base, **fields) if fields else base
        return self.engine

    def __call__(self, **inputs: Any) -> torch.Tensor:
        """Logits (B, T, V) for the reference processor's output dict (or ours), unchanged."""
        with torch.inference_mode():
            moved = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in inputs.items()}
            if "spatial_shapes" in moved:
                moved["spatial_shapes"] = inputs["spatial_shapes"]  # shapes stay on the CPU (no device sync)
            return self.module(**moved)

    # -- generation ---------------------------------------------------------------------------
    def sampling_params(self, preset: str | None = None, **overrides: Any) -> SamplingParams:
        """Checkpoint defaults (greedy unless generation_config.json says otherwise), then a preset, then overrides.

        preset="recommended" is the model card's text sampling: temperature 0.1, min_p 0.15,
        repetition_penalty 1.05.
        """
        params = self.default_params
        if preset == "recommended":
            params = params.with_overrides(
                temperature=RECOMMENDED.temperature, min_p=RECOMMENDED.min_p,
                repetition_penalty=RECOMMENDED.repetition_penalty,
            )
        elif preset not in (None, "greedy", "default"):
            raise ValueError(f"unknown sampling preset {preset!r}; use 'recommended' or 'greedy'")
        if preset == "greedy":
            params = params.with_overrides(temperature=0.0)
        return params.with_overrides(**overrides)

    def _split_options(self, options: dict[str, Any]) -> tuple[SamplingParams, dict[str, Any]]:
        sampling_keys = set(SamplingParams.__dataclass_fields__)
        image_keys = set(self.processor.settings.__dataclass_fields__) if self.processor is not None else set()
        unknown = sorted(set(options) - sampling_keys - image_keys - {"preset", "latency_target"})
        if unknown:
            raise TypeError(
                f"unknown option(s) {unknown}; sampling options: {sorted(sampling_keys)}; "
                f"image options: {sorted(image_keys - {'unknown_keys'})}"
            )
        sampling = {k: v for k, v in options.items() if k in sampling_keys}
        image = {k: v for k, v in options.items() if k in image_keys and v is not None}
        target = check_target(image.get("max_image_tokens"), options.get("latency_target"))
        if target is not None:
            image["latency_target"] = target
        params = self.sampling_params(options.get("preset"), **sampling)
        vocab = self.config.text.vocab_size
        bad = [t for t in params.stop_token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"stop_token_ids must be token ids in [0, {vocab}), got {bad[:5]}")
        return params, image

    def request(self, conversation: list[dict], **options: Any) -> Request:
        """One conversation + options (as `generate`) -> an engine `Request`; every input is checked here."""
        params, image = self._split_options(options)
        return self._request(conversation, params, image)

    def text_request(self, prompt: str | list[int], **options: Any) -> Request:
        """A raw prompt (text, or token ids), no chat template, no images -> an engine `Request`."""
        params, image = self._split_options(options)
        if image:
            raise TypeError(f"a raw text prompt has no images: image options {sorted(image)} do not apply")
        if self.processor is None:
            raise ValueError(f"{self.source} has no tokenizer.json: it cannot generate text")
        return make_text_request(self.processor, prompt, params, self.eos_token_ids, self.config.text.vocab_size)

    def submit(self, conversation: list[dict], **options: Any) -> RequestHandle:
        """Queue one conversation on the engine; iterate the handle for `StreamEvent`s, or `.result()`."""
        return self.engine.submit(self.request(conversation, **options))

    def _request(self, conversation: list[dict], params: SamplingParams, image: dict[str, Any]):
        if self.processor is None:
            raise ValueError(f"{self.source} has no tokenizer.json / chat template: it cannot generate text")
        if "latency_target" in image:
            fixed = {k: v for k, v in image.items() if k not in ("latency_target", "max_image_tokens")}
            image = self.plan_budget(conversation, image["latency_target"], **fixed).settings
        return make_request(self.processor, conversation, params, self.eos_token_ids, image)

    def plan_budget(self, conversation: list[dict], latency_target: float, recalibrate: bool = False,
                    **image_options: Any) -> BudgetChoice:
        """The image budget `max_image_tokens="auto"` picks for this conversation: the largest whose predicted
        time to first token on this device meets `latency_target` seconds (lfm2vl/budget.py). The first
        call on a device calibrates it (a few seconds; cached); image options given stay fixed."""
        from . import budget

        if self.processor is None:
            raise ValueError(f"{self.source} has no tokenizer.json / chat template: it cannot generate text")
        prompt = self.processor.prompt(conversation, **image_options)
        sizes = [(img.plan.width, img.plan.height) for img in prompt.images]
        text_tokens = len(prompt.ids) - sum(img.tokens for img in prompt.images)
        cal = budget.calibration(self, recalibrate=recalibrate)
        return budget.choose(self.processor, cal, sizes, text_tokens, latency_target, image_options)

    def complete(self, messages: Any, **options: Any) -> list[Completion]:
        """Like `generate`, but returns `Completion`s (text, token ids, finish reason, token counts, timing)."""
        convs, _ = normalize_conversations(messages)
        params, image = self._split_options(options)
        requests = [self._request(c, params, image) for c in convs]  # every input checked before any runs
        handles = [self.engine.submit(r) for r in requests]
        try:
            return [h.result() for h in handles]
        finally:
            for h in handles:
                h.cancel()  # no-op for finished ones; frees slots if the caller was interrupted

    def generate(self, messages: Any, **options: Any) -> str | list[str]:
        """Reply to one conversation (-> str) or a list of conversations (-> list[str], batched).

        messages: [{"role": "user", "content": [{"type": "image", "image": "cat.jpg"},
        {"type": "text", "text": "What is this?"}]}]; images as paths, PIL images, bytes or data URLs.
        options: sampling (max_new_tokens, temperature (0 = greedy), top_k, top_p, min_p,
        repetition_penalty, seed, stop, stop_token_ids, min_new_tokens, ignore_eos, preset) and
        image settings (max_image_tokens, min_image_tokens, do_image_splitting, min_tiles,
        max_tiles, use_thumbnail, tile_size, max_pixels_tolerance, resample).
        max_image_tokens="auto" with latency_target=SECONDS picks the largest image budget predicted to
        answer within that time to first token on this device (`plan_budget`; docs/performance.md).
        """
        _, batched = normalize_conversations(messages)
        texts = [c.text for c in self.complete(messages, **options)]
        return texts if batched else texts[0]

    def stream(self, messages: Any, **options: Any) -> Iterator[str]:
        """Yield the reply to one conversation piece by piece (same options as `generate`)."""
        convs, batched = normalize_conversations(messages)
        if batched:
            raise TypeError("stream() takes one conversation; use generate() for a batch")
        handle = self.submit(convs[0], **options)
        try:
            for event in handle:
                if event.finish_reason == "error":
                    raise EngineError(event.error)
                if event.text:
                    yield event.text
        finally:
            handle.cancel()

    def to(self, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> Model:
        if self._engine is not None:  # its cache lives on the old device / dtype
            self._engine.stop(drain=True)
            self._engine = None
        self.module.to(device=device, dtype=parse_dtype(dtype))
        from .quant import share_int8_head

        share_int8_head(self.module)  # a move converts the shared int8 table twice: share it again
        return self

    def save_pretrained(self, folder: str | Path, max_shard_size: int = 5 * 2**30) -> None:
        """Write config.json + safetensors in the Hugging Face layout, with the tokenizer/processor files."""
        from .quant import is_quantized

        if is_quantized(self.module):
            raise ValueError("a quantized model cannot be saved in the Hugging Face layout: load the checkpoint "
                             "without quantize= and save that")
        folder = Path(folder)
        save_weights(self.module, folder, max_shard_size=max_shard_size)
        copied = set()
        if self.source is not None and self.source.resolve() != folder.resolve():
            for name in SIDE_FILES:
                if (self.source / name).exists():
                    shutil.copyfile(self.source / name, folder / name)
                    copied.add(name)
        if "generation_config.json" not in copied and not (folder / "generation_config.json").exists():
            t = self.config.text
            gen = {"bos_token_id": t.bos_token_id, "eos_token_id": t.eos_token_id, "pad_token_id": t.pad_token_id}
            (folder / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def quantize_checkpoint(src: str | Path, dst: str | Path, scheme: str = "int8", revision: str | None = None) -> Path:
    """Write a quantized (int8 or int4) copy of a checkpoint (folder or Hub id) to `dst`, with its tokenizer
    and processor files; `lfm2vl.load(dst)` then reads the weights straight into place (`lfm2vl quantize`)."""
    from .quant import check_scheme

    check_scheme(scheme)
    dst = Path(dst).expanduser()
    check_output_folder(dst)  # before the source is resolved: that may download a whole checkpoint
    folder = resolve(src, revision=revision)  # (before dst exists: a Hub id must not name a new local folder)
    if checkpoint_quantization(folder) is not None:
        raise ValueError(f"{folder} is already quantized")
    if dst.resolve() == folder.resolve():
        raise ValueError("the output folder must differ from the input folder")
    created = next((p for p in [*reversed(dst.absolute().parents), dst.absolute()] if not p.exists()), None)
    try:  # now, not after minutes of quantizing
        dst.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create the output folder {dst}: {e.strerror or e}") from e
    try:
        write_quantized(folder, dst, read_config(folder), scheme)
    except BaseException:
        if created is not None:  # leave nothing behind a failure: the folders made here, and what is in them
            shutil.rmtree(created, ignore_errors=True)
        raise
    for name in SIDE_FILES:
        if (folder / name).exists():
            shutil.copyfile(folder / name, dst / name)
        elif (dst / name).exists():  # left by the checkpoint written there before: not this one's
            (dst / name).unlink()
    return dst


def check_output_folder(dst: Path) -> None:
    """`dst` may be new, empty, or an earlier `quantize_checkpoint` output (replaced); anything else
    (another checkpoint, a folder of other files, a file) is refused before anything is written."""
    if not dst.exists():
        return
    if not dst.is_dir():
        raise ValueError(f"{dst} is a file: give a new or empty folder for the quantized checkpoint")
    if not any(dst.iterdir()):
        return
    try:
        ours = checkpoint_quantization(dst) is not None
    except (AttributeError, CheckpointError, OSError, ValueError):  # another tool's quantization, or a config.json that is not JSON
        ours = False
    if not ours:
        raise ValueError(f"{dst} is not empty and is not a checkpoint lfm2vl quantize wrote: give a new or empty "
                         "folder (nothing was written)")


def load(
    path_or_hub_id: str | Path | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    revision: str | None = None,
    quantize: str | None = None,
) -> Model:
    """Load an LFM2-VL checkpoint from a local folder or a Hub id (e.g. "LiquidAI/LFM2-VL-450M").

    dtype None keeps the stored dtype, except that bf16/fp16 weights are upcast to float32 on
    the CPU (half-precision matmuls are slow or unsupported on many CPUs). With no path, the
    model bundled with the package is loaded. quantize="int8" keeps every linear layer's weight in
    int8 (lfm2vl/quant/; about 4x less memory for them and faster decoding); quantize="int4" keeps
    the language model's in 4 bits (faster decoding still) and the vision tower's in int8. dtype then
    defaults to the device's fast compute dtype (bfloat16 on CPUs with native bf16).
    """
    if path_or_hub_id is None:
        from .bundled import bundled_path

        path_or_hub_id = bundled_path()
    device = check_device(device)
    dtype = parse_dtype(dtype)
    if quantize is not None:
        from .quant import check_scheme

        check_scheme(quantize)
    folder = resolve(path_or_hub_id, revision=revision)
    cfg = read_config(folder)
    stored_quantization = checkpoint_quantization(folder)
    if stored_quantization is not None:
        if quantize not in (None, stored_quantization):
            raise ValueError(f"{folder} is already quantized ({stored_quantization}); load it without quantize=")
        quantize = stored_quantization
    if quantize is not None:
        from .quant import compute_dtype

        dtype = dtype or compute_dtype(device)
        if device.type != "cpu":
            log.warning("quantize=%r on %s: lfm2vl's int8/int4 kernels run on CPUs; here each layer widens its "
                        "weights to %s at every call, so the model is smaller but slower than an unquantized %s one",
                        quantize, device, str(dtype).removeprefix("torch."), str(dtype).removeprefix("torch."))
    if dtype is None:
        dtype = stored_dtype(folder)
        if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
            dtype = torch.float32
    module = load_weights(folder, cfg, device, dtype, quantize, prequantized=stored_quantization is not None)
    processor = None
    if (folder / "tokenizer.json").exists():
        from .processing.processor import Processor

        processor = Processor.from_pretrained(folder)
    else:
        log.warning("%s has no tokenizer.json: the model loads, but text/image processing is unavailable", folder)
    return Model(module, processor, folder)
