"""nn.Embedding built without torch's meta-device initializer.

Checkpoints are loaded into a model built on the meta device (lfm2vl/weights.py). There,
nn.Embedding's own `normal_` initialization needs torch's Python meta kernels, whose first use
imports torch._meta_registrations, sympy and mpmath (about 800 modules): 76 MB of resident memory
and a second of start-up for weights about to be overwritten. On a real device the table gets the
same N(0, 1) initialization nn.Embedding gives it.
"""

from __future__ import annotations

import torch
from torch import nn


def embedding(num_embeddings: int, embedding_dim: int) -> nn.Embedding:
    table = nn.Embedding(num_embeddings, embedding_dim, _weight=torch.empty(num_embeddings, embedding_dim))
    if table.weight.device.type != "meta":
        nn.init.normal_(table.weight)
    return table
