"""What goes into the engine (`Request`) and what comes out (`StreamEvent`, `Completion`, `RequestHandle`).

A request is token-level: prompt ids, the images whose features fill its `<image>` slots, sampling
parameters and the ids that end it. Its handle is the one way back: iterate it (or `async for` over
`handle.events_async()`) for typed `StreamEvent`s, call `result()` for the `Completion`, `cancel()`
to stop it. Handles are thread-safe; the engine may run on a worker thread or be stepped by
whoever iterates (see `Engine`).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import queue
import resource
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from ..sampling import SamplingParams

if TYPE_CHECKING:
    from .scheduler import Engine

FINISH_REASONS = ("stop", "length", "cancelled", "error")


class EngineImage(Protocol):
    """An image as the engine needs it (lfm2vl.processing.prompt.PromptImage is one)."""

    key: str  # content hash including the image settings: equal keys, equal features

    @property
    def tokens(self) -> int: ...

    def pixels(self) -> tuple[torch.Tensor, list[tuple[int, int]]]: ...


@dataclass
class Request:
    ids: Sequence[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    stop_ids: frozenset[int] = frozenset()  # end the request (EOS + stop_token_ids); never emitted
    images: Sequence[EngineImage] = ()
    image_token_id: int | None = None
    key: tuple | None = None  # prefix-cache key; default: ids with each image token replaced by its image's key

    def __post_init__(self) -> None:
        self.ids = list(self.ids)
        if not self.ids:
            raise ValueError("a request needs at least one prompt token")
        if self.images and self.image_token_id is None:
            raise ValueError("a request with images needs image_token_id")
        self.image_positions = self._image_positions()  # validates the image-token count once, here
        if self.key is None:
            key: list = list(self.ids)
            rows = iter(self.image_positions)
            for img in self.images:
                for _ in range(img.tokens):
                    key[next(rows)] = img.key
            self.key = tuple(key)
        if len(self.key) != len(self.ids):
            raise ValueError("the content key must have one entry per prompt token")

    def _image_positions(self) -> list[int]:
        """Positions of the image tokens in `ids` (image j owns the next images[j].tokens of them)."""
        if not self.images:
            return []
        positions = [i for i, t in enumerate(self.ids) if t == self.image_token_id]
        need = sum(img.tokens for img in self.images)
        if len(positions) != need:
            raise ValueError(f"the prompt has {len(positions)} image tokens but its images need {need}")
        return positions


@dataclass(frozen=True)
class StreamEvent:
    """One step of one request (mlx-lm's GenerationResponse): a token and the text it made final."""

    text: str  # text that became final with this token ("" while a UTF-8 character or a stop string is pending)
    token: int | None  # the generated token; None on a closing event that carries no token
    finish_reason: str | None  # None while running, else one of FINISH_REASONS
    prompt_tokens: int
    generation_tokens: int
    cached_tokens: int  # prompt tokens whose state came from the prefix cache
    prompt_tps: float  # prompt tokens / time to first token
    generation_tps: float  # generated tokens / time since the first
    peak_memory_mb: float
    error: str | None = None
    # With SamplingParams.logprobs: the token's log-probability under the model (raw logits, before
    # penalties and temperature) and the most likely (token, log-probability) pairs, best first.
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()


@dataclass
class Completion:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    ttft_s: float = 0.0  # submission -> first token (a stop token too); 0 when none came (cancelled, error)
    total_s: float = 0.0
    generation_tps: float = 0.0
    error: str | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


class EngineError(RuntimeError):
    """A request failed inside the engine (the message names the cause); the engine keeps serving."""


class ContextOverflow(ValueError):
    """The prompt plus max_new_tokens does not fit the context (a server answers 400 context_length_exceeded)."""


class QueueFull(RuntimeError):
    """The engine's queue is at its limit: retry later (a server answers 503)."""


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if sys.platform.startswith("linux"):
        with open(f"/proc/{os.getpid()}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


_ids = itertools.count()


class RequestHandle:
    def __init__(self, engine: Engine, request: Request, loop: asyncio.AbstractEventLoop | None = None):
        self.id = next(_ids)
        self.request = request
        self.completion = Completion(prompt_tokens=len(request.ids))
        self._engine = engine
        self._events: queue.SimpleQueue[StreamEvent] = queue.SimpleQueue()
        self._loop = loop
        self._async: asyncio.Queue[StreamEvent] | None = asyncio.Queue() if loop is not None else None
        self._done = threading.Event()
        self.cancelled = False
        self.t_submit = 0.0

    # -- engine side --------------------------------------------------------------------------------
    def _put(self, event: StreamEvent) -> None:
        c = self.completion
        c.text += event.text
        now = time.perf_counter()
        # a stop token sampled first is a first token too (its event carries no token): TTFT is set
        if not c.ttft_s and (event.token is not None or event.finish_reason == "stop"):
            c.ttft_s = now - self.t_submit
        if event.token is not None:
            c.token_ids.append(event.token)
        c.total_s = now - self.t_submit
        c.cached_tokens = event.cached_tokens
        c.generation_tps = event.generation_tps
        if event.finish_reason is not None:
            c.finish_reason, c.error = event.finish_reason, event.error
        if self._async is not None:
            self._loop.call_soon_threadsafe(self._async.put_nowait, event)
        else:
            self._events.put(event)
        if event.finish_reason is not None:
            self._done.set()

    # -- caller side ----------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Stop generating; the stream closes with finish_reason "cancelled" (no-op once finished)."""
        self._engine.cancel(self)

    def __iter__(self) -> Iterator[StreamEvent]:
        if self._async is not None:
            raise TypeError("this request streams to an event loop: use `async for ... in handle.events_async()`")
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                if not self._engine.step_for(self):
                    event = self._events.get()  # a worker thread runs the engine: wait for it
                else:
                    continue
            yield event
            if event.finish_reason is not None:
                return

    async def events_async(self) -> AsyncIterator[StreamEvent]:
        if self._async is None:
            raise TypeError("submit with loop=asyncio.get_running_loop() to stream asynchronously")
        while True:
            event = await self._async.get()
            yield event
            if event.finish_reason is not None:
                return

    def result(self, raise_error: bool = True) -> Completion:
        """Run to the end and return the completion (an engine error raises EngineError)."""
        if self._async is not None:
            self._done.wait()
        else:
            for _ in self:
                pass
        if raise_error and self.completion.finish_reason == "error":
            raise EngineError(self.completion.error)
        return self.completion

    def __repr__(self) -> str:
        state = self.completion.finish_reason or "running"
        return f"RequestHandle(id={self.id}, prompt_tokens={len(self.request.ids)}, {state})"

