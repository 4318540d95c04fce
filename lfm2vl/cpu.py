"""What the CPU is: its model name, vendor and feature flags, read once from /proc/cpuinfo (Linux;
elsewhere empty, but for the vendor on Windows), and where this machine's caches live.

The quantized layers choose kernels by them (lfm2vl/quant/), the image-budget calibration is cached
per CPU (lfm2vl/budget.py), and every benchmark prints them (lfm2vl/bench/workload.py).
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path


def cache_root() -> Path:
    """lfm2vl's per-machine cache (built kernels, image-budget calibrations, benchmark checkpoints):
    $LFM2VL_CACHE, else $XDG_CACHE_HOME/lfm2vl (if absolute), else ~/.cache/lfm2vl."""
    if os.environ.get("LFM2VL_CACHE"):
        return Path(os.environ["LFM2VL_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache") / "lfm2vl"  # the XDG spec ignores a relative one


@functools.cache
def _cpuinfo() -> tuple[str, str, frozenset[str]]:
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return "", "", frozenset()

    def field(key: str) -> str:
        return next((line.split(":", 1)[1].strip() for line in lines if line.startswith(key)), "")

    return field("model name"), field("vendor_id"), frozenset(field("flags").split())


def cpu_name() -> str:
    """"Intel(R) Xeon(R) Processor", "AMD EPYC 9R14 ...", or "" where /proc/cpuinfo is missing."""
    return _cpuinfo()[0]


def cpu_vendor() -> str:
    """"GenuineIntel", "AuthenticAMD", ... from /proc/cpuinfo, or on Windows from platform.processor();
    "" where neither says (macOS, ARM)."""
    vendor = _cpuinfo()[1]
    if vendor or _cpuinfo()[0]:
        return vendor
    name = platform.processor()  # Windows: "Intel64 Family 6 Model 158 Stepping 10, GenuineIntel"
    return next((v for v in ("GenuineIntel", "AuthenticAMD") if v in name), "")


def cpu_flags() -> frozenset[str]:
    """The kernel's feature flags ("avx512_vnni", "amx_bf16", ...); empty where /proc/cpuinfo is missing."""
    return _cpuinfo()[2]


def vector_flags() -> list[str]:
    """The flags that decide kernel speed (AVX*, AMX*, FMA, SSE4), sorted: what benchmarks print."""
    return sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma", "sse4")))
