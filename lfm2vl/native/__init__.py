"""lfm2vl's own CPU kernels for decode rows of quantized layers (kernels.c), built once per machine with
the system C compiler and loaded with ctypes; where there is none, it fails, or the CPU lacks
AVX512-VNNI, `library()` is None (`why_not()` says why) and the layers keep torch's kernels. Why, and
what they compute: kernels.c.

The library is built with -march=native for this CPU and cached in ~/.cache/lfm2vl/native/
(`$LFM2VL_CACHE` moves it) under a hash of the source, the compiler, its flags and the CPU's flags,
so another machine sharing the home folder builds its own. LFM2VL_NATIVE=0 turns the kernels off;
$CC names the compiler (else cc, gcc or clang, the first found).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from ..cpu import cpu_flags

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-std=c11", "-shared", "-fPIC")
BUILD_TIMEOUT_S = 120
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
SIGNATURES = {
    "int8_rows": [_PTR, _PTR, _PTR, _PTR, _I64, _I64, _I64, _PTR, _PTR, _PTR, ctypes.c_int],
    "int4_rows": [_PTR, _PTR, _PTR, _PTR, _I64, _I64, _I64, _PTR, _PTR, _PTR, ctypes.c_int],
}
_why_not: list[str] = []  # why library() is None, once it has been asked


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc)
    return next((path for name in ("cc", "gcc", "clang") if (path := shutil.which(name))), None)


def _cache_dir() -> Path:
    return Path(os.environ.get("LFM2VL_CACHE", Path.home() / ".cache" / "lfm2vl")) / "native"


def _build(cc: str) -> Path:
    """The built library for this source, compiler and CPU: from the cache, or compiled now."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\n".join([SOURCE.read_text(), cc, version, " ".join(FLAGS), platform.machine(),
                                    " ".join(sorted(cpu_flags()))]).encode()).hexdigest()[:16]
    folder = _cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:  # an unwritable cache: build for this process only
        folder = Path(tempfile.mkdtemp(prefix="lfm2vl-native-"))
    target = folder / f"kernels-{key}.so"
    if target.exists():
        return target
    # Built beside the target and renamed into place: another process may be building the same file.
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".so")
    os.close(fd)
    try:
        done = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True,
                              timeout=BUILD_TIMEOUT_S)
        if done.returncode != 0:
            raise RuntimeError(f"{Path(cc).name} failed: {done.stderr.strip().splitlines()[-1:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (then `why_not()` says why). Built on the first call of a process
    that finds no cached build (under a second for this one file)."""
    if os.environ.get("LFM2VL_NATIVE", "1") == "0":
        _why_not.append("turned off (LFM2VL_NATIVE=0)")
        return None
    cc = _compiler()
    if cc is None:
        _why_not.append("no C compiler (cc, gcc or clang; or set CC)")
        return None
    try:
        lib = ctypes.CDLL(str(_build(cc)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        _why_not.append(f"could not build lfm2vl/native/kernels.c: {e}")
        return None
    lib.kernels_available.restype = ctypes.c_int
    if not lib.kernels_available():
        _why_not.append("this CPU has no AVX512-VNNI (the kernels are written for it)")
        return None
    for name, args in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, None
    return lib


def why_not() -> str | None:
    """Why the kernels are not in use (None when they are)."""
    return None if library() is not None else _why_not[-1]


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def int8_rows(x2: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
    """x2 (M, in) @ (qweight (out, in) int8 * scale (out,))^T -> (M, out) float32, the activations
    rounded to int8 per group of 32 (kernels.c), at the memory's speed for a few rows. None where
    the kernels are not built or the layer is not one they take (in % 32; the caller takes torch's)."""
    lib = library()
    if lib is None or x2.device.type != "cpu" or x2.shape[1] % 32:
        return None
    x2, qweight, scale = x2.to(torch.float32).contiguous(), qweight.contiguous(), scale.to(torch.float32).contiguous()
    (m, k), n = x2.shape, qweight.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    xq = torch.empty(m, k, dtype=torch.int8)
    xs, xs16 = torch.empty(m, k // 32), torch.empty(m, k // 4)
    lib.int8_rows(_ptr(x2), _ptr(qweight), _ptr(scale), _ptr(y), m, n, k, _ptr(xq), _ptr(xs), _ptr(xs16),
                  torch.get_num_threads())
    return y


INT4_BLOCK_ROWS = 64  # the packing int4_rows reads: torch's AVX-512 one (lfm2vl/quant/int4.py)


def int4_rows(x2: torch.Tensor, qweight: torch.Tensor, scales_zeros: torch.Tensor, out_features: int) -> torch.Tensor | None:
    """x2 (M, in) @ W^T -> (M, out) float32 for an int4 weight in torch's AVX-512 packing (qweight
    (out, in / 2) uint8, scales_zeros (in / 32, out, 2) bf16), the activations rounded to int8 per
    group of 32 (kernels.c). None where the kernel is not built (the caller takes torch's)."""
    lib = library()
    if lib is None or x2.device.type != "cpu" or scales_zeros.dtype != torch.bfloat16:
        return None
    x2 = x2.to(torch.float32).contiguous()
    (m, k), groups = x2.shape, x2.shape[1] // 32
    y = torch.empty(m, out_features, dtype=torch.float32)
    xq = torch.empty(m, k, dtype=torch.int8)
    xs, xsum = torch.empty(m, groups), torch.empty(m, groups)
    lib.int4_rows(_ptr(x2), _ptr(qweight), _ptr(scales_zeros.contiguous()), _ptr(y), m, out_features, k,
                  _ptr(xq), _ptr(xs), _ptr(xsum), torch.get_num_threads())
    return y

