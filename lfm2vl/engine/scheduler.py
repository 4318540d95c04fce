"""The engine: continuous batching over up to max_slots cache slots, with image and prefix caches.

Requests wait in a queue. Each `step()`:
1. drops cancelled requests and admits queued ones into free slots (a prefix-cache hit copies the
   stored state in, so only the new tokens are prefilled);
2. does one unit of prefill work for the oldest admitted request: encode one image crop (all of the
   image's remaining crops when nothing is decoding; none if the image cache has the image), or
   prefill one chunk of at most `token_budget - decoding rows` tokens (the last samples the first token);
3. decodes one token for every slot past its prefill, as one batch.
So a long image prompt is admitted in pieces while running streams keep receiving a token per step.

Every slot is its own sequence (own length and RoPE positions, no shared padding), and every request samples
with its own parameters and generator, so a request's tokens do not depend on its neighbours: greedy tokens
equal a solo run, and a seeded request is reproducible. The engine knows token ids only; text (stop strings,
UTF-8-safe pieces) comes from `decode`, if given.

Thread safety: `submit`, `cancel` and `stats` may be called from any thread. The engine runs either on its
own worker thread (`start()`, what a server wants) or in the caller's thread: iterating a handle steps the
engine until that handle has an event.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..memory import release_freed_memory
from ..sampling import next_tokens, token_logprobs
from ..textstream import TextStream
from .caches import ImageCache, PrefixCache
from .config import EngineConfig, cache_len, vision_batch_patches
from .request import FINISH_REASONS, ContextOverflow, QueueFull, Request, RequestHandle, StreamEvent, peak_memory_mb

log = logging.getLogger("lfm2vl.engine")


TRIM_INTERVAL_S = 1.0  # going idle hands freed memory back to the OS, at most this often (lfm2vl/memory.py)


@dataclass
class _Active:
    """A request in a slot."""

    handle: RequestHandle
    slot: int
    key: tuple | None
    n_prompt: int
    cached: int  # prompt positions restored from the prefix cache
    image_positions: list[int]  # positions of the image tokens
    image_offsets: list[int]  # first image-token index of each image
    features: list[torch.Tensor | None]
    crop_work: deque  # (image, crop) pairs still to encode
    pixels: dict[int, tuple[torch.Tensor, list[tuple[int, int]]]] = field(default_factory=dict)
    crop_feats: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    stream: TextStream | None = None
    generator: torch.Generator | None = None
    history: torch.Tensor | None = None  # (1, L) ids seen, for the repetition penalty
    banned: torch.Tensor | None = None
    boundaries: dict[int, dict[int, torch.Tensor]] = field(default_factory=dict)
    next_input: int | None = None  # sampled, not yet fed
    logprobs: tuple[float, tuple[tuple[int, float], ...]] | None = None  # of the token just sampled
    generated: int = 0
    t_submit: float = 0.0
    t_first: float | None = None

    @property
    def request(self) -> Request:
        return self.handle.request

    @property
    def prefilling(self) -> bool:
        return self.next_input is None


class Engine:
    def __init__(self, model: Any, decode: Callable[[list[int]], str] | None = None,
                 config: EngineConfig | None = None):
        """model: an `Lfm2Vl` (or anything with make_cache / forward / encode_images / device / cfg)."""
        self.model = model
        self.decode = decode
        self.config = config or EngineConfig.for_device(model.device)
        context = model.cfg.text.max_position_embeddings
        self.max_len = min(self.config.max_len or context, context)
        self.cache = model.make_cache(1, min(self.config.initial_len, self.max_len))  # more slots: _start
        self.image_cache = ImageCache(self.config.image_cache_mb)
        self.prefix_cache = PrefixCache(self.config.prefix_cache_mb)
        self.vision_patches = vision_batch_patches(torch.device(model.device), model.dtype)
        self._lock = threading.RLock()  # held for a whole step (the model, slots and caches)
        self._worker_lock = threading.Lock()  # starting the worker thread
        self._qlock = threading.Lock()  # held briefly: queue and cancellations (submit never waits on a step)
        self._wake = threading.Condition(self._qlock)
        self._queue: deque[RequestHandle] = deque()
        self._cancel: set[int] = set()
        self._active: dict[int, _Active] = {}  # slot -> request
        self._worker: threading.Thread | None = None
        self._stopping = False
        self.counters = dict(steps=0, requests=0, finished=0, prompt_tokens=0, prefilled_tokens=0,
                             generated_tokens=0, vision_crops=0, decode_steps=0, decode_rows=0,
                             **{f"finished_{r}": 0 for r in FINISH_REASONS})
        self._recent: deque[tuple[float, int]] = deque(maxlen=64)  # (time, tokens) of recent decode steps
        self._worked, self._trimmed = False, 0.0  # requests ran since the last trim; when that was

    # -- submission (any thread) ---------------------------------------------------------------------
    def submit(self, request: Request, loop: Any = None) -> RequestHandle:
        """Queue a request; returns its handle. `loop` (asyncio) makes the handle stream to that loop."""
        need = len(request.ids) + request.params.max_new_tokens
        if need > self.max_len:
            raise ContextOverflow(
                f"prompt ({len(request.ids)} tokens) + max_new_tokens ({request.params.max_new_tokens}) = {need} "
                f"exceeds the context of {self.max_len}; shorten the conversation, lower max_image_tokens, or "
                "lower max_new_tokens"
            )
        if request.params.stop and self.decode is None:
            raise ValueError("stop strings need a tokenizer: create the engine with decode=")
        handle = RequestHandle(self, request, loop)
        with self._qlock:
            if self.config.max_queue is not None and len(self._queue) >= self.config.max_queue:
                raise QueueFull(f"the engine queue is full ({self.config.max_queue} waiting); retry later")
            handle.t_submit = time.perf_counter()
            self._queue.append(handle)
            self.counters["requests"] += 1
            self._wake.notify_all()
        if loop is not None:
            self.start()
        return handle

    def cancel(self, handle: RequestHandle) -> None:
        with self._qlock:
            if not handle.done:
                handle.cancelled = True
                self._cancel.add(handle.id)
                self._wake.notify_all()

    def stats(self) -> dict[str, Any]:
        """A snapshot that never waits for a running step (a server's /metrics must not stall its streams)."""
        with self._qlock:
            queued = len(self._queue)
        # list()/dict() copies are single C calls under the GIL: consistent even while the worker steps
        # (a free-threaded Python would need the step lock here)
        active, recent, counters = list(self._active.values()), list(self._recent), dict(self.counters)
        now = time.perf_counter()
        recent = [(t, n) for t, n in recent if now - t < 10]
        tps = 0.0
        if len(recent) > 1:
            tps = sum(n for _, n in recent[1:]) / max(recent[-1][0] - recent[0][0], 1e-9)
        return {
            "queued": queued, "active": len(active), "prefilling": sum(a.prefilling for a in active),
            "decoding": sum(not a.prefilling for a in active),
            "slots": self.config.max_slots, "cache_len": self.cache.max_len, "tokens_per_s": round(tps, 2),
            **counters, **self.image_cache.stats("image_cache"), **self.prefix_cache.stats("prefix_cache"),
        }

    # -- running -------------------------------------------------------------------------------------
    def start(self) -> None:
        """Run the engine on a daemon worker thread (idempotent; never waits for a running step)."""
        with self._worker_lock:
            if self._worker is None or not self._worker.is_alive():
                self._stopping = False
                self._worker = threading.Thread(target=self._run, name="lfm2vl-engine", daemon=True)
                self._worker.start()

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop the worker thread; with drain, after every submitted request has finished."""
        if not drain:
            with self._lock:
                handles = list(self._queue) + [a.handle for a in self._active.values()]
            for h in handles:
                self.cancel(h)
        with self._qlock:
            self._stopping = True
            self._wake.notify_all()
            worker = self._worker
        if worker is not None:
            worker.join(timeout)

    @property
    def background(self) -> bool:
        return self._worker is not None and self._worker.is_alive()

    def _run(self) -> None:
        while True:
            with self._qlock:
                while not (self._queue or self._active or self._cancel):
                    if self._stopping:
                        return
                    self._wake.wait()
            try:
                self.step()
            except Exception as e:  # noqa: BLE001  (a bug must not leave every waiting client hanging)
                log.exception("engine step failed")
                self._fail_all(f"{type(e).__name__}: {e}")

    def _fail_all(self, error: str) -> None:
        with self._lock:
            for a in list(self._active.values()):
                self._finish(a, "error", error, save=False)
            with self._qlock:
                queued, self._queue = list(self._queue), deque()
            for h in queued:
                self._finish_handle(h, "error", error)

    def step_for(self, handle: RequestHandle) -> bool:
        """Step once on behalf of a waiting handle; False if a worker thread owns the stepping."""
        if self.background:
            return False
        with self._lock:
            if not handle.done:
                self.step()
        return True

    @torch.inference_mode()
    def step(self) -> bool:
        """One scheduling step; returns whether work remains."""
        with self._lock:
            self.counters["steps"] += 1
            self._drop_cancelled()
            self._admit()
            self._prefill_unit()
            self._decode()
            with self._qlock:
                busy = bool(self._queue or self._active)
            if not busy and self._worked and time.monotonic() - self._trimmed >= TRIM_INTERVAL_S:
                # idle after work: what its images and prefills freed goes back to the OS, so the next
                # request starts from the model's own footprint, not the last one's high-water mark
                release_freed_memory()
                self._worked, self._trimmed = False, time.monotonic()
            return busy

    def run_until_done(self) -> None:
        while self.step():
            pass

    # -- admission -----------------------------------------------------------------------------------
    def _drop_cancelled(self) -> None:
        with self._qlock:
            if not self._cancel:
                return
            cancel, self._cancel = self._cancel, set()
            dropped = [h for h in self._queue if h.id in cancel]
            for h in dropped:
                self._queue.remove(h)
        for h in dropped:
            self._finish_handle(h, "cancelled", None)
        for a in [a for a in self._active.values() if a.handle.id in cancel]:
            self._finish(a, "cancelled")

    def _admit(self) -> None:
        free = [s for s in range(self.config.max_slots) if s not in self._active]
        while free:
            with self._qlock:
                if not self._queue:
                    return
                handle = self._queue.popleft()
            self._worked = True
            try:
                self._active[free[0]] = self._start(handle, free[0])
                free.pop(0)
            except Exception as e:  # noqa: BLE001  (one bad request must not stop the engine)
                self._finish_handle(handle, "error", f"{type(e).__name__}: {e}")

    def _start(self, handle: RequestHandle, slot: int) -> _Active:
        req, p = handle.request, handle.request.params
        self.cache.ensure_slots(slot + 1, self.config.max_slots)
        self.cache.reset(slot)
        hit = self.prefix_cache.lookup(req.key) if req.key is not None and self.prefix_cache.capacity else None
        cached = 0 if hit is None else hit.length
        rows = req.image_positions
        offsets, n = [], 0
        for img in req.images:
            offsets.append(n)
            n += img.tokens
        a = _Active(handle, slot, req.key, len(req.ids), cached, rows, offsets, [None] * len(req.images), deque(),
                    t_submit=handle.t_submit)
        first_needed = bisect.bisect_left(rows, cached)  # image tokens before this are in the restored state
        for j, img in enumerate(req.images):
            if offsets[j] + img.tokens <= first_needed:
                continue
            feats = self.image_cache.get(img.key) if self.image_cache.capacity else None
            if feats is not None:
                a.features[j] = feats
            else:
                values, shapes = img.pixels()
                a.pixels[j] = (values, shapes)
                a.crop_feats[j] = []
                a.crop_work.extend((j, c) for c in range(len(shapes)))
        if hit is not None or not a.crop_work:  # else the K/V is taken at the first prefill chunk, after the images
            self.cache.grow(min(self.max_len, cache_len(len(req.ids) + p.max_new_tokens)))
        if hit is not None:
            self.cache.write_prefix(slot, hit.entry.state, hit.length, hit.conv)
        if self.decode is not None:
            a.stream = TextStream(self.decode, p.stop)
        if p.seed is not None:
            a.generator = torch.Generator(device=self.cache.device).manual_seed(p.seed)
        if p.repetition_penalty != 1.0:
            a.history = torch.tensor([req.ids], device=self.cache.device)
        if p.min_new_tokens and req.stop_ids:
            a.banned = torch.tensor(sorted(req.stop_ids), device=self.cache.device)
        self.counters["prompt_tokens"] += len(req.ids)
        return a

    # -- prefill -------------------------------------------------------------------------------------
    def _prefill_unit(self) -> None:
        waiting = sorted((a for a in self._active.values() if a.prefilling), key=lambda a: a.t_submit)
        if not waiting:
            return
        a = waiting[0]
        try:
            if a.crop_work:
                self._encode_crop(a)
            else:
                self._prefill_chunk(a)
        except Exception as e:  # noqa: BLE001
            self._finish(a, "error", f"{type(e).__name__}: {e}")

    def _encode_crop(self, a: _Active) -> None:
        """Encode the next crops of an image: several in one call while they hold at most
        `vision_patches` patches together (small crops batch; a full 512 x 512 tile goes alone, or two
        on AMX in bf16: faster and smaller than all five crops in one call, docs/performance.md)."""
        j, first = a.crop_work.popleft()
        last = first
        shapes = a.pixels[j][1]
        patches = shapes[first][0] * shapes[first][1]
        while a.crop_work and a.crop_work[0][0] == j:
            h, w = shapes[a.crop_work[0][1]]
            if patches + h * w > self.vision_patches:
                break
            patches += h * w
            last = a.crop_work.popleft()[1]
        values, shapes = a.pixels[j]
        start = sum(h * w for h, w in shapes[:first])
        end = start + sum(h * w for h, w in shapes[first : last + 1])
        rows = values[start:end].to(self.cache.device)
        a.crop_feats[j].append(self.model.encode_images(rows, shapes[first : last + 1]))  # (tokens of these crops, D)
        self.counters["vision_crops"] += last - first + 1
        if last == len(shapes) - 1:
            feats = torch.cat(a.crop_feats.pop(j))
            del a.pixels[j]
            if not a.crop_work and self.cache.device.type == "cpu":
                # the vision tower's freed activations go back to the OS before the prefill takes the K/V
                release_freed_memory()
            if feats.shape[0] != a.request.images[j].tokens:
                raise ValueError(f"image {j} gave {feats.shape[0]} features for {a.request.images[j].tokens} tokens")
            a.features[j] = feats
            if self.image_cache.capacity:
                self.image_cache.put(a.request.images[j].key, feats)

    def _chunk_features(self, a: _Active, start: int, end: int) -> torch.Tensor | None:
        lo, hi = bisect.bisect_left(a.image_positions, start), bisect.bisect_left(a.image_positions, end)
        if lo == hi:
            return None
        parts = []
        for j, off in enumerate(a.image_offsets):
            n = a.request.images[j].tokens
            s, e = max(lo, off), min(hi, off + n)
            if s < e:
                parts.append(a.features[j][s - off : e - off])
        return torch.cat(parts)

    def _prefill_chunk(self, a: _Active) -> None:
        self.cache.grow(min(self.max_len, cache_len(a.n_prompt + a.request.params.max_new_tokens)))  # see _start
        start = self.cache.host_lengths[a.slot]
        decoding = sum(not x.prefilling for x in self._active.values())
        budget = self.config.token_budget if decoding else max(self.config.token_budget, self.config.solo_token_budget)
        size = max(self.config.min_chunk, budget - decoding)
        end = min(a.n_prompt, start + size)
        last = end == a.n_prompt
        # The chunk that ends the prompt also keeps the conv state one token earlier: the boundary a
        # repeated prompt resumes from (it must prefill at least one token to get logits).
        capture = end - 1 - start if last and end - 1 > start else None
        ids = torch.tensor([a.request.ids[start:end]], device=self.cache.device)
        view = self.cache.view([a.slot], end - start, capture=capture)
        logits = self.model.forward(ids, image_features=self._chunk_features(a, start, end), cache=view,
                                    logits_to_keep=1)
        self.counters["prefilled_tokens"] += end - start
        if not last:
            return
        if view.captured is not None:
            a.boundaries[end - 1] = {i: s[0] for i, s in view.captured.items()}
        a.boundaries[end] = self.cache.conv_snapshot(a.slot)
        a.features = [None] * len(a.features)  # the prompt is in the cache now
        token = self._sample([a], logits[:, -1])[0]
        a.t_first = time.perf_counter()
        self._emit(a, token)

    # -- decode --------------------------------------------------------------------------------------
    def _decode(self) -> None:
        rows = sorted((a for a in self._active.values() if not a.prefilling), key=lambda a: a.slot)
        if not rows:
            return
        try:
            ids = torch.tensor([[a.next_input] for a in rows], device=self.cache.device)  # (B, 1)
            self.cache.grow(min(self.max_len, max(self.cache.host_lengths[a.slot] for a in rows) + 1))
            view = self.cache.view([a.slot for a in rows], 1)
            logits = self.model.forward(ids, cache=view)[:, -1]  # (B, V)
            tokens = self._sample(rows, logits)
        except Exception as e:  # noqa: BLE001
            for a in rows:
                self._finish(a, "error", f"{type(e).__name__}: {e}")
            return
        self._recent.append((time.perf_counter(), len(rows)))
        self.counters["decode_steps"] += 1
        self.counters["decode_rows"] += len(rows)
        for a, token in zip(rows, tokens, strict=True):
            self._emit(a, token)

    def _sample(self, rows: list[_Active], logits: torch.Tensor) -> list[int]:
        """logits (B, V) -> one token per row, each with its own parameters and generator (one host read)."""
        # (B,): greedy rows without penalties need nothing else. In float32: the same argmax (the cast
        # is exact) in a third of the time of a bf16 argmax over 65k logits on the CPU.
        tokens = logits.float().argmax(-1)
        for i, a in enumerate(rows):
            p = a.request.params
            banned = a.banned if a.banned is not None and a.generated < p.min_new_tokens else None
            if p.greedy and a.history is None and banned is None:
                continue
            history = a.history if a.history is not None else logits.new_empty(1, 0, dtype=torch.long)
            tokens[i] = next_tokens(logits[i : i + 1], history, p, a.generator, banned)[0]
        want = [i for i, a in enumerate(rows) if a.request.params.logprobs is not None]
        if want:
            ks = [rows[i].request.params.logprobs for i in want]
            for i, lp in zip(want, token_logprobs(logits[want], tokens[want], ks), strict=True):
                rows[i].logprobs = lp
        return tokens.tolist()

    def _emit(self, a: _Active, token: int) -> None:
        req, p = a.request, a.request.params
        if token in req.stop_ids:
            self._finish(a, "stop")
            return
        a.generated += 1
        self.counters["generated_tokens"] += 1
        if a.history is not None:
            a.history = torch.cat([a.history, a.history.new_tensor([[token]])], dim=1)
        piece, reason = "", None
        if a.stream is not None:
            piece = a.stream.push(token)
            reason = a.stream.finish_reason
        if reason is None and a.generated >= p.max_new_tokens:
            reason = "length"
            if a.stream is not None:
                piece += a.stream.finish("length")
        if reason is not None:
            self._active.pop(a.slot, None)  # not active once its last event is out (stats() does not wait)
            a.handle._put(self._event(a, piece, token, reason))
            self._release(a)
            return
        a.next_input = token
        a.handle._put(self._event(a, piece, token, None))

    # -- finishing -----------------------------------------------------------------------------------
    def _event(self, a: _Active, text: str, token: int | None, reason: str | None, error: str | None = None):
        now = time.perf_counter()
        logprob, top = a.logprobs if token is not None and a.logprobs is not None else (None, ())
        ttft = (a.t_first or now) - a.t_submit
        gen_time = now - (a.t_first or now)
        return StreamEvent(
            text=text, token=token, finish_reason=reason, prompt_tokens=a.n_prompt, generation_tokens=a.generated,
            cached_tokens=a.cached, prompt_tps=a.n_prompt / ttft if ttft > 0 else 0.0,
            generation_tps=(a.generated - 1) / gen_time if gen_time > 0 and a.generated > 1 else 0.0,
            peak_memory_mb=peak_memory_mb(self.cache.device) if reason is not None else 0.0, error=error,
            logprob=logprob, top_logprobs=top,
        )

    def _finish(self, a: _Active, reason: str, error: str | None = None, save: bool = True) -> None:
        tail = a.stream.finish(reason) if a.stream is not None and reason in ("stop", "length") else ""
        self._active.pop(a.slot, None)  # not active once its last event is out (stats() does not wait)
        a.handle._put(self._event(a, tail, None, reason, error))
        self._release(a, save=save and reason != "error")

    def _release(self, a: _Active, save: bool = True) -> None:
        """Free the slot; store the state it reached (prompt + fed tokens) in the prefix cache."""
        self._active.pop(a.slot, None)
        self._count_end(a.handle.completion.finish_reason)
        length = self.cache.host_lengths[a.slot]
        if not save or a.key is None or not self.prefix_cache.capacity or length < a.n_prompt or not a.boundaries:
            return
        key = (tuple(a.key) + tuple(a.handle.completion.token_ids))[:length]
        try:
            conv = a.boundaries[length] = self.cache.conv_snapshot(a.slot)
            self.prefix_cache.insert(key, self.cache.read_prefix(a.slot, length, conv), a.boundaries)
        except torch.OutOfMemoryError:  # a full GPU: the request is done, only this prefix goes uncached
            a.boundaries.pop(length, None)

    def _count_end(self, reason: str | None) -> None:
        for key in ("finished", f"finished_{reason}"):
            self.counters[key] += 1

    def _finish_handle(self, handle: RequestHandle, reason: str, error: str | None) -> None:
        self._count_end(reason)
        handle._put(StreamEvent("", None, reason, len(handle.request.ids), 0, 0, 0.0, 0.0, 0.0, error))
