"""Count host synchronisations (device -> host reads) made by a block of code, on any device.

On CUDA, `torch.cuda.set_sync_debug_mode` reports syncs; on the CPU nothing does, so the tensor
methods that read values back to Python (`item`, `tolist`, `cpu`, `numpy`, `bool`, `int`, `float`)
are wrapped and counted while the block runs. A decode step that CUDA graphs / torch.compile can
capture makes none of them.
"""

from __future__ import annotations

import contextlib
from collections import Counter

import torch

_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


@contextlib.contextmanager
def count_host_syncs():
    counts: Counter = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in _METHODS}

    def wrap(name, fn):
        def counted(self, *args, **kwargs):
            counts[name] += 1
            return fn(self, *args, **kwargs)

        return counted

    for name, fn in originals.items():
        setattr(torch.Tensor, name, wrap(name, fn))
    try:
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
