"""lfm2vl's own CPU kernels for quantized layers, built once per machine with the system C compiler and
loaded with ctypes: for decode rows (kernels.c; the whole decode step, step.c), AVX512-VNNI ones where
the CPU has it, AVX2 + FMA ones elsewhere on x86; and an int8 GEMM for prompt rows on AVX2 CPUs
without VNNI (gemm.c). Where there is no compiler, the build fails, or the CPU has neither, `library()` is
None (`why_not()` says why) and the layers keep torch's kernels. Why, and what they compute: kernels.c.

The library is built with -march=native for this CPU and cached in ~/.cache/lfm2vl/native/
(`$LFM2VL_CACHE` or `$XDG_CACHE_HOME` moves it) under a hash of the source, the compiler, its flags and the CPU's flags,
so another machine sharing the home folder builds its own. LFM2VL_NATIVE=0 turns the kernels off and
LFM2VL_NATIVE=avx2 keeps to the AVX2 ones on a VNNI CPU (to compare them); $CC names the compiler
(else cc, gcc or clang, the first found).
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

from ..cpu import cache_root, cpu_flags

SOURCES = tuple(Path(__file__).with_name(name) for name in ("kernels.c", "step.c", "gemm.c"))  # compiled together
HEADERS = (Path(__file__).with_name("kernels.h"),)
FLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-std=c11", "-shared", "-fPIC")
BUILD_TIMEOUT_S = 120
_I64, _PTR, _INT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
SIGNATURES = {  # name: (argument types, result type)
    "int8_rows": ([_PTR, _INT, _PTR, _PTR, _INT, _PTR, _I64, _I64, _I64, _INT, _INT], _INT),
    "int4_rows": ([_PTR, _INT, _PTR, _PTR, _PTR, _I64, _I64, _I64, _I64, _INT, _INT], _INT),
    "int8_gemm": ([_PTR, _PTR, _PTR, _PTR, _PTR, _I64, _I64, _I64, _INT], _INT),  # gemm.c: prompt rows on AVX2
    "decode_step": ([_PTR, _PTR, _PTR, _I64, _PTR, _PTR, _INT, _INT], _INT),  # step.c (its tables: step.py)
}
ISAS = {2: "AVX512-VNNI", 1: "AVX2"}  # kernels.c's kernels_isa()
INT4_BLOCKS = (32, 64)  # the int4 packings int4_rows reads: torch's AVX2 and AVX-512 ones (lfm2vl/quant/int4.py)
_why_not: list[str] = []  # why library() is None, once it has been asked


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc)
    return next((path for name in ("cc", "gcc", "clang") if (path := shutil.which(name))), None)


def _cache_dir() -> Path:
    return cache_root() / "native"


def _build(cc: str) -> Path:
    """The built library for this source, compiler and CPU: from the cache, or compiled now."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    texts = [path.read_text() for path in (*SOURCES, *HEADERS)]
    key = hashlib.sha256("\n".join([*texts, cc, version, " ".join(FLAGS), platform.machine(),
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
        done = subprocess.run([cc, *FLAGS, *map(str, SOURCES), "-o", tmp, "-lm"], capture_output=True, text=True,
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
    setting = os.environ.get("LFM2VL_NATIVE", "1")
    if setting == "0":
        _why_not.append("turned off (LFM2VL_NATIVE=0)")
        return None
    cc = _compiler()
    if cc is None:
        _why_not.append("no C compiler (cc, gcc or clang; or set CC)")
        return None
    try:
        lib = ctypes.CDLL(str(_build(cc)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        _why_not.append(f"could not build lfm2vl/native/ ({', '.join(p.name for p in SOURCES)}): {e}")
        return None
    lib.kernels_isa.restype = ctypes.c_int
    lib.isa = min(lib.kernels_isa(), 1 if setting == "avx2" else 2)
    if lib.isa == 0:
        _why_not.append("this CPU has neither AVX2 with FMA nor AVX512-VNNI (the kernels are written for those)")
        return None
    for name, (args, result) in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, result
    return lib


def why_not() -> str | None:
    """Why the kernels are not in use (None when they are)."""
    return None if library() is not None else _why_not[-1]


def isa() -> str | None:
    """The instruction set of the kernels in use ("AVX512-VNNI", "AVX2"), or None where they are not."""
    lib = library()
    return None if lib is None else ISAS[lib.isa]


def _input(x2: torch.Tensor) -> tuple[torch.Tensor, int]:
    """x2 as the kernels read it: float32 or bfloat16 (flag 1), contiguous."""
    if x2.dtype not in (torch.float32, torch.bfloat16):
        x2 = x2.float()
    return x2.contiguous(), int(x2.dtype == torch.bfloat16)


def _check(status: int) -> None:
    if status != 0:
        raise MemoryError("lfm2vl/native: no memory for a decode kernel's scratch")


def int8_rows(x2: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
    """x2 (M, in) @ (qweight (out, in) int8 * scale (out,) float32 or bfloat16)^T -> (M, out) float32,
    the activations rounded to int8 per group of 32 (kernels.c), at the memory's speed for a few rows.
    None where the kernels are not built or the layer is not one they take (in % 32; the caller takes
    torch's)."""
    lib = library()
    if lib is None or x2.device.type != "cpu" or x2.shape[1] % 32:
        return None
    x2, x_bf16 = _input(x2)
    if scale.dtype != torch.bfloat16:
        scale = scale.float()
    (m, k), n = x2.shape, qweight.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    _check(lib.int8_rows(x2.data_ptr(), x_bf16, qweight.contiguous().data_ptr(), scale.contiguous().data_ptr(),
                         int(scale.dtype == torch.bfloat16), y.data_ptr(), m, n, k, torch.get_num_threads(), lib.isa))
    return y


def int8_gemm(x2: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """x2 (M, in) float32 @ (qweight (out, in) int8 * scale (out,))^T (+ bias) -> (M, out) float32 for prompt
    rows, each rounded to int8 of its own max (gemm.c; the bits of lfm2vl.quant's int8_dynamic_linear),
    or None where the kernels are not built or the rows are not float32 on the CPU."""
    lib = library()
    k = x2.shape[-1]
    if lib is None or x2.dtype != torch.float32 or qweight.device.type != "cpu":
        return None
    x2, qweight = x2.contiguous(), qweight.contiguous()
    scale = scale.to(torch.float32).contiguous()
    bias = None if bias is None else bias.to(torch.float32).contiguous()
    y = torch.empty(x2.shape[0], qweight.shape[0], dtype=torch.float32)
    _check(lib.int8_gemm(x2.data_ptr(), qweight.data_ptr(), scale.data_ptr(), None if bias is None else bias.data_ptr(),
                         y.data_ptr(), x2.shape[0], qweight.shape[0], k, torch.get_num_threads()))
    return y


def int4_rows(x2: torch.Tensor, qweight: torch.Tensor, scales_zeros: torch.Tensor, out_features: int,
              block: int) -> torch.Tensor | None:
    """x2 (M, in) @ W^T -> (M, out) float32 for an int4 weight in torch's CPU packing of `block` rows
    (INT4_BLOCKS; qweight (out, in / 2) uint8, scales_zeros (in / 32, out, 2) bf16), the activations
    rounded to int8 per group of 32 (kernels.c). None where the kernels are not built or do not read
    that packing (the caller takes torch's)."""
    lib = library()
    if lib is None or x2.device.type != "cpu" or scales_zeros.dtype != torch.bfloat16 or block not in INT4_BLOCKS:
        return None
    x2, x_bf16 = _input(x2)
    m, k = x2.shape
    y = torch.empty(m, out_features, dtype=torch.float32)
    _check(lib.int4_rows(x2.data_ptr(), x_bf16, qweight.contiguous().data_ptr(), scales_zeros.contiguous().data_ptr(),
                         y.data_ptr(), m, out_features, k, block, torch.get_num_threads(), lib.isa))
    return y
