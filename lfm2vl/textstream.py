"""Incremental detokenization with stop strings, used by the engine for every request.

Each step re-decodes the row's tokens and emits only text that can no longer change: a trailing
U+FFFD (an incomplete UTF-8 character split across byte-level tokens) is held back, and so is
any tail that could still grow into a stop string. A stop string ends the row and is cut, with
everything after it, so it never leaks into the output. Concatenated pieces == the final text.
"""

from __future__ import annotations

from collections.abc import Callable


class TextStream:
    def __init__(self, decode: Callable[[list[int]], str], stop: tuple[str, ...] = ()):
        self.decode, self.stop = decode, tuple(stop)
        self.ids: list[int] = []
        self.text = ""  # the final text so far (stop string excluded once found)
        self.emitted = 0  # characters of self.text already handed out
        self.finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def push(self, token_id: int) -> str:
        """Add one generated token; returns the text that became final (may be "")."""
        if self.finished:
            return ""
        self.ids.append(int(token_id))
        text = self.decode(self.ids)
        cut = self._find_stop(text)
        if cut is not None:
            self.text = text[:cut]
            self.finish_reason = "stop"
            return self._emit(cut)
        self.text = text
        safe = len(text.rstrip("\ufffd"))
        safe -= self._partial_stop(text[:safe])
        return self._emit(safe)

    def finish(self, reason: str) -> str:
        """End the row (EOS -> "stop", budget -> "length"); returns the held-back tail."""
        if self.finished:
            return ""
        self.finish_reason = reason
        return self._emit(len(self.text))

    def _emit(self, end: int) -> str:
        end = max(end, self.emitted)
        piece = self.text[self.emitted : end]
        self.emitted = end
        return piece

    def _find_stop(self, text: str) -> int | None:
        hits = []
        for s in self.stop:
            i = text.find(s, max(0, self.emitted - len(s) + 1))
            if i >= 0:
                hits.append(i)
        return min(hits) if hits else None

    def _partial_stop(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best
