"""The generation engine: continuous batching, image cache, prefix cache (docs/engine.md)."""

from .request import Completion, ContextOverflow, EngineError, QueueFull, Request, RequestHandle, StreamEvent
from .config import EngineConfig
from .scheduler import Engine

__all__ = ["Completion", "ContextOverflow", "Engine", "EngineConfig", "EngineError", "QueueFull", "Request", "RequestHandle",
           "StreamEvent"]
