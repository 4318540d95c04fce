"""Handing freed memory back to the operating system.

glibc keeps the blocks a process frees in its heaps for reuse, so resident memory only ever grows:
the float blocks freed while quantizing at load (lfm2vl/weights.py), and the activations and
widened weights of every image encoding and prefill (lfm2vl/engine/scheduler.py). Without a trim
the next request starts from the previous one's high-water mark and the process holds 100-200 MB
more than it uses, a different amount each run (docs/performance.md).
"""

from __future__ import annotations

import ctypes
from typing import Any


def _libc_trim() -> Any:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows): nothing to do
        return None


_TRIM = _libc_trim()


def release_freed_memory() -> None:
    """Return the freed blocks of every heap to the OS (~10 ms when there are 100 MB to return,
    ~0.2 ms when there are none); a no-op where the C library is not glibc."""
    if _TRIM is not None:
        _TRIM(0)
