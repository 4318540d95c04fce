"""Handing freed memory back to the operating system.

glibc keeps the blocks a process frees in its heaps for reuse, so resident memory only ever grows:
the float blocks freed while quantizing at load (lfm2vl/weights.py), and the activations and
widened weights of every image encoding and prefill (lfm2vl/engine/scheduler.py). Without a trim
the next request starts from the previous one's high-water mark and the process holds 100-200 MB
more than it uses, a different amount each run (docs/performance.md).
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

# oneDNN (the bf16 linear layers, our float32 ones in model/linear.py, int8 products) compiles a
# kernel for every new matrix shape and keeps it in two caches, ideep's and oneDNN's own, of 1,024
# entries each by default: ~0.6 MB a shape whatever the weight's size, so every prompt length not
# seen before kept about a dozen more and a long-running process grew by up to ~600 MB
# (docs/performance.md). 128 entries hold every shape a decode step uses, at any batch size up to 8.
KERNEL_CACHE_ENTRIES = 128
KERNEL_CACHE_VARIABLES = ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")
_set_by_us: list[str] = []


def bound_kernel_caches() -> None:
    """Cap both kernel caches at KERNEL_CACHE_ENTRIES unless the user set them; read once, when the
    process first runs a oneDNN kernel, so this runs when lfm2vl is imported."""
    for name in KERNEL_CACHE_VARIABLES:
        if name not in os.environ:
            os.environ[name] = str(KERNEL_CACHE_ENTRIES)
            _set_by_us.append(name)


def unbound_kernel_caches() -> None:
    """Undo bound_kernel_caches (the reference side of `lfm2vl bench` runs as users run it)."""
    while _set_by_us:
        os.environ.pop(_set_by_us.pop(), None)


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
