"""lfm2vl: Liquid AI's LFM2-VL vision-language models in plain PyTorch.

    model = lfm2vl.load("LiquidAI/LFM2-VL-450M")   # or a local folder; no argument = bundled model
    logits = model(**model.processor(text=..., images=...))
"""

from .memory import bound_kernel_caches

bound_kernel_caches()  # before any oneDNN kernel runs in this process (lfm2vl/memory.py)

from .api import Model, load
from .config import Lfm2VlConfig, TextConfig, VisionConfig, model_config

__version__ = "0.1.0"
__all__ = ["Lfm2VlConfig", "Model", "Processor", "TextConfig", "VisionConfig", "load", "model_config"]


def __getattr__(name: str):
    if name == "Processor":  # imported lazily: processing pulls in PIL and tokenizers
        from .processing.processor import Processor

        return Processor
    raise AttributeError(f"module 'lfm2vl' has no attribute {name!r}")
