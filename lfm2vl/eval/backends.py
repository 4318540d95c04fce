"""Where answers come from: our engine in this process, or any OpenAI-compatible server over HTTP.

Both run a list of `Sample`s greedily and call `done(sample, text, error)` as each finishes (in any
order; the harness writes and resumes by id).
"""

from __future__ import annotations

import concurrent.futures as cf
from collections import deque
from collections.abc import Callable
from typing import Any

from .openai_http import ChatClient, to_openai
from .sample import Sample

Done = Callable[[Sample, str, "str | None"], None]


def schedule(samples: list[Sample]) -> tuple[deque[Sample], dict[str, deque[Sample]]]:
    """The first sample of each image group is ready; the rest wait until it has finished, so their
    image's features are in the engine's image cache (8 questions about one image admitted together
    would each run the vision tower)."""
    ready: deque[Sample] = deque()
    held: dict[str, deque[Sample]] = {}
    for s in samples:
        if s.group and s.group in held:
            held[s.group].append(s)
        else:
            ready.append(s)
            if s.group:
                held[s.group] = deque()
    return ready, held


class EngineBackend:
    """`Model.submit` with a bounded window of requests in flight, so the engine's continuous batching
    always has queued work for a free slot. The engine steps in this thread while it waits for the
    oldest request (its worker thread was measured slower here: 83 vs 147 questions/s on easy-VQA, the
    GIL shared between building requests and stepping; docs/evaluation.md)."""

    def __init__(self, model: Any, window: int = 64):
        self.model = model
        self.window = window
        self.name = str(getattr(model, "source", "") or "model")

    def run(self, samples: list[Sample], max_new_tokens: Callable[[Sample], int], done: Done) -> None:
        model = self.model
        previous = model.engine.config
        # Every question is a different prompt: the prefix cache never hits, and storing 10k prefixes only
        # costs copies and ever-longer lookups. The image cache stays on (questions share images).
        model.configure_engine(previous, prefix_cache_mb=0)
        inflight: deque[tuple[Sample, Any]] = deque()
        ready, held = schedule(samples)
        try:
            while ready or inflight:
                while ready and len(inflight) < self.window:
                    s = ready.popleft()
                    try:
                        inflight.append((s, model.submit(s.messages, max_new_tokens=max_new_tokens(s), temperature=0.0)))
                    except Exception as e:  # noqa: BLE001  (a bad row (image, context length) fails alone)
                        self._release(s, ready, held)
                        done(s, "", f"{type(e).__name__}: {e}")
                if not inflight:
                    continue
                s, handle = inflight.popleft()
                try:
                    text, error = handle.result().text, None
                except Exception as e:  # noqa: BLE001
                    text, error = "", f"{type(e).__name__}: {e}"
                self._release(s, ready, held)
                done(s, text, error)
        finally:
            for _, handle in inflight:
                handle.cancel()
            model.configure_engine(previous)

    @staticmethod
    def _release(s: Sample, ready: deque[Sample], held: dict[str, deque[Sample]]) -> None:
        waiting = held.pop(s.group, None) if s.group else None
        if waiting:
            ready.extendleft(reversed(waiting))


class EndpointBackend:
    """N concurrent chat completions against an OpenAI-compatible server (`lfm2vl serve`, vLLM,
    llama-server): the way past one machine is a server that spans several."""

    def __init__(self, client: ChatClient, concurrency: int = 8):
        self.client = client
        self.concurrency = concurrency
        self.name = f"{client.url} ({client.model})"

    def run(self, samples: list[Sample], max_new_tokens: Callable[[Sample], int], done: Done) -> None:
        def ask(s: Sample) -> str:
            return self.client.complete(to_openai(s.messages), max_tokens=max_new_tokens(s), temperature=0.0)

        todo = iter(samples)
        with cf.ThreadPoolExecutor(self.concurrency) as pool:
            pending: dict[cf.Future, Sample] = {}
            try:
                while True:
                    while len(pending) < 2 * self.concurrency and (s := next(todo, None)) is not None:
                        pending[pool.submit(ask, s)] = s
                    if not pending:
                        return
                    finished, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                    for f in finished:
                        s = pending.pop(f)
                        try:
                            done(s, f.result(), None)
                        except Exception as e:  # noqa: BLE001  (a failed request scores as an error row)
                            if type(e).__name__ == "EndpointError" and "HTTP 4" not in str(e):
                                raise  # the server is gone: stop; a rerun resumes from the predictions file
                            done(s, "", f"{type(e).__name__}: {e}")
            finally:
                for f in pending:
                    f.cancel()
