"""Memory that a long-running process must not accumulate (lfm2vl/memory.py)."""

import json
import os
import subprocess
import sys

import pytest

from lfm2vl.memory import KERNEL_CACHE_VARIABLES as CACHE_VARIABLES

# Run in a fresh process: the kernel caches are sized when the process first runs a oneDNN kernel.
GROWTH = """
import ctypes, json, sys
import torch
import lfm2vl  # caps the caches unless the environment sets them
from lfm2vl.model.linear import onednn_float32
if not onednn_float32():
    print(json.dumps({"skip": "no oneDNN float32 linear in this torch"})); sys.exit()
trim = ctypes.CDLL("libc.so.6").malloc_trim
def rss_mb():
    trim(0)
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) / 1024
torch.set_num_threads(1)
w = torch.randn(256, 256)
marks = {}
with torch.inference_mode():
    for rows in range(1, 401):  # a new shape each call, as prompts of new lengths are
        # oneDNN's linear op, as bf16 layers, int8 products and float32 layers where MKL runs AVX2 code use it
        torch.ops.mkldnn._linear_pointwise(torch.randn(rows, 256), w, None, "none", [], "")
        if rows in (200, 400):
            marks[rows] = rss_mb()
print(json.dumps(marks))
"""


def _growth(env: dict[str, str]) -> float:
    r = subprocess.run([sys.executable, "-c", GROWTH], capture_output=True, text=True, timeout=300, check=False,
                       env={k: v for k, v in os.environ.items() if k not in CACHE_VARIABLES} | env)
    assert r.returncode == 0, r.stderr
    marks = json.loads(r.stdout.strip().splitlines()[-1])
    if "skip" in marks:
        pytest.skip(marks["skip"])
    return marks["400"] - marks["200"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and glibc's malloc_trim")
def test_new_matrix_shapes_stop_costing_memory_once_lfm2vl_is_imported():
    bare = _growth(dict.fromkeys(CACHE_VARIABLES, "1024"))  # torch's defaults: ~0.6 MB kept for each new shape
    ours = _growth({})  # capped at KERNEL_CACHE_ENTRIES: the caches are full well before 200 shapes
    assert bare > 60, f"the kernels of 200 new shapes kept only {bare:.1f} MB: is oneDNN not used here?"
    assert ours < 20, f"200 new shapes still kept {ours:.1f} MB after import lfm2vl"


def test_kernel_cache_bound_respects_the_users_setting_and_undoes_its_own():
    code = ("import os, lfm2vl, lfm2vl.memory as m; a = dict(os.environ); m.unbound_kernel_caches(); "
            "print(a.get('LRU_CACHE_CAPACITY'), a.get('ONEDNN_PRIMITIVE_CACHE_CAPACITY'), "
            "os.environ.get('LRU_CACHE_CAPACITY'), os.environ.get('ONEDNN_PRIMITIVE_CACHE_CAPACITY'))")
    env = {k: v for k, v in os.environ.items() if k not in CACHE_VARIABLES}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env | {"LRU_CACHE_CAPACITY": "7"},
                         timeout=120, check=True).stdout.split()
    assert out == ["7", "128", "7", "None"]  # the user's value kept, ours set and then removed
